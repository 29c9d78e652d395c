"""merge_diff: out = round(w + alpha*(a - b)), bit for bit against torch's expression and against
merge_dense_(w, delta(a, [b])); non-finite a - b keeps w and is counted."""

import math

import pytest
import torch
from conftest import FLOAT_DTYPES, SHAPES, assert_bits_equal, random

import safegene_fast as sg
from safegene_fast import ops
from safegene_fast import reference as ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("ab_dtype", FLOAT_DTYPES)
def test_bit_exact(backend, shape, w_dtype, ab_dtype):
    w = random(shape, w_dtype, backend, scale=4.0, seed=1)
    a = random(shape, ab_dtype, backend, seed=2)
    b = random(shape, ab_dtype, backend, seed=3)
    expected, expected_bad = ref.merge_diff(w, a, b, 0.3711)
    out, bad = ops.merge_diff(w, a, b, 0.3711)
    assert bad == expected_bad == 0
    assert_bits_equal(out, expected)
    # the same as the two-pass path resta used before: delta_out then merge_dense_
    two_pass = sg.merge_dense_(w.clone(), ops.delta(a, [b]), 0.3711)
    assert_bits_equal(out, two_pass)


def test_mixed_source_dtypes_and_in_place(backend):
    w = random((1000, 3001), torch.bfloat16, backend, scale=10.0, seed=3)
    a = random((1000, 3001), torch.float16, backend, seed=4)
    b = random((1000, 3001), torch.float32, backend, seed=5)
    expected, _ = ref.merge_diff(w, a, b, -2.5)
    out, bad = ops.merge_diff(w, a, b, -2.5, out=w)  # in place
    assert out is w and bad == 0
    assert_bits_equal(w, expected)


@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 1.0, -2.5, 1e-3, 3e4])
def test_bit_exact_alphas(backend, w_dtype, alpha):
    w = random((1000, 3001), w_dtype, backend, scale=10.0, seed=3)
    a = random((1000, 3001), torch.bfloat16, backend, seed=4)
    b = random((1000, 3001), torch.bfloat16, backend, seed=5)
    out = torch.empty_like(w)
    ops.merge_diff(w, a, b, alpha, out)
    assert_bits_equal(out, ref.merge_diff(w, a, b, alpha)[0])


def special_values():
    """NaN, infinities, signed zeros, subnormals, overflow edges and rounding ties."""
    info = torch.finfo(torch.float32)
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, info.max, -info.max, info.tiny,
              info.tiny / 4, -info.tiny / 8, 1.0, -1.0, 65504.0, 65520.0, -65519.0, 3.4e38,
              3.3961775e38, 1e-40, -1e-45, 6e-8, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 3 * 2**-11)]
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("ab_dtype", FLOAT_DTYPES)
def test_special_values(backend, w_dtype, ab_dtype):
    # Every triple of special values: NaN/Inf sources (kept w, counted), a - b overflowing to
    # Inf in float32 (counted), finite deltas whose merge overflows (not counted: the delta is
    # finite), subnormals, signed zeros (a kept -0.0 stays -0.0) and ties to even.
    s = special_values()
    n = len(s)
    w = s.repeat_interleave(n * n).to(w_dtype).to(backend)
    a = s.repeat_interleave(n).repeat(n).to(ab_dtype).to(backend)
    b = s.repeat(n * n).to(ab_dtype).to(backend)
    for alpha in (1.0, 0.5, -1.0):
        expected, expected_bad = ref.merge_diff(w, a, b, alpha)
        out, bad = ops.merge_diff(w, a, b, alpha)
        assert bad == expected_bad > 0
        assert_bits_equal(out, expected)


def test_nonfinite_keeps_w_and_counts(backend):
    w = torch.tensor([1.0, -0.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16, device=backend)
    a = torch.tensor([1.0, math.nan, math.inf, 1.0, 3e38], device=backend)
    b = torch.tensor([0.5, 0.0, 0.0, -math.inf, -3e38], device=backend)
    out, bad = ops.merge_diff(w, a, b, 2.0)
    assert bad == 4  # NaN, Inf - 0, 1 - (-Inf), and 3e38 - (-3e38) overflowing in float32
    assert_bits_equal(out, torch.tensor([2.0, -0.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16, device=backend))


def test_counts_across_parallel_tasks(backend):
    w = torch.zeros(1_000_003, dtype=torch.bfloat16, device=backend)
    a = torch.ones(1_000_003, device=backend)
    a[::1000] = math.nan
    out, bad = ops.merge_diff(w, a, torch.zeros_like(a), 1.0)
    assert bad == len(range(0, 1_000_003, 1000))
    assert float(out.float().sum()) == 1_000_003 - bad


def test_errors_name_the_argument():
    w = torch.zeros(4, 5, dtype=torch.bfloat16)
    z = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"merge_diff: b has shape \[5, 4\] but w has shape \[4, 5\]"):
        ops.merge_diff(w, z, torch.zeros(5, 4), 1.0)
    with pytest.raises(TypeError, match="merge_diff: a has dtype Double"):
        ops.merge_diff(w, torch.zeros(4, 5, dtype=torch.float64), z, 1.0)
    with pytest.raises(TypeError, match="merge_diff: w has dtype Int"):
        ops.merge_diff(torch.zeros(4, 5, dtype=torch.int32), z, z, 1.0, torch.zeros(4, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="merge_diff: out has dtype Float but w has dtype BFloat16"):
        ops.merge_diff(w, z, z, 1.0, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="merge_diff: out is not contiguous"):
        ops.merge_diff(w, z, z, 1.0, torch.zeros(5, 4, dtype=torch.bfloat16).T)
    with pytest.raises(ValueError, match="merge_diff: a is not contiguous"):
        ops.merge_diff(w, torch.zeros(5, 4).T, z, 1.0)


def test_empty_tensor():
    w = torch.zeros(0, 7, dtype=torch.float16)
    out, bad = ops.merge_diff(w, torch.zeros(0, 7), torch.zeros(0, 7), 2.0)
    assert out.shape == (0, 7) and bad == 0


def test_opcheck():
    w = random((33, 65), torch.bfloat16)
    torch.library.opcheck(torch.ops.safegene_fast.merge_diff,
                          (w, random((33, 65), torch.float32, seed=1), random((33, 65), torch.bfloat16, seed=2),
                           0.5, torch.empty_like(w)))
