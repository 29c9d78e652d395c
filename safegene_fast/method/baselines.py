"""The baselines every SafeGene result is compared with on the same harness (DESIGN.md §1):

- RESTA, ``T + b (A - D)`` on every floating tensor with one global ``b`` (the streamed pass is
  ``pipeline.resta``); its best ``b`` is chosen from a sweep by ``best_resta``;
- the gene at one global coefficient on every layer (``gene_global``), no selection, no recalibration.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from safegene_fast.gene import SafetyGene
from safegene_fast.pipeline import apply_merged, resta

GLOBAL_COEFFICIENT = 1.0

__all__ = ["GLOBAL_COEFFICIENT", "best_resta", "gene_global", "resta"]


def gene_global(target: str | os.PathLike, gene: SafetyGene, out: str | os.PathLike,
                coefficient: float = GLOBAL_COEFFICIENT, **kw) -> Path:
    """The target with the whole gene merged at one coefficient."""
    return apply_merged(target, gene, out, coefficient, **kw)


def best_resta(sweep: list[dict], target_accuracy: float, tolerance: float, *,
               harmful: Callable[[dict], float], accuracy: Callable[[dict], float]) -> dict:
    """RESTA's best b: among the sweep's rows (each with ``b``; ``harmful(row)`` and
    ``accuracy(row)`` read its rates), the lowest harmful rate whose accuracy is within
    ``tolerance`` of the target's, else the most accurate. Returns that row."""
    ok = [r for r in sweep if accuracy(r) >= target_accuracy - tolerance - 1e-9]
    if ok:
        return min(ok, key=lambda r: (harmful(r), -accuracy(r), r["b"]))
    return max(sweep, key=lambda r: (accuracy(r), -harmful(r)))
