"""Progress of a streaming pass: one tqdm bar on stderr counting bytes (so it shows GB/s) and tensors."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """``with Progress("apply", total_bytes, total_tensors, enabled) as p: ... p.advance(nbytes)``.

    Disabled, it only counts, so callers never branch on whether a bar is shown.
    """

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
        self.tensors, self.total_tensors = 0, total_tensors
        self.bytes = 0
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                         file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=True,
                         postfix=f"0/{total_tensors} tensors")

    def advance(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        self._bar.update(nbytes)
        self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
