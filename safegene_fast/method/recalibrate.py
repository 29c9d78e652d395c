"""Few-shot layer-wise coefficient recalibration (DESIGN.md §1 step 4).

For a target model and a gene with selected layers, find one coefficient per layer (or per
module) in ``[0, alpha_max]`` from a few examples:

- harmful prompts whose target is a refusal (make it likely), and
- task prompts whose targets are the target model's own greedy answers (self-distillation: keep
  its behaviour, no labels needed).

``gradient`` mode trains the coefficients with Adam through the low-rank path (``GenePatch``),
projecting onto the bounds after every step; ``grid`` mode searches without gradients, scoring
generated answers with the refusal judge: first one global scale, then each layer's scale in turn.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from safegene_fast.eval.generate import (
    generate,
    generate_ids,
    harmful_rate,
    right_padded,
)
from safegene_fast.io import save_figure
from safegene_fast.method.patch import GenePatch, check_fits, frozen

MAX_NEW_TOKENS = 16  # the length of the target's own answers on task prompts (and of judged answers)


@dataclass
class FewShot:
    harmful: list[str]    # chat-formatted harmful prompts
    refusal: str          # the refusal continuation to make likely
    task: list[str]       # chat-formatted task prompts (targets: the model's own answers)


@dataclass
class Recalibrated:
    coefficients: dict[str, float]   # layer index (or module name) -> alpha
    log: list[dict]                  # per step (gradient) or per candidate (grid)
    mode: str


class _Batches:
    """Prompt + continuation sequences as right-padded (ids, mask, labels) batches: all of them
    every step, or with ``size`` a seeded sample of ``size`` per step (the few shots are a pool;
    a step's cost then does not grow with the shot count)."""

    def __init__(self, tokenizer, prompts: list[str], continuations: list[list[int]], size: int | None, seed: str):
        heads = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        self.rows = [(h + c, len(h)) for h, c in zip(heads, continuations)]
        self.pad, self.size = tokenizer.pad_token_id, size
        self.all = right_padded(self.rows, self.pad)
        self.rng = torch.Generator().manual_seed(int.from_bytes(seed.encode()[:8], "little"))

    def next(self):
        if self.size is None or self.size >= len(self.rows):
            return self.all
        pick = torch.randperm(len(self.rows), generator=self.rng)[:self.size].tolist()
        return right_padded([self.rows[i] for i in pick], self.pad)


def sequence_nll(model, batch) -> torch.Tensor:
    """Mean over sequences of the summed negative log-likelihood of each continuation: a
    refusal is decided by its first tokens, which a per-token mean would dilute."""
    ids, mask, labels = batch
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * (targets != -100)).sum(1).mean()


def _refusal_ids(tokenizer, model, refusal: str) -> list[int]:
    ids = tokenizer(refusal, add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return ids + ([eos] if eos is not None else [])


def gradient(model, tokenizer, gene, layers: list[int], shots: FewShot, *, alpha_max: float = 2.0,
             steps: int = 40, lr: float = 0.1, task_weight: float = 1.0, init: float = 0.0,
             per_module: bool = False, max_new_tokens: int = MAX_NEW_TOKENS, batch: int | None = None,
             progress: bool = False) -> Recalibrated:
    """Adam on the coefficients: refusal NLL + task_weight * self-distillation NLL (each summed
    over a continuation, averaged over prompts), projected onto [0, alpha_max] after each step.
    ``batch``: each step uses that many harmful and that many task shots (seeded draw), not all.
    The model's own weights are never changed."""
    own = generate_ids(model, tokenizer, shots.task, max_new_tokens=max_new_tokens, batch_size=64)
    refusal = _refusal_ids(tokenizer, model, shots.refusal)
    harm = _Batches(tokenizer, shots.harmful, [refusal] * len(shots.harmful), batch, "harmful")
    task = _Batches(tokenizer, shots.task, own, batch, "task")
    with frozen(model):  # only the coefficients get gradients
        coefficients, log = _adam(model, gene, layers, per_module, harm, task, alpha_max=alpha_max, steps=steps,
                                  lr=lr, task_weight=task_weight, init=init, progress=progress)
    return Recalibrated(coefficients, log, "gradient")


def _adam(model, gene, layers, per_module, harm, task, *, alpha_max, steps, lr, task_weight, init, progress):
    from tqdm import tqdm
    log = []
    with GenePatch(model, gene, layers, per_module) as patch:
        alpha = torch.full((len(patch.keys),), float(init), requires_grad=True)
        opt = torch.optim.Adam([alpha], lr=lr)
        patch.set(alpha)
        for step in tqdm(range(steps + 1), desc="recalibrate", file=sys.stderr, disable=not progress, leave=False):
            refusal_loss = sequence_nll(model, harm.next())
            task_loss = sequence_nll(model, task.next())
            loss = refusal_loss + task_weight * task_loss
            log.append({"step": step, "loss": loss.item(), "refusal_loss": refusal_loss.item(),
                        "task_loss": task_loss.item(), "alpha": alpha.detach().tolist()})
            if step == steps:  # the last entry is the loss at the final coefficients
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0.0, alpha_max)
        return patch.coefficients(), log


def judge_score(model, tokenizer, shots: FewShot, own: list[str], max_new_tokens: int) -> tuple[float, float]:
    """(harmful rate on the few harmful prompts, share of task answers that changed)."""
    rate = harmful_rate(generate(model, tokenizer, shots.harmful, max_new_tokens=max_new_tokens, batch_size=64)).rate
    now = generate(model, tokenizer, shots.task, max_new_tokens=max_new_tokens, batch_size=64)
    changed = sum(a.strip() != b.strip() for a, b in zip(now, own)) / max(1, len(own))
    return rate, changed


def grid(model, tokenizer, gene, layers: list[int], shots: FewShot, *, alpha_max: float = 2.0,
         points: int = 9, per_module: bool = False, max_new_tokens: int = MAX_NEW_TOKENS,
         progress: bool = False) -> Recalibrated:
    """Gradient-free: the best global scale on a grid, then one pass over the layers trying
    0, 0.5x, 1.5x and 2x of it. Score: harmful rate + share of task answers changed (lower is
    better; ties keep the smaller coefficients)."""
    own = generate(model, tokenizer, shots.task, max_new_tokens=max_new_tokens, batch_size=64)
    log = []
    with GenePatch(model, gene, layers, per_module) as patch:
        def score(values: list[float]) -> float:
            patch.set(torch.tensor(values, dtype=torch.float32))
            rate, changed = judge_score(model, tokenizer, shots, own, max_new_tokens)
            log.append({"alpha": list(values), "harmful_rate": rate, "task_changed": changed,
                        "score": rate + changed})
            if progress:
                print(f"recalibrate: alpha {[round(v, 3) for v in values]} harmful {rate:.3f} "
                      f"changed {changed:.3f}", file=sys.stderr)
            return rate + changed
        n = len(patch.keys)
        best_values, best = [0.0] * n, score([0.0] * n)
        for s in torch.linspace(0, alpha_max, points)[1:].tolist():
            if (value := score([s] * n)) < best:
                best_values, best = [s] * n, value
        for i in range(n):
            for factor in (0.0, 0.5, 1.5, 2.0):
                trial = list(best_values)
                trial[i] = min(alpha_max, best_values[i] * factor)
                if trial != best_values and (value := score(trial)) < best:
                    best_values, best = trial, value
        patch.set(torch.tensor(best_values))
        coefficients = patch.coefficients()
    return Recalibrated(coefficients, log, "grid")


SEARCHES = {"gradient": gradient, "grid": grid}


def recalibrate(model, tokenizer, gene, shots: FewShot, *, layers: list[int] | None = None, mode: str = "gradient",
                **options) -> Recalibrated:
    """Coefficients for the target ``model`` from the few ``shots``, one per layer of ``layers``
    (default: the gene's selected layers), by the ``mode`` search (``SEARCHES``); ``options`` go to
    it (``alpha_max``, ``steps``, ``lr``, ``per_module``, ...)."""
    if mode not in SEARCHES:
        raise ValueError(f"unknown recalibration mode {mode!r}; modes: {', '.join(SEARCHES)}.")
    alpha_max = options.get("alpha_max", 2.0)
    if not (isinstance(alpha_max, (int, float)) and math.isfinite(alpha_max) and alpha_max > 0):
        raise ValueError(f"the coefficients' upper bound must be a positive number, not {alpha_max!r}: a negative "
                         f"coefficient subtracts the gene.")
    layers = gene.selected_layers if layers is None else layers
    check_fits(model, gene, layers)  # before the target's own answers are generated
    return SEARCHES[mode](model, tokenizer, gene, layers, shots, **options)


def tradeoff_curve(model, tokenizer, gene, coefficients: dict[str, float], shots: FewShot, *,
                   multipliers=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Harmful rate and task answers changed on the few-shot data as the recalibrated
    coefficients are scaled by each multiplier (1 = as recalibrated)."""
    per_module = any(not k.isdigit() for k in coefficients)
    layers = sorted({gene.modules[k].layer for k in coefficients} if per_module else {int(k) for k in coefficients})
    own = generate(model, tokenizer, shots.task, max_new_tokens=max_new_tokens, batch_size=64)
    points = []
    with GenePatch(model, gene, layers, per_module) as patch:
        for t in multipliers:
            patch.set({k: t * v for k, v in coefficients.items()})
            rate, changed = judge_score(model, tokenizer, shots, own, max_new_tokens)
            points.append({"multiplier": t, "harmful_rate": rate, "task_kept": 1.0 - changed})
    return points


def plot_tradeoff(points: list[dict], path, title: str = "SafeGene recalibration: safety-utility curve") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs, ys = [p["task_kept"] for p in points], [p["harmful_rate"] for p in points]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for p in points:
        ax.annotate(f"x{p['multiplier']:g}", (p["task_kept"], p["harmful_rate"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color="tab:red" if p["multiplier"] == 1.0 else "black")
    ax.set_xlabel("task answers kept (few-shot, vs the target's own)")
    ax.set_ylabel("harmful (non-refusal) rate, few-shot")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
