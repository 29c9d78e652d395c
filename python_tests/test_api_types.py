"""The Python API refuses values of the wrong kind with a sentence naming the op and the argument,
instead of truncating them (a float rank), iterating them (a string of paths) or writing where
nothing can see it (a meta tensor, a tensor autograd tracks)."""

import math

import numpy as np
import pytest
import torch

import safegene_fast as sg


def tensors(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("kwargs, error, text", [
    ({"rank": 2.5}, TypeError, "rank must be an integer, not 2.5"),
    ({"rank": 2.0}, TypeError, "rank must be an integer"),
    ({"rank": True}, TypeError, "rank must be an integer"),
    ({"rank": "4"}, TypeError, "rank must be an integer"),
    ({"rank": 0}, ValueError, "rank must be positive"),
    ({"rank": 2**70}, ValueError, "rank must be positive (an integer below 2**63)"),
    ({"energy": "0.9"}, TypeError, "energy must be a finite number"),
    ({"energy": math.nan}, TypeError, "energy must be a finite number"),
    ({"energy": 0.0}, ValueError, "energy must be in (0, 1]"),
    ({"energy": 0.9, "max_rank": 3.5}, TypeError, "max_rank must be an integer"),
    ({"rank": 2, "oversample": 1.5}, TypeError, "oversample must be an integer"),
    ({"rank": 2, "power_iters": None}, TypeError, "power_iters must be an integer"),
    ({"rank": 2, "seed": -1}, ValueError, "seed must be >= 0"),
])
def test_rsvd_settings_of_the_wrong_kind(kwargs, error, text):
    with pytest.raises(error, match=f"^rsvd: {__import__('re').escape(text)}"):
        sg.rsvd(tensors(9, 7), **kwargs)


def test_integer_like_values_are_accepted():
    U, S, V = sg.rsvd(tensors(9, 7), rank=np.int64(3), oversample=np.int32(2), seed=np.uint8(1))
    assert S.shape == (3,)
    w = tensors(4, 5)
    sg.merge_dense_(w, tensors(4, 5), np.float32(0.5))
    sg.merge_dense_(w, tensors(4, 5), 2)


@pytest.mark.parametrize("b", ["degraded/", b"x", 3, [torch.ones(2), "x"], None])
def test_b_must_be_tensors(b):
    for call in (lambda: sg.delta(torch.ones(2), b), lambda: sg.rsvd(torch.ones(2, 2), b, rank=1),
                 lambda: sg.delta_out(torch.ones(2), b, torch.empty(2))):
        with pytest.raises(TypeError, match="b must be a tensor or a list of tensors, not a"):
            call()


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "0.5", None, True, torch.tensor(0.5)])
def test_alpha_must_be_a_finite_number(alpha):
    w, d = tensors(3, 4), tensors(3, 4)
    for call in (lambda: sg.merge_dense_(w, d, alpha), lambda: sg.merge_diff(w, d, d, alpha),
                 lambda: sg.merge_lowrank_(w, tensors(3, 2), tensors(2, 4), alpha)):
        with pytest.raises(TypeError, match="alpha must be a finite number"):
            call()


def test_not_a_tensor():
    with pytest.raises(TypeError, match="merge_dense_: d must be a tensor, not a float"):
        sg.merge_dense_(torch.ones(2), 1.0, 1.0)
    with pytest.raises(TypeError, match=r"merge_lowrank_: w must be a tensor, not a list of int"):
        sg.merge_lowrank_([1, 2], torch.ones(2, 1), torch.ones(1, 2), 1.0)


IN_PLACE = {
    "merge_dense_": lambda w: sg.merge_dense_(w, torch.ones(w.shape), 1.0),
    "merge_lowrank_": lambda w: sg.merge_lowrank_(w, torch.ones(w.shape[0], 1), torch.ones(1, w.shape[1]), 1.0),
    "merge_diff": lambda w: sg.merge_diff(torch.ones(w.shape), torch.ones(w.shape), torch.zeros(w.shape), 1.0, out=w),
    "delta_out": lambda w: sg.delta_out(torch.ones(w.shape), [torch.zeros(w.shape)], w),
}


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_ops_refuse_meta_and_tracked_tensors(op):
    with pytest.raises(ValueError, match=f"{op}: .* is on the meta device"):
        IN_PLACE[op](torch.empty(3, 4, device="meta"))
    w = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=f"{op}: .* requires grad, and autograd cannot track"):
        IN_PLACE[op](w)
    with torch.no_grad():  # how an optimizer updates parameters: allowed
        IN_PLACE[op](w)
    assert bool((w != 0).any())


def test_meta_tensors_still_give_shapes():
    """The out-of-place ops keep working on meta tensors: shapes and dtypes without data."""
    out = sg.delta(torch.empty(5, 3, device="meta", dtype=torch.bfloat16), [torch.empty(5, 3, device="meta")])
    assert out.is_meta and out.shape == (5, 3) and out.dtype == torch.float32
