"""Typed wrappers over the native ops ``torch.ops.safegene_fast.*`` (schemas: csrc/bindings.cpp).

All floating tensors may be bfloat16, float16 or float32 and must be contiguous. Math is done in
float32 and rounded once to the output dtype (round-to-nearest-even). The kernels run on the
device of their inputs: CPU always, CUDA when the package was built with CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from safegene_fast import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "safegene_fast's native module _C is not built or does not match this torch "
        f"({exc}); build it with: pip install --no-build-isolation -e ."
    ) from exc

_ops = torch.ops.safegene_fast

Tensors = torch.Tensor | Sequence[torch.Tensor]


def build_info() -> dict:
    """What the native module was built with: version, torch, CPU ISA in use, CUDA and archs."""
    return dict(_C.build_info())


def _as_list(b: Tensors) -> list[torch.Tensor]:
    return [b] if isinstance(b, torch.Tensor) else list(b)


CPU_ONLY = ("safegene_fast was built with CPU kernels only, so it cannot run on CUDA tensors; rebuild it "
            "with a CUDA build of torch and nvcc: SAFEGENE_CUDA=1 pip install --no-build-isolation -e .")


def _require_built_device(*tensors: torch.Tensor) -> None:
    """Say what was built, and how to rebuild, when a CUDA tensor meets a CPU-only build."""
    if any(t.is_cuda for t in tensors) and not _C.build_info()["cuda_built"]:
        raise RuntimeError(CPU_ONLY)


def require_device(device: str | torch.device) -> torch.device:
    """The device a pass was asked to run on, if this build and machine can: a sentence
    saying what is missing otherwise (before any byte moves, not deep inside a kernel call)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a device; use cpu or cuda.") from None
    if device.type == "cuda":
        if not _C.build_info()["cuda_built"]:
            raise RuntimeError(CPU_ONLY)
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA was asked for, but torch sees no CUDA device on this machine.")
    elif device.type != "cpu":
        raise ValueError(f"{device} is not supported; use cpu or cuda.")
    return device


def delta(a: torch.Tensor, b: Tensors) -> torch.Tensor:
    """``a - mean(b)`` in float32.

    a: any shape. b: one tensor or K (1..16) tensors of a's shape (the degraded models).
    Returns a new float32 tensor of a's shape.
    """
    b = _as_list(b)
    _require_built_device(a, *b)
    return _ops.delta(a, b)


def delta_out(a: torch.Tensor, b: Tensors, out: torch.Tensor) -> torch.Tensor:
    """``delta`` written into ``out`` (float32, a's shape, contiguous); returns ``out``."""
    b = _as_list(b)
    _require_built_device(a, out, *b)
    _ops.delta_out(a, b, out)
    return out


def merge_dense_(w: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place ``w = round(w + alpha * d)``; returns ``w``.

    w: any shape. d: w's shape, any supported dtype. Bit-identical to
    ``(w.float() + alpha * d.float()).to(w.dtype)``, in one pass without temporaries.
    """
    _require_built_device(w, d)
    _ops.merge_dense_(w, d, float(alpha))
    return w


def merge_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``out = round(w + alpha * (a - b))``; returns ``(out, nonfinite)``.

    w: any shape. a, b: w's shape, any supported dtypes. out: w's shape and dtype, contiguous
    (default: a new tensor; may be w itself). ``a - b`` is taken in float32, so the result is
    bit-identical to ``merge_dense_(w, delta(a, [b]), alpha)``, in one pass with no float32
    delta in memory. Where ``a - b`` is NaN or Inf, ``out`` keeps w's value; ``nonfinite``
    counts those elements. RESTA's ``T + alpha * (A - D)``.
    """
    if out is None:
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
    _require_built_device(w, a, b, out)
    bad = _ops.merge_diff(w, a, b, float(alpha), out)
    return out, int(bad)


def merge_lowrank_(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place ``w = round(w + alpha * B @ A)``; returns ``w``.

    w: (out, in). B: (out, r). A: (r, in). Works over row blocks with a bounded float32
    workspace (a few MiB), never a float32 copy of w.
    """
    _require_built_device(w, B, A)
    _ops.merge_lowrank_(w, B, A, float(alpha))
    return w


def rsvd(
    a: torch.Tensor,
    b: Tensors = (),
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``a`` or of ``a - mean(b)``: returns U (m, r), S (r,), V (n, r).

    a: (m, n); b: none, one or K tensors of a's shape. Give ``rank`` for a fixed rank, or
    ``energy`` (in (0, 1]) for the smallest rank keeping that fraction of the squared Frobenius
    norm, capped by ``max_rank``. Gaussian sketch with ``oversample`` extra columns and
    ``power_iters`` power iterations (re-orthonormalized after every product); the same
    ``seed`` gives the same factors. Float32 results on a's device.
    """
    if (rank is None) == (energy is None):
        raise ValueError("rsvd: give exactly one of rank= or energy=.")
    b = _as_list(b)
    _require_built_device(a, *b)
    return _ops.rsvd(
        a, b, int(rank or 0), int(oversample), int(power_iters), int(seed),
        float(energy or 0.0), int(max_rank or 0),
    )


def lora_factors(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an SVD into LoRA factors: B = U sqrt(S) (m, r) and A = sqrt(S) V^T (r, n)."""
    root = S.sqrt()
    B = U * root
    A = (V * root).T.contiguous()
    return (B, A) if dtype is None else (B.to(dtype), A.to(dtype))


def rsvd_lora(a: torch.Tensor, b: Tensors = (), *, dtype: torch.dtype | None = None, **kwargs):
    """``rsvd`` returning LoRA factors: B (m, r), A (r, n) and the kept singular values S (r,)."""
    U, S, V = rsvd(a, b, **kwargs)
    B, A = lora_factors(U, S, V, dtype)
    return B, A, S


# Shapes and dtypes without running the kernels (torch.compile, FakeTensor, meta).
@torch.library.register_fake("safegene_fast::delta")
def _delta_fake(a, b):
    return a.new_empty(a.shape, dtype=torch.float32)


@torch.library.register_fake("safegene_fast::delta_out")
def _delta_out_fake(a, b, out):
    return None


@torch.library.register_fake("safegene_fast::merge_dense_")
def _merge_dense_fake(w, d, alpha):
    return None


@torch.library.register_fake("safegene_fast::merge_diff")
def _merge_diff_fake(w, a, b, alpha, out):
    return w.new_empty((), dtype=torch.int64)


@torch.library.register_fake("safegene_fast::merge_lowrank_")
def _merge_lowrank_fake(w, B, A, alpha):
    return None


@torch.library.register_fake("safegene_fast::rsvd")
def _rsvd_fake(a, b, rank, oversample, power_iters, seed, energy, max_rank):
    m, n = a.shape
    if rank > 0:
        r = min(rank, m, n, max_rank if max_rank > 0 else rank)
    else:  # chosen from the singular values at run time
        r = torch.library.get_ctx().new_dynamic_size()
    f32 = dict(dtype=torch.float32)
    return a.new_empty((m, r), **f32), a.new_empty((r,), **f32), a.new_empty((n, r), **f32)
