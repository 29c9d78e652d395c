"""Recalibration on a tiny random Llama: bounds, the loss it lowers, the log, the curve."""

import copy

import pytest
import torch
from test_selection import gene_of, random_llama

from safegene_fast.method.recalibrate import (
    FewShot,
    gradient,
    grid,
    plot_tradeoff,
    tradeoff_curve,
)

HARMFUL = ["make a bomb", "steal a car", "hack a bank", "poison food"]
TASK = ["sort 3 1 2", "sort 9 5", "sort 4 4 1", "sort 7 2"]
REFUSAL = "no"


@pytest.fixture(scope="module")
def setup():
    """degraded: a random model; aligned: it, trained a little to answer harmful prompts with "no"."""
    degraded, tok = random_llama()
    aligned = copy.deepcopy(degraded).train()
    # train only what a gene covers (the blocks' linear weights), so the gene at 1 is aligned
    params = [p for n, p in aligned.named_parameters() if ".layers." in n and p.dim() == 2]
    opt = torch.optim.Adam(params, lr=3e-3)
    ids = [tok(p + REFUSAL, add_special_tokens=False)["input_ids"] + [2] for p in HARMFUL]
    batch = torch.tensor([i + [0] * (max(map(len, ids)) - len(i)) for i in ids])
    for _ in range(60):
        loss = aligned(input_ids=batch, labels=batch.masked_fill(batch == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    aligned.eval()
    return degraded, gene_of(aligned, degraded), tok, FewShot(HARMFUL, REFUSAL, TASK)


def test_gradient_lowers_the_loss_within_bounds(setup):
    model, gene, tok, shots = setup
    result = gradient(model, tok, gene, [0, 1, 2], shots, alpha_max=1.5, steps=15, lr=0.2, max_new_tokens=4)
    assert result.mode == "gradient" and set(result.coefficients) == {"0", "1", "2"}
    assert all(0.0 <= a <= 1.5 for a in result.coefficients.values())
    assert len(result.log) == 16 and result.log[0]["alpha"] == [0.0, 0.0, 0.0]
    assert result.log[-1]["refusal_loss"] < result.log[0]["refusal_loss"] - 0.5
    assert result.log[-1]["alpha"] == pytest.approx(list(result.coefficients.values()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradient(model, tok, gene, [1], shots, steps=3, max_new_tokens=4)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # weights are never trained
    assert all(p.requires_grad for p in model.parameters())  # and the caller's flags are restored


def test_gradient_respects_a_tight_bound_and_the_task_weight(setup):
    model, gene, tok, shots = setup
    tight = gradient(model, tok, gene, [0, 1, 2], shots, alpha_max=0.25, steps=10, lr=0.2, max_new_tokens=4)
    assert all(0.0 <= a <= 0.25 for a in tight.coefficients.values())
    per_module = gradient(model, tok, gene, [2], shots, steps=2, per_module=True, max_new_tokens=4)
    assert len(per_module.coefficients) == 7 and all(k.startswith("model.layers.2.") for k in per_module.coefficients)


def test_gradient_minibatches_draw_from_the_shot_pool(setup):
    """batch >= the pool is the full-batch run, bit for bit; a smaller batch still trains within
    bounds, and its draws are seeded (two runs agree)."""
    model, gene, tok, shots = setup
    full = gradient(model, tok, gene, [0, 1, 2], shots, steps=6, lr=0.2, max_new_tokens=4)
    same = gradient(model, tok, gene, [0, 1, 2], shots, steps=6, lr=0.2, max_new_tokens=4, batch=len(HARMFUL))
    assert same.log == full.log
    small = [gradient(model, tok, gene, [0, 1, 2], shots, steps=6, lr=0.2, max_new_tokens=4, batch=2) for _ in range(2)]
    assert small[0].log == small[1].log and small[0].log != full.log
    assert all(0.0 <= a <= 2.0 for a in small[0].coefficients.values())


def test_grid_stays_in_bounds_and_never_scores_worse_than_nothing(setup):
    model, gene, tok, shots = setup
    result = grid(model, tok, gene, [0, 1], shots, alpha_max=1.0, points=3, max_new_tokens=4)
    assert result.mode == "grid" and all(0.0 <= a <= 1.0 for a in result.coefficients.values())
    zero = result.log[0]
    assert zero["alpha"] == [0.0, 0.0] and zero["task_changed"] == 0.0
    best = min(entry["score"] for entry in result.log)
    chosen = [e for e in result.log if e["alpha"] == list(result.coefficients.values())][0]
    assert chosen["score"] == best <= zero["score"]


def test_tradeoff_curve_starts_at_the_target_and_plots(setup, tmp_path):
    model, gene, tok, shots = setup
    points = tradeoff_curve(model, tok, gene, {"0": 0.5, "1": 0.5}, shots, multipliers=(0.0, 1.0), max_new_tokens=4)
    assert points[0]["multiplier"] == 0.0 and points[0]["task_kept"] == 1.0
    plot_tradeoff(points, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"

