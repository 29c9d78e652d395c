"""Data-aware layer selection (DESIGN.md §1 step 3): which layers of the gene carry safety.

Two scorers, each one number per layer (higher = keep):

- ``contrast``: how far the degraded model's hidden states are from the aligned model's on
  harmful prompts, minus the same on harmless prompts, at the last prompt token (where the
  answer is decided), relative to the aligned state's norm. The distance accumulates with
  depth, so a layer's score is the part its own block adds (the difference from the layer below).
- ``patch``: the refusal-proxy gain (``evaluate.refusal_margin``) when that layer's gene alone,
  at coefficient 1, is added to the degraded model through the low-rank path.

- ``slope``: how much more a layer's gene raises the refusal margin on harmful prompts than on
  harmless ones, to first order: d(margin)/d(alpha_l) at alpha = 0 on the harmful prompts minus
  the same on the harmless prompts. Every layer comes from one forward and backward pass per
  degraded model and prompt set, instead of one pass per layer (30 layers of SmolLM2 make
  ``patch`` the slow step of a study). Subtracting the harmless slope keeps the layers whose
  refusals are specific: on SmolLM2 the harmful slope alone favours the last layers, which raise
  refusals on benign prompts nearly as much (bench/results/smollm2_study.json).

``combined`` averages contrast and patch after scaling each by its largest magnitude. ``patch`` is the
default: it measures the refusal effect that recalibration will use. On the embedded family,
contrast favours the early layers, where harmful prompts are read differently, while the
refusal gain sits in the late ones (seed 1: combined picked layers 0, 1, 4 and held-out harmful
rate fell to 0.750; patch picked 3, 4, 5 and it fell to 0.537).
"""

from __future__ import annotations

import torch

from safegene_fast.eval.generate import ModelError, model_name, refusal_margin
from safegene_fast.io import save_figure
from safegene_fast.method.patch import GenePatch, check_fits, frozen

SCORERS = ("contrast", "patch", "slope", "combined")


@torch.inference_mode()
def _last_token_states(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(layers + 1, prompts, hidden) hidden states at each prompt's last token."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    out = model(**enc, output_hidden_states=True)
    return torch.stack([h[:, -1].double() for h in out.hidden_states])


def activation_contrast(aligned, degraded: list, tokenizer, harmful: list[str], harmless: list[str]) -> list[float]:
    """Per layer (0-based): the harmful-minus-harmless relative distance that layer adds."""
    def distance(prompts):
        ha = _last_token_states(aligned, tokenizer, prompts)
        rel = [(ha - _last_token_states(d, tokenizer, prompts)).norm(dim=-1).mean(-1) / ha.norm(dim=-1).mean(-1)
               for d in degraded]
        return torch.stack(rel).mean(0)  # (layers + 1,): index 0 is the embeddings
    contrast = distance(harmful) - distance(harmless)
    return (contrast[1:] - contrast[:-1]).tolist()


def patch_gain(degraded: list, gene, tokenizer, harmful: list[str], refusal: str, compliance: str) -> list[float]:
    """Per gene layer: mean refusal-margin gain of each degraded model with that layer's gene alone."""
    layers = gene.layers
    gains = torch.zeros(len(layers), dtype=torch.float64)
    for model in degraded:
        before = refusal_margin(model, tokenizer, harmful, refusal, compliance).mean()
        for i, layer in enumerate(layers):
            with GenePatch(model, gene, [layer]) as patch:
                patch.set(1.0)
                gains[i] += refusal_margin(model, tokenizer, harmful, refusal, compliance).mean() - before
    return (gains / len(degraded)).tolist()


def patch_slope(degraded: list, gene, tokenizer, harmful: list[str], refusal: str, compliance: str) -> list[float]:
    """Per gene layer: mean over the degraded models of d(mean refusal margin)/d(alpha_layer) at 0."""
    slopes = torch.zeros(len(gene.layers), dtype=torch.float64)
    for model in degraded:
        with frozen(model), GenePatch(model, gene) as patch:
            alpha = torch.zeros(len(patch.keys), dtype=torch.float64, requires_grad=True)
            patch.set(alpha)
            refusal_margin(model, tokenizer, harmful, refusal, compliance, grad=True).mean().backward()
            slopes += alpha.grad
    return (slopes / len(degraded)).tolist()


def combine(*scores: list[float]) -> list[float]:
    scaled = []
    for s in scores:
        t = torch.tensor(s, dtype=torch.float64)
        scaled.append(t / t.abs().max().clamp_min(1e-12))
    return torch.stack(scaled).mean(0).tolist()


def check_same_family(aligned, degraded: list) -> None:
    """Every degraded model has the aligned model's parameters, shape for shape: their hidden
    states are compared layer by layer, and the gene is patched into them."""
    shapes = {name: list(p.shape) for name, p in aligned.named_parameters()}
    for model in degraded:
        theirs = {name: list(p.shape) for name, p in model.named_parameters()}
        for name in [*shapes, *(n for n in theirs if n not in shapes)]:
            if shapes.get(name) != theirs.get(name):
                mine, other = model_name(model), f"the aligned model {model_name(aligned)}"
                problem = (f"parameter {name!r} is {theirs[name]} here but {shapes[name]} in {other}"
                           if name in theirs and name in shapes else
                           f"has parameter {name!r}, which {other} does not have" if name in theirs else
                           f"has no parameter {name!r}, which {other} has")
                raise ModelError(f"{mine}: {problem}; a degraded model must be of the aligned model's family.")


def choose(scores: dict[int, float], k: int | None = None, threshold: float | None = None) -> list[int]:
    """The top ``k`` layers by score, or those scoring at least ``threshold`` (sorted by index)."""
    if (k is None) == (threshold is None):
        raise ValueError("give exactly one of k (number of layers) and threshold.")
    ranked = sorted(scores, key=lambda layer: -scores[layer])
    picked = ranked[:k] if k is not None else [layer for layer in ranked if scores[layer] >= threshold]
    if not picked:  # an empty selection would make every later step a silent no-op
        best = max(scores.values(), default=float("nan"))
        raise ValueError(f"no layer scores at least {threshold:g} (the best scores {best:.4g}); "
                         f"nothing would be kept.")
    return sorted(picked)


def select_layers(gene, aligned, degraded: list, tokenizer, harmful: list[str], harmless: list[str], *,
                  refusal: str, compliance: str, scorer: str = "patch", k: int | None = None,
                  threshold: float | None = None) -> dict:
    """Scores every gene layer and picks the layers to keep; returns the selection record that
    ``SafetyGene.selection`` stores (scorer, every score, the layers kept)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}.")
    check_same_family(aligned, degraded)  # then the gene fits them all if it fits the aligned model
    check_fits(aligned, gene)  # before any pass: a gene from another family fails deep inside one
    layers = gene.layers
    contrast = activation_contrast(aligned, degraded, tokenizer, harmful, harmless)
    scores = {"contrast": [contrast[layer] for layer in layers]}
    if scorer == "slope":  # the cheap scorer does not pay for the per-layer patches
        scores["slope_harmful"] = patch_slope(degraded, gene, tokenizer, harmful, refusal, compliance)
        scores["slope_harmless"] = patch_slope(degraded, gene, tokenizer, harmless, refusal, compliance)
        scores["slope"] = [a - b for a, b in zip(scores["slope_harmful"], scores["slope_harmless"])]
    else:
        scores["patch"] = patch_gain(degraded, gene, tokenizer, harmful, refusal, compliance)
        scores["combined"] = combine(scores["contrast"], scores["patch"])
    return {"scorer": scorer, "k": k, "threshold": threshold, "n_harmful": len(harmful), "n_harmless": len(harmless),
            "scores": {name: dict(zip(map(str, layers), values)) for name, values in scores.items()},
            "layers": choose(dict(zip(layers, scores[scorer])), k, threshold)}


def plot_scores(selection: dict, path) -> None:
    """Bar plot of every scorer's per-layer scores, the kept layers marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(selection["scores"])
    layers = [int(x) for x in selection["scores"][names[0]]]
    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, 0.35 * len(layers) + 2), 2.2 * len(names)), sharex=True)
    for ax, name in zip(axes, names):
        values = [selection["scores"][name][str(layer)] for layer in layers]
        colors = ["tab:red" if layer in selection["layers"] else "tab:gray" for layer in layers]
        ax.bar(layers, values, color=colors)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel(name + (" (used)" if name == selection["scorer"] else ""))
    axes[-1].set_xlabel("layer (red: selected)")
    fig.suptitle("SafeGene layer scores")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
