"""delta: a - mean(b_1..b_K) in float32, against the float64 reference."""

import math

import pytest
import torch
from conftest import FLOAT_DTYPES, SHAPES, TOLERANCE, assert_bits_equal, random

import safegene_fast as sg
from safegene_fast import reference as ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("b_dtype", FLOAT_DTYPES)
def test_one_source_is_exact(backend, shape, a_dtype, b_dtype):
    a, b = random(shape, a_dtype, backend, seed=1), random(shape, b_dtype, backend, seed=2)
    out = sg.delta(a, b)
    assert out.dtype == torch.float32 and out.shape == a.shape
    # fp32 subtraction of two fp32-representable values is correctly rounded: bit-exact.
    assert_bits_equal(out, ref.delta(a, [b]).float())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 16])
def test_mean_of_sources_mixed_dtypes(backend, shape, k):
    a = random(shape, torch.bfloat16, backend, seed=0)
    b = [random(shape, FLOAT_DTYPES[i % 3], backend, seed=10 + i) for i in range(k)]
    out = sg.delta(a, b)
    torch.testing.assert_close(out.double().cpu(), ref.delta(a.cpu(), [x.cpu() for x in b]),
                               rtol=0, atol=TOLERANCE["delta_mean_atol"])


def test_delta_out_writes_into_out(backend):
    a, b = random((769, 7), torch.float16, backend), random((769, 7), torch.float16, backend, seed=5)
    out = torch.full((769, 7), math.nan, device=backend)
    assert sg.delta_out(a, [b], out) is out
    assert_bits_equal(out, (a.float() - b.float()))


def test_nan_and_inf_propagate_like_torch(backend):
    s = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 3e38, -1e-40])
    a = s.repeat_interleave(len(s)).to(backend)
    b = s.repeat(len(s)).to(backend)
    assert_bits_equal(sg.delta(a, b), a - b)
    for dtype in (torch.bfloat16, torch.float16):
        assert_bits_equal(sg.delta(a.to(dtype), b.to(dtype)), a.to(dtype).float() - b.to(dtype).float())


def test_errors_name_the_argument():
    a = torch.zeros(3, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"delta: b\[1\] has shape \[4, 3\] but a has shape \[3, 4\]"):
        sg.delta(a, [torch.zeros(3, 4), torch.zeros(4, 3)])
    with pytest.raises(TypeError, match=r"delta: b\[0\] has dtype Double"):
        sg.delta(a, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="delta: a is not contiguous"):
        sg.delta(torch.zeros(4, 3).T, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"delta: b\[0\] is not contiguous"):
        sg.delta(a, torch.zeros(4, 3).T)
    with pytest.raises(ValueError, match="b must hold between 1 and 16 tensors, but holds 0"):
        sg.delta(a, [])
    with pytest.raises(ValueError, match="but holds 17"):
        sg.delta(a, [a] * 17)
    with pytest.raises(TypeError, match="delta: out has dtype BFloat16, but must be float32"):
        sg.delta_out(a, a, torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="delta: out has shape"):
        sg.delta_out(a, a, torch.zeros(12))


def test_opcheck():
    a, b = random((33, 65), torch.bfloat16), random((33, 65), torch.float16)
    torch.library.opcheck(torch.ops.safegene_fast.delta, (a, [b, a]))
    torch.library.opcheck(torch.ops.safegene_fast.delta_out, (a, [b], torch.empty(33, 65)))
