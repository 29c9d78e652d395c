"""Shared fixtures, the tolerance table and comparison helpers for the op tests."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

import safegene_fast as sg
from safegene_fast import _C

FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Awkward sizes: not multiples of any vector width, tile or chunk; plus one non-square matrix.
SHAPES = [(1,), (7,), (769,), (5125,), (1000, 3001)]

# Tolerances, in one place. Results that are exact by specification are compared bit for bit
# (delta with one source, merge_dense_); the rest against the float64 reference:
TOLERANCE = {
    # delta with K > 1 sums K values in fp32 and divides once: a few fp32 ulps of the inputs'
    # magnitude (inputs here are O(1)).
    "delta_mean_atol": 4e-6,
    # merge_lowrank_: an fp32 GEMM over r terms, then one rounding to w's dtype. The error is at
    # most this fraction of the largest |alpha * (B @ A)| entry (fp32 accumulation), plus one
    # unit in the last place of w's dtype (the final rounding of a slightly-off fp32 value).
    "lowrank_fp32_rtol": 2e-6,
    # rsvd at the defaults (oversample 8, 2 power iterations): Frobenius error at most 1% above
    # the optimal truncated SVD's (Eckart-Young).
    "rsvd_error_ratio": 1.01,
}

_CUDA_READY = torch.cuda.is_available() and sg.build_info()["cuda_built"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not _CUDA_READY, reason="needs a GPU and a CUDA build of safegene_fast")),
]

_ISAS = {"avx512": 2, "avx2": 1, "default": 0}
CPU_ISAS = [isa for isa, level in _ISAS.items() if level <= _ISAS[sg.build_info()["cpu_isa_best"]]]


@pytest.fixture(params=[f"cpu-{isa}" for isa in CPU_ISAS] + DEVICES[1:])
def backend(request):
    """The device to run a fused loop on, once per compiled CPU variant this CPU can execute
    (avx512, avx2, default) and once on CUDA."""
    if request.param == "cuda":
        yield "cuda"
        return
    before = sg.build_info()["cpu_isa"]
    _C.set_cpu_isa(request.param.removeprefix("cpu-"))
    yield "cpu"
    _C.set_cpu_isa(before)


def random(shape, dtype, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bit pattern everywhere, except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    actual, expected = actual.cpu(), expected.cpu()
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"NaN at different places: {int((nan_a != nan_e).sum())}"
    keep = ~nan_a
    bad = _int_view(actual)[keep] != _int_view(expected)[keep]
    assert not bad.any(), (
        f"{int(bad.sum())} of {int(keep.sum())} values differ in their bits; first: "
        f"{actual[keep][bad][:4].tolist()} vs {expected[keep][bad][:4].tolist()}")


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values around each float64 value (subnormal spacing near 0)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(exact.double())  # exact = mantissa * 2**exponent, mantissa in [0.5, 1)
    eps = torch.full_like(exact, info.eps, dtype=torch.float64)
    return torch.ldexp(eps, exponent - 1).clamp_min(info.smallest_normal * info.eps)


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


@contextlib.contextmanager
def peak_rss_growth():
    """Measures how far peak resident memory rises above its level at entry (MiB, in .mib)."""
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak to the current RSS
        f.write("5")
    result = types.SimpleNamespace(mib=0.0)
    base = _peak_rss_kib()
    yield result
    result.mib = (_peak_rss_kib() - base) / 1024


@pytest.fixture(scope="session")
def tiny_family():
    """The embedded family's smallest configuration, built once (about a minute) and cached."""
    from safegene_fast.models.toy import build_family
    return build_family("tiny", progress=False)
