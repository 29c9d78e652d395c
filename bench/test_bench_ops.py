"""pytest-benchmark for every op, each beside its plain-torch peer and the copy floor.

    .venv/bin/python -m pytest bench --benchmark-only            # measure
    .venv/bin/python -m pytest bench --benchmark-disable -q      # run each once (CI smoke)

Compare rows within one run only: the machines are shared and noisy.
"""

import pytest
import torch

import safegene_fast as sg

ROWS, COLS = 4096, 4096


def rand(*shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def w_d():
    return rand(ROWS, COLS), rand(ROWS, COLS, seed=1)


@pytest.mark.benchmark(group="merge_dense_ bf16 4096x4096")
def test_merge_dense(benchmark, w_d):
    w, d = w_d
    benchmark(sg.merge_dense_, w, d, 1e-3)


@pytest.mark.benchmark(group="merge_dense_ bf16 4096x4096")
def test_merge_dense_unfused_torch(benchmark, w_d):
    w, d = w_d
    benchmark(lambda: w.copy_((w.float() + 1e-3 * d.float()).to(w.dtype)))


@pytest.mark.benchmark(group="merge_dense_ bf16 4096x4096")
def test_copy_floor_same_bytes(benchmark, w_d):
    # merge_dense_ reads w and d and writes w; this copy reads 1.5x and writes 1.5x w's bytes.
    src, dst = rand(ROWS * COLS * 3 // 2), torch.empty(ROWS * COLS * 3 // 2, dtype=torch.bfloat16)
    benchmark(dst.copy_, src)


@pytest.mark.benchmark(group="delta bf16 4096x4096")
def test_delta(benchmark, w_d):
    a, b = w_d
    out = torch.empty(ROWS, COLS)
    benchmark(sg.delta_out, a, [b], out)


@pytest.mark.benchmark(group="delta bf16 4096x4096")
def test_delta_unfused_torch(benchmark, w_d):
    a, b = w_d
    out = torch.empty(ROWS, COLS)
    benchmark(lambda: torch.sub(a.float(), b.float(), out=out))


@pytest.mark.benchmark(group="merge_lowrank_ bf16 4096x4096")
@pytest.mark.parametrize("rank", [16, 64])
def test_merge_lowrank(benchmark, w_d, rank):
    w, _ = w_d
    B, A = rand(ROWS, rank, seed=2) * 0.01, rand(rank, COLS, seed=3)
    benchmark(sg.merge_lowrank_, w, B, A, 1e-3)


@pytest.mark.benchmark(group="merge_lowrank_ bf16 4096x4096")
@pytest.mark.parametrize("rank", [16, 64])
def test_merge_lowrank_unfused_torch(benchmark, w_d, rank):
    w, _ = w_d
    B, A = rand(ROWS, rank, seed=2) * 0.01, rand(rank, COLS, seed=3)
    benchmark(lambda: w.copy_((w.float() + 1e-3 * (B.float() @ A.float())).to(w.dtype)))


@pytest.mark.benchmark(group="rsvd fp32 4096x4096 rank 16")
def test_rsvd(benchmark, w_d):
    a = w_d[0].float()
    benchmark(sg.rsvd, a, rank=16)


@pytest.mark.benchmark(group="rsvd fp32 4096x4096 rank 16")
def test_torch_svd_lowrank(benchmark, w_d):
    a = w_d[0].float()
    benchmark(torch.svd_lowrank, a, q=24, niter=2)


@pytest.fixture(scope="module")
def w_a_b():
    return rand(ROWS, COLS), rand(ROWS, COLS, seed=1), rand(ROWS, COLS, seed=2)


@pytest.mark.benchmark(group="merge_diff bf16 4096x4096")
def test_merge_diff(benchmark, w_a_b):
    w, a, b = w_a_b
    out = torch.empty_like(w)
    benchmark(sg.ops.merge_diff, w, a, b, 1e-3, out)


@pytest.mark.benchmark(group="merge_diff bf16 4096x4096")
def test_merge_diff_two_ops(benchmark, w_a_b):
    # what resta did before merge_diff: the float32 delta, then merge_dense_
    w, a, b = w_a_b
    out, d = torch.empty_like(w), torch.empty(ROWS, COLS)
    benchmark(lambda: sg.merge_dense_(out.copy_(w), sg.ops.delta_out(a, [b], d), 1e-3))


@pytest.mark.benchmark(group="merge_diff bf16 4096x4096")
def test_merge_diff_unfused_torch(benchmark, w_a_b):
    w, a, b = w_a_b
    out = torch.empty_like(w)
    benchmark(lambda: out.copy_((w.float() + 1e-3 * (a.float() - b.float())).to(w.dtype)))


@pytest.mark.benchmark(group="merge_diff bf16 4096x4096")
def test_merge_diff_copy_floor_same_bytes(benchmark, w_a_b):
    # merge_diff reads w, a and b and writes out: a copy reading 2x and writing 2x w's bytes
    src, dst = rand(ROWS * COLS * 2), torch.empty(ROWS * COLS * 2, dtype=torch.bfloat16)
    benchmark(dst.copy_, src)
