"""merge_lowrank_: w = round(w + alpha * B @ A) in place, against the float64 reference."""

import math

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, TOLERANCE, peak_rss_growth, random, ulp

import safegene_fast as sg
from safegene_fast import reference as ref

# (out, in, r): awkward sizes; 1000 x 3001 spans several row blocks of the 4 MiB workspace.
SHAPES = [(1, 1, 1), (7, 5, 3), (769, 513, 16), (1000, 3001, 64), (5125, 7, 16)]


def check_close(actual, w, B, A, alpha):
    """actual = round(w + alpha * B @ A) within the merge_lowrank_ tolerance (see conftest)."""
    product = alpha * (B.double() @ A.double())
    exact = w.double() + product
    fp32_error = float(product.abs().max()) * TOLERANCE["lowrank_fp32_rtol"]
    allowed = fp32_error + (ulp(exact, actual.dtype) if actual.dtype != torch.float32 else 0)
    error = (actual.double() - exact).abs()
    finite = exact.isfinite()
    assert (error[finite] <= allowed[finite] if torch.is_tensor(allowed) else error[finite] <= allowed).all(), (
        f"max error {float(error[finite].max()):.3g}")
    assert torch.equal(actual[~finite].double(), exact[~finite]) or not (~finite).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_in_r", SHAPES)
@pytest.mark.parametrize("w_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
def test_matches_float64_reference(device, out_in_r, w_dtype, factor_dtype):
    out, inp, r = out_in_r
    w = random((out, inp), w_dtype, device, seed=1)
    B = random((out, r), factor_dtype, device, scale=r ** -0.5, seed=2)
    A = random((r, inp), factor_dtype, device, seed=3)
    w0 = w.cpu().clone()
    assert sg.merge_lowrank_(w, B, A, 0.73) is w
    check_close(w.cpu(), w0, B.cpu(), A.cpu(), 0.73)


def test_rank_zero_keeps_w():
    w = random((9, 11), torch.bfloat16)
    before = w.clone()
    sg.merge_lowrank_(w, torch.zeros(9, 0), torch.zeros(0, 11), 2.0)
    assert torch.equal(w, before)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate(device):
    w = random((50, 40), torch.bfloat16, device)
    B = random((50, 4), torch.float32, device, seed=1)
    A = random((4, 40), torch.float32, device, seed=2)
    w[3, 5] = math.nan
    w[4, 6] = math.inf
    B[7, 0] = math.nan  # poisons all of row 7 of B @ A
    A[1, 9] = math.inf  # makes column 9 of B @ A infinite or NaN
    expected = ref.merge_lowrank(w.cpu(), B.cpu(), A.cpu(), 0.5)
    sg.merge_lowrank_(w, B, A, 0.5)
    w = w.cpu()
    assert torch.equal(w.isnan(), expected.isnan())
    assert torch.equal(w.isinf(), expected.isinf())
    assert w[7].isnan().all() and w[3, 5].isnan()


def test_workspace_is_bounded():
    """The fp32 work is done in row blocks: peak memory grows by far less than an fp32 w."""
    out, inp = 8192, 8192  # w: 128 MiB bf16; a full fp32 product would add 256 MiB
    w = torch.zeros(out, inp, dtype=torch.bfloat16)
    B, A = random((out, 16), torch.bfloat16), random((16, inp), torch.bfloat16)
    sg.merge_lowrank_(w[:8].contiguous(), B[:8], A, 1.0)  # warm up the GEMM library

    with peak_rss_growth() as grown:
        sg.merge_lowrank_(w, B, A, 1.0)
    assert grown.mib < 48, f"peak RSS grew by {grown.mib:.0f} MiB"
    assert w.abs().sum() > 0


def test_errors_name_the_argument():
    w = torch.zeros(6, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"shapes do not fit .* w is \[6, 5\], B is \[5, 2\] and A is \[2, 5\]"):
        sg.merge_lowrank_(w, torch.zeros(5, 2), torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="merge_lowrank_: w must be a 2-D matrix"):
        sg.merge_lowrank_(torch.zeros(30, dtype=torch.bfloat16), torch.zeros(6, 2), torch.zeros(2, 5), 1.0)
    with pytest.raises(TypeError, match="merge_lowrank_: A has dtype Double"):
        sg.merge_lowrank_(w, torch.zeros(6, 2), torch.zeros(2, 5, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="merge_lowrank_: w is not contiguous"):
        sg.merge_lowrank_(torch.zeros(5, 6).T, torch.zeros(6, 2), torch.zeros(2, 5), 1.0)


def test_non_contiguous_factors_are_accepted():
    # Factors are small and copied to fp32 anyway, so any layout is fine.
    w = random((20, 30), torch.float32)
    B, A = random((2, 20), torch.float32, seed=1).T, random((30, 2), torch.float32, seed=2).T
    w0 = w.clone()
    sg.merge_lowrank_(w, B, A, 1.5)
    check_close(w, w0, B, A, 1.5)


def test_opcheck():
    w = random((33, 65), torch.bfloat16)
    B, A = random((33, 4), torch.float32, seed=1), random((4, 65), torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.safegene_fast.merge_lowrank_, (w, B, A, 0.5))
