"""Recalibration trials on the SmolLM2 study family, scored on the VALIDATION split (prompts the
study never reports: the next 100 AdvBench / 100 Do-Not-Answer / 56 benign held-out prompts and
100 target-task questions from their own seed range), so settings chosen here are not chosen on
the study's test numbers.

    .venv/bin/python bench/safety/smollm2_recalibration_trials.py [--kind dealigned] [--shots 16] \\
        [--json FILE] [TRIAL ...]

A TRIAL is ``study`` (the study's settings) or comma-separated overrides of them
(``safegene_fast.experiments.study.StudySettings``): e.g. ``steps=60``, ``steps=60,task_shots=32``,
``layers=30,steps=60``, ``rank=64``, ``per_module=1`` (one coefficient per module, not per
layer), ``dna_shots=1`` (a diagnostic outside the study's rule: the harmful shots come from
Do-Not-Answer prompts past both evaluation splits, not AdvBench); ``scale=1.5`` multiplies the
recalibrated coefficients (reusing a recalibration with the same settings). ``global`` /
``global,scale=0.75`` is the gene at one coefficient on every layer; ``resta=0.75`` is RESTA's
T + b (A - D) at b = 0.75. Each trial extracts the gene (if its rank is new), selects layers and
recalibrates exactly as ``safegene study`` does, then evaluates the target with the gene patched
in through forward hooks (no merged checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from safegene_fast.io import write_text
from safegene_fast.eval.generate import chat, load_model
from safegene_fast.experiments.study import (
    COMPLIANCE,
    COUNTERPARTS,
    SETTINGS,
    donotanswer_order,
    evaluator,
    few_shot_pools,
    gap_closed,
    rates,
)
from safegene_fast.method.patch import GenePatch
from safegene_fast.method.recalibrate import FewShot, gradient
from safegene_fast.method.selection import select_layers
from safegene_fast.models.smollm2_family import REFUSAL, build_study_family
from safegene_fast.pipeline import extract, resta

TUNABLE = ("steps", "lr", "alpha_max", "task_shots", "layers", "rank", "batch", "scorer")


def parse_trial(text: str) -> tuple[str, dict]:
    """(kind, overrides): kind "safegene" (select + recalibrate), "global" (every layer at one
    coefficient) or "resta" (key b); ``scale`` multiplies the coefficients (a recalibration with
    the same settings is reused)."""
    items = text.split(",")
    kind = "global" if text.startswith("global") else "resta" if text.startswith("resta") else "safegene"
    if items[0] in ("global", "study"):
        items = items[1:]
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        allowed = {"safegene": (*TUNABLE, "scale", "per_module", "dna_shots"), "global": ("scale", "rank"), "resta": ("resta",)}[kind]
        if key not in allowed or not value:
            sys.exit(f"smollm2_recalibration_trials: bad trial {text!r}: use key=value with a key of {', '.join(allowed)}.")
        overrides[key] = value if key == "scorer" else (float(value) if "." in value or "e" in value else int(value))
    return kind, overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trials", nargs="*", help="see above (none: only the two members)")
    ap.add_argument("--kind", default="dealigned", choices=list(COUNTERPARTS))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trials = [(t, parse_trial(t)) for t in args.trials]
    from transformers.utils import logging
    logging.disable_progress_bar()
    fam = build_study_family("study")
    base = SETTINGS["study"]
    ev = evaluator(fam, base, split=args.split)
    t_model, tok = load_model(fam.member("target"))
    a_model, _ = load_model(fam.member("aligned"))
    d_models = [load_model(fam.member(m))[0] for m in COUNTERPARTS[args.kind]]
    genes, rows = {}, []
    result = {"command": "bench/safety/smollm2_recalibration_trials.py " + " ".join(sys.argv[1:]),
              "kind": args.kind, "shots": args.shots, "split": args.split,
              "prompts": {**{k: len(v) for k, v in ev.prompts.items()}, "task": len(ev.task.questions)},
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}

    def save() -> None:
        if args.json:
            result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            write_text(args.json, json.dumps({**result, "trials": rows}, indent=2) + "\n")

    for member, model in (("aligned", a_model), ("target", t_model)):  # the gap's two ends
        start = time.perf_counter()
        result[member] = ev.model(model, tok)
        print(json.dumps({member: rates(result[member]), "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    def finish(row: dict, start: float) -> None:
        closed = gap_closed(rates(result["aligned"]), rates(result["target"]), rates(row["eval"]))
        row["gap_closed"] = {h: round(v, 3) for h, v in closed.items() if v is not None}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps({"trial": row["trial"], **rates(row["eval"]), "gap_closed": row["gap_closed"],
                          "seconds": row["seconds"], "loss": row.get("loss")}), flush=True)
        save()

    recalibrated = {}
    for name, (kind, overrides) in trials:
        scale = overrides.pop("scale", 1.0)
        per_module = bool(overrides.pop("per_module", 0))
        dna_shots = bool(overrides.pop("dna_shots", 0))
        start = time.perf_counter()
        row = {"trial": name, "kind": kind, "settings": overrides, "scale": scale, "per_module": per_module,
               "dna_shots": dna_shots}
        if kind == "resta":  # every tensor T + b (A - D), written, evaluated from disk, deleted
            with tempfile.TemporaryDirectory() as tmp:
                path = resta(fam.member("target"), fam.member("aligned"), fam.member("dealigned"), overrides["resta"],
                             Path(tmp) / "resta")
                row["eval"] = ev(path)
            finish(row, start)
            continue
        s = dataclasses.replace(base, **overrides)
        if s.rank not in genes:
            genes[s.rank] = extract(fam.member("aligned"), [fam.member(m) for m in COUNTERPARTS[args.kind]], rank=s.rank)
        gene = genes[s.rank]
        if kind == "global":
            coefficients = {str(layer): 1.0 for layer in gene.layers}
        else:
            key = (per_module, dna_shots, *sorted(overrides.items()))
            if key not in recalibrated:
                harmful, harmless, keep = few_shot_pools(fam, s)
                if dna_shots:  # a diagnostic the study's rule excludes: past both evaluation splits
                    harmful = donotanswer_order(fam.seed)[2 * base.donotanswer:]
                harm = chat(tok, harmful[:args.shots])
                if s.layers >= len(gene.layers):
                    layers = list(gene.layers)
                else:
                    layers = select_layers(gene, a_model, d_models, tok, harm, chat(tok, harmless[:args.shots]),
                                           refusal=REFUSAL, compliance=COMPLIANCE, scorer=s.scorer, k=s.layers)["layers"]
                cal = gradient(t_model, tok, gene, layers, FewShot(harm, REFUSAL, chat(tok, keep)),
                               alpha_max=s.alpha_max, steps=s.steps, lr=s.lr, init=1.0, batch=s.batch,
                               max_new_tokens=ev.task.max_new_tokens, per_module=per_module)
                recalibrated[key] = (cal.coefficients, layers, {k: [cal.log[0][k], cal.log[-1][k]]
                                                               for k in ("loss", "refusal_loss", "task_loss")})
            coefficients, layers, loss = recalibrated[key]
            row.update(layers=layers, loss=loss)
        coefficients = {k: scale * v for k, v in coefficients.items()}
        row["recalibrate_seconds"] = round(time.perf_counter() - start, 1)
        patched = sorted({gene.modules[k].layer if per_module else int(k) for k in coefficients})
        with GenePatch(t_model, gene, patched, per_module) as patch:
            patch.set(coefficients)
            row["eval"] = ev.model(t_model, tok)
        row["coefficients"] = coefficients
        finish(row, start)
    save()


if __name__ == "__main__":
    main()
