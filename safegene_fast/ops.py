"""Typed wrappers over the native ops ``torch.ops.safegene_fast.*`` (schemas: csrc/bindings.cpp).

All floating tensors may be bfloat16, float16 or float32 and must be contiguous. Math is done in
float32 and rounded once to the output dtype (round-to-nearest-even). The kernels run on the
device of their inputs: CPU always, CUDA when the package was built with CUDA.
"""

from __future__ import annotations

import math
import numbers
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
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the kernels read and write


def build_info() -> dict:
    """What the native module was built with: version, torch, CPU ISA in use, CUDA and archs."""
    return dict(_C.build_info())


def _as_list(op: str, b: Tensors) -> list[torch.Tensor]:
    """One tensor or a sequence of them (never a string, whose characters would be iterated)."""
    if isinstance(b, torch.Tensor):
        return [b]
    if isinstance(b, (str, bytes)) or not isinstance(b, Sequence) or not all(isinstance(t, torch.Tensor) for t in b):
        raise TypeError(f"{op}: b must be a tensor or a list of tensors, not {_kind(b)}.")
    return list(b)


def _kind(value) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, (list, tuple)) else \
        f"a {type(value).__name__} of {', '.join(sorted({type(v).__name__ for v in value})) or 'nothing'}"


def _tensors(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, not {_kind(t)}.")


def _writable(op: str, name: str, t: torch.Tensor) -> None:
    """A tensor an op writes in place must hold values and be outside autograd, which cannot see
    the write (the gradient of anything computed from it before would silently be wrong)."""
    if t.is_meta:
        raise ValueError(f"{op}: {name} is on the meta device, so it has no values to write in place.")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad, and autograd cannot track this in-place write; call it "
                         f"under torch.no_grad() or pass {name}.detach().")


def _real(op: str, name: str, value) -> float:
    """A finite real number (an int, a float or a numpy scalar; not a bool, a string or None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{op}: {name} must be a finite number, not {value!r}.")
    return float(value)


def _integer(op: str, name: str, value, low: int = 0) -> int:
    """A whole number >= ``low`` that fits the kernels' int64 (not a bool or a float such as 16.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an integer, not {value!r}.")
    if not low <= value < 2**63:
        bound = "positive" if low == 1 else f">= {low}"
        raise ValueError(f"{op}: {name} must be {bound} (an integer below 2**63), not {value}.")
    return int(value)


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
    _tensors("delta", a=a)
    b = _as_list("delta", b)
    _require_built_device(a, *b)
    return _ops.delta(a, b)


def delta_out(a: torch.Tensor, b: Tensors, out: torch.Tensor) -> torch.Tensor:
    """``delta`` written into ``out`` (float32, a's shape, contiguous); returns ``out``."""
    _tensors("delta_out", a=a, out=out)
    b = _as_list("delta_out", b)
    _writable("delta_out", "out", out)
    _require_built_device(a, out, *b)
    _ops.delta_out(a, b, out)
    return out


def merge_dense_(w: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place ``w = round(w + alpha * d)``; returns ``w``.

    w: any shape. d: w's shape, any supported dtype. Bit-identical to
    ``(w.float() + alpha * d.float()).to(w.dtype)``, in one pass without temporaries.
    """
    _tensors("merge_dense_", w=w, d=d)
    _writable("merge_dense_", "w", w)
    _require_built_device(w, d)
    _ops.merge_dense_(w, d, _real("merge_dense_", "alpha", alpha))
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
    _tensors("merge_diff", w=w, a=a, b=b)
    alpha = _real("merge_diff", "alpha", alpha)
    if out is None:
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
    _tensors("merge_diff", out=out)
    _writable("merge_diff", "out", out)
    _require_built_device(w, a, b, out)
    bad = _ops.merge_diff(w, a, b, alpha, out)
    return out, int(bad)


def merge_lowrank_(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place ``w = round(w + alpha * B @ A)``; returns ``w``.

    w: (out, in). B: (out, r). A: (r, in). Works over row blocks with a bounded float32
    workspace (a few MiB), never a float32 copy of w.
    """
    _tensors("merge_lowrank_", w=w, B=B, A=A)
    _writable("merge_lowrank_", "w", w)
    _require_built_device(w, B, A)
    _ops.merge_lowrank_(w, B, A, _real("merge_lowrank_", "alpha", alpha))
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
    _tensors("rsvd", a=a)
    b = _as_list("rsvd", b)
    rank = 0 if rank is None else _integer("rsvd", "rank", rank, low=1)
    energy = 0.0 if energy is None else _real("rsvd", "energy", energy)
    if energy and not 0.0 < energy <= 1.0:
        raise ValueError(f"rsvd: energy must be in (0, 1], not {energy!r}.")
    max_rank = 0 if max_rank is None else _integer("rsvd", "max_rank", max_rank, low=1)
    oversample = _integer("rsvd", "oversample", oversample)
    power_iters = _integer("rsvd", "power_iters", power_iters)
    seed = _integer("rsvd", "seed", seed)
    _require_built_device(a, *b)
    return _ops.rsvd(a, b, rank, oversample, power_iters, seed, energy, max_rank)


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
