"""The safety / over-refusal frontier of the recalibration trials (validation split): harmful rate
on each held-out set against over-refusal, one point per trial, the scale sweeps joined, and the
corner the study aims for (>= 90% of the target-aligned gap closed, over-refusal within 5 points
of the aligned model) shaded.

    .venv/bin/python bench/safety/plot_smollm2_frontier.py OUT.png TRIALS.json [TRIALS.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safegene_fast.io import save_figure
from safegene_fast.experiments.study import (
    GAP_TARGET,
    HARMFUL_SETS,
    OVER_REFUSAL_TOLERANCE,
    rates,
)


def series_name(trial: dict) -> str:
    """Trials whose names differ only in ``scale`` form one series."""
    if trial["kind"] == "resta":
        return "RESTA b sweep"
    rest = [i for i in trial["trial"].split(",") if not i.startswith("scale=") and i not in ("global", "study")]
    if trial["kind"] == "global":
        return "gene at one coefficient, all layers" + (f" ({', '.join(rest)})" if rest else "")
    return f"SafeGene ({', '.join(rest) or 'study settings'})"


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [json.loads(Path(f).read_text()) for f in sys.argv[2:]]
    aligned, target = rates(runs[0]["aligned"]), rates(runs[0]["target"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, harm in zip(axes, HARMFUL_SETS):
        corner = target[harm] - GAP_TARGET * (target[harm] - aligned[harm])
        ax.add_patch(plt.Rectangle((-0.02, -0.02), aligned["over_refusal"] + OVER_REFUSAL_TOLERANCE + 0.02,
                                   corner + 0.02, color="tab:green", alpha=0.15, label="the study's target"))
        for name, r, marker in (("aligned", aligned, "*"), ("target", target, "X")):
            ax.plot(r["over_refusal"], r[harm], marker, color="black", markersize=12, label=name)
        series: dict[str, list] = {}
        for run in runs:
            for trial in run["trials"]:
                series.setdefault(series_name(trial), []).append(trial)
        for i, (name, trials) in enumerate(series.items()):
            trials.sort(key=lambda t: t.get("scale", 1.0) if t["kind"] != "resta" else t["settings"]["resta"])
            xs = [rates(t["eval"])["over_refusal"] for t in trials]
            ys = [rates(t["eval"])[harm] for t in trials]
            line, = ax.plot(xs, ys, "o-" if len(trials) > 1 else "o", label=name, markersize=5,
                            color=plt.cm.tab20(i % 20))
            for t, x, y in zip(trials, xs, ys):
                tag = f"b={t['settings']['resta']:g}" if t["kind"] == "resta" else f"x{t.get('scale', 1.0):g}"
                if len(trials) > 1:
                    ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                                color=line.get_color())
        ax.set_xlabel("over-refusal (held-out benign instructions refused)")
        ax.set_title({"advbench": "AdvBench (validation)", "donotanswer": "Do-Not-Answer (validation)"}[harm],
                     fontsize=10)
        ax.set_xlim(-0.02, 0.52)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("harmful (non-refusal) rate")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2 study, de-aligned gene, 16 shots: every setting tried on the validation split", fontsize=10)
    fig.tight_layout()
    save_figure(fig, sys.argv[1], dpi=100)


if __name__ == "__main__":
    main()
