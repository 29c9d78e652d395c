"""The ops of safegene_fast.ops in plain torch: the test oracle.

delta and merge_lowrank_ are computed in float64 (ground truth). merge_dense_ is specified as
torch's own float32 expression, so its reference is exactly that expression. rsvd's reference
is the optimal truncated SVD (float64 full SVD).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def delta(a: torch.Tensor, b: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 ``a - mean(b)``."""
    b = [b] if isinstance(b, torch.Tensor) else list(b)
    return a.double() - torch.stack([x.double() for x in b]).mean(0)


def merge_dense(w: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor:
    """``round(w + alpha * d)`` as torch computes it: the bit-exact specification."""
    return (w.float() + alpha * d.float()).to(w.dtype)


def merge_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> tuple[torch.Tensor, int]:
    """``round(w + alpha * (a - b))`` as torch computes it with ``a - b`` in float32 (the
    bit-exact specification), w's value where ``a - b`` is not finite; and how many those are."""
    d = a.float() - b.float()
    bad = ~torch.isfinite(d)
    return torch.where(bad, w, merge_dense(w, d, alpha)), int(bad.sum())


def merge_lowrank(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    """float64 ``w + alpha * B @ A``, rounded once to w's dtype."""
    return (w.double() + alpha * (B.double() @ A.double())).to(w.dtype)


def truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimal rank-``rank`` factors (Eckart-Young) in float64: U (m, r), S (r,), V (n, r)."""
    U, S, Vh = torch.linalg.svd(a.double(), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank].T


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest r whose top singular values keep ``energy`` of sum(S**2)."""
    kept = (S.double() ** 2).cumsum(0) / (S.double() ** 2).sum()
    return int((kept < energy).sum()) + 1
