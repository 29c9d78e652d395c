"""merge_dense_: w = round(w + alpha*d) in place, bit for bit against torch's expression."""

import math

import pytest
import torch
from conftest import FLOAT_DTYPES, SHAPES, assert_bits_equal, random

import safegene_fast as sg
from safegene_fast import reference as ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d_dtype", FLOAT_DTYPES)
def test_bit_exact(backend, shape, w_dtype, d_dtype):
    w = random(shape, w_dtype, backend, scale=4.0, seed=1)
    d = random(shape, d_dtype, backend, seed=2)
    expected = ref.merge_dense(w, d, 0.3711)
    out = sg.merge_dense_(w, d, 0.3711)
    assert out is w
    assert_bits_equal(w, expected)


@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 1.0, -2.5, 1e-3, 3e4])
def test_bit_exact_alphas(backend, w_dtype, alpha):
    w = random((1000, 3001), w_dtype, backend, scale=10.0, seed=3)
    d = random((1000, 3001), torch.bfloat16, backend, seed=4)
    expected = ref.merge_dense(w, d, alpha)
    sg.merge_dense_(w, d, alpha)
    assert_bits_equal(w, expected)


def special_values():
    """NaN, infinities, signed zeros, subnormals, overflow edges and rounding ties."""
    info = torch.finfo(torch.float32)
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, info.max, -info.max, info.tiny,
              info.tiny / 4, -info.tiny / 8, 1.0, -1.0, 65504.0, 65520.0, -65519.0, 3.4e38,
              3.3961775e38, 1e-40, -1e-45, 6e-8, 2.9e-8, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
              1.0 + 2**-11, -(1.0 + 3 * 2**-11)]
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d_dtype", FLOAT_DTYPES)
def test_special_values_round_like_torch(backend, w_dtype, d_dtype):
    # Every pair of special values, so NaN/Inf propagation, overflow to Inf, subnormal results
    # and ties-to-even all meet.
    s = special_values()
    w = s.repeat_interleave(len(s)).to(w_dtype).to(backend)
    d = s.repeat(len(s)).to(d_dtype).to(backend)
    for alpha in (1.0, 0.5, -1.0):
        w_run = w.clone()
        sg.merge_dense_(w_run, d, alpha)
        assert_bits_equal(w_run, ref.merge_dense(w, d, alpha))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_ties_round_to_even(backend, w_dtype):
    # fp32 values exactly halfway between two 16-bit values must go to the even one.
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[w_dtype]
    base = torch.arange(1, 200, dtype=torch.float64)
    halfway = (1 + (2 * base + 1) * 2.0 ** -(mantissa + 1)).float().to(backend)
    w = torch.zeros_like(halfway).to(w_dtype)
    sg.merge_dense_(w, halfway, 1.0)
    assert_bits_equal(w, halfway.to(w_dtype))
    assert not (w.float() == halfway).any()  # really were ties, not representable values


def test_errors_name_the_argument():
    w = torch.zeros(4, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"merge_dense_: d has shape \[5, 4\] but w has shape \[4, 5\]"):
        sg.merge_dense_(w, torch.zeros(5, 4), 1.0)
    with pytest.raises(TypeError, match="merge_dense_: d has dtype Double"):
        sg.merge_dense_(w, torch.zeros(4, 5, dtype=torch.float64), 1.0)
    with pytest.raises(TypeError, match="merge_dense_: w has dtype Int"):
        sg.merge_dense_(torch.zeros(4, 5, dtype=torch.int32), torch.zeros(4, 5), 1.0)
    with pytest.raises(ValueError, match="merge_dense_: w is not contiguous"):
        sg.merge_dense_(torch.zeros(5, 4, dtype=torch.bfloat16).T, torch.zeros(4, 5), 1.0)
    with pytest.raises(ValueError, match="merge_dense_: d is not contiguous"):
        sg.merge_dense_(w, torch.zeros(5, 4).T, 1.0)


def test_empty_tensor_is_a_no_op():
    w = torch.zeros(0, 7, dtype=torch.float16)
    sg.merge_dense_(w, torch.zeros(0, 7), 2.0)
    assert w.shape == (0, 7)


def test_opcheck():
    w = random((33, 65), torch.bfloat16)
    torch.library.opcheck(torch.ops.safegene_fast.merge_dense_,
                          (w, random((33, 65), torch.float32), 0.5))
