"""rsvd: randomized SVD of a matrix or of a - mean(b), against the optimal truncated SVD."""

import math

import pytest
import torch
from conftest import DEVICES, TOLERANCE, random

import safegene_fast as sg
from safegene_fast import reference as ref


def with_spectrum(m, n, s, seed=0, dtype=torch.float32):
    """A matrix U diag(s) V^T with random orthonormal U, V and the given singular values."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return ((U * s) @ V.T).to(dtype)


SPECTRA = {
    "geometric": lambda k: 0.9 ** torch.arange(k, dtype=torch.float64),
    "power_law": lambda k: (1.0 + torch.arange(k, dtype=torch.float64)) ** -1.0,
}


def error_ratio(a, U, S, V, rank):
    """Frobenius error of U diag(S) V^T over the optimal rank-`rank` error."""
    a = a.double().cpu()
    approx = (U.double().cpu() * S.double().cpu()) @ V.double().cpu().T
    S_true = torch.linalg.svdvals(a)
    optimal = S_true[rank:].square().sum().sqrt()
    return float(torch.linalg.matrix_norm(a - approx) / optimal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", [(1000, 3001), (769, 513), (5125, 200)])
@pytest.mark.parametrize("rank", [8, 32])
def test_error_within_one_percent_of_optimal(device, spectrum, shape, rank):
    m, n = shape
    a = with_spectrum(m, n, SPECTRA[spectrum](min(m, n)), seed=rank).to(device)
    U, S, V = sg.rsvd(a, rank=rank)
    assert U.shape == (m, rank) and S.shape == (rank,) and V.shape == (n, rank)
    assert error_ratio(a, U, S, V, rank) <= TOLERANCE["rsvd_error_ratio"]
    # The factors are orthonormal and the singular values sorted, like an SVD's.
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(U.double().cpu().T @ U.double().cpu(), eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(V.double().cpu().T @ V.double().cpu(), eye, atol=1e-4, rtol=0)
    assert (S[:-1] >= S[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_difference_and_mean_of_sources(device):
    a = with_spectrum(300, 400, SPECTRA["geometric"](300), seed=1)
    b1, b2 = random((300, 400), torch.float32, seed=2), random((300, 400), torch.float32, seed=3)
    # Implicit a - mean(b) in bf16 and fp16 must equal rsvd of the explicit fp32 difference.
    a16, b16 = a.to(torch.bfloat16), [b1.to(torch.float16), b2.to(torch.bfloat16)]
    explicit = (ref.delta(a16, b16)).float()
    got = sg.rsvd(a16.to(device), [t.to(device) for t in b16], rank=12, seed=7)
    want = sg.rsvd(explicit.to(device), rank=12, seed=7)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0)
    assert error_ratio(explicit, *got, 12) <= TOLERANCE["rsvd_error_ratio"]


def test_energy_picks_the_smallest_sufficient_rank():
    s = SPECTRA["geometric"](400)
    a = with_spectrum(500, 400, s, seed=3)
    for energy in (0.5, 0.9, 0.99):
        expected = ref.energy_rank(s, energy)
        U, S, V = sg.rsvd(a, energy=energy, max_rank=100)
        assert S.shape == (expected,), (energy, S.shape, expected)
        assert U.shape == (500, expected) and V.shape == (400, expected)
    # The cap wins when the energy needs more.
    U, S, V = sg.rsvd(a, energy=0.999, max_rank=20)
    assert S.shape == (20,)


@pytest.mark.parametrize("device", DEVICES)
def test_energy_total_is_exact_on_a_large_matrix(device):
    """A 4096 x 4096 rank-2 matrix whose first direction holds 96% of the energy: energy=0.97
    needs rank 2. A single fp32 reduction of ||d||_F^2 over 16.8 M entries came out about 2% low
    and picked rank 1."""
    n = 4096
    flat = torch.full((n,), 1 / math.sqrt(n))
    alternating = flat * torch.tensor([1.0, -1.0]).repeat(n // 2)
    a = 0.1 * n
    b = a * math.sqrt(0.04 / 0.96)
    d = a * torch.outer(flat, flat) + b * torch.outer(alternating, alternating)
    U, S, V = sg.rsvd(d.to(device), energy=0.97)
    assert S.numel() == 2
    assert abs(float(S[1]) / b - 1) < 1e-3


def test_same_seed_same_factors_other_seed_other_sketch():
    a = random((600, 700), torch.bfloat16)  # flat spectrum: the sketch really matters
    first, again = sg.rsvd(a, rank=10, seed=5), sg.rsvd(a, rank=10, seed=5)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    other = sg.rsvd(a, rank=10, seed=6)
    assert not torch.equal(first[0], other[0])


def test_lora_factors_reconstruct():
    a = with_spectrum(200, 300, SPECTRA["power_law"](200), seed=4)
    B, A, S = sg.rsvd_lora(a, rank=16)
    U, S2, V = sg.rsvd(a, rank=16)
    assert B.shape == (200, 16) and A.shape == (16, 300)
    torch.testing.assert_close(B @ A, (U * S2) @ V.T, rtol=1e-5, atol=1e-6)
    # sqrt(S) is split evenly: both factors carry the same column/row norms.
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-4, atol=0)
    Bb, Ab, _ = sg.rsvd_lora(a, rank=16, dtype=torch.bfloat16)
    assert Bb.dtype == Ab.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 769), (7, 7)])
def test_tiny_matrices_cap_the_rank(shape):
    a = random(shape, torch.float32)
    U, S, V = sg.rsvd(a, rank=16)
    r = min(shape)
    assert S.shape == (r,)
    torch.testing.assert_close((U * S) @ V.T, a, rtol=1e-5, atol=1e-5)


def test_errors():
    a = random((20, 30), torch.float32)
    with pytest.raises(ValueError, match="exactly one of rank= or energy="):
        sg.rsvd(a)
    with pytest.raises(ValueError, match="exactly one of rank= or energy="):
        sg.rsvd(a, rank=3, energy=0.9)
    with pytest.raises(ValueError, match="rsvd: rank must be positive"):
        sg.rsvd(a, rank=-1)
    with pytest.raises(ValueError, match=r"rsvd: energy must be in \(0, 1\]"):
        sg.rsvd(a, energy=1.5)
    with pytest.raises(ValueError, match="rsvd: a must be a 2-D matrix"):
        sg.rsvd(a.reshape(-1), rank=2)
    with pytest.raises(ValueError, match=r"rsvd: b\[0\] has shape"):
        sg.rsvd(a, [a.T.contiguous()], rank=2)
    with pytest.raises(ValueError, match="rsvd: oversample must be >= 0"):
        sg.rsvd(a, rank=2, oversample=-1)
    bad = a.clone()
    bad[3, 4] = math.nan
    with pytest.raises(ValueError, match="rsvd: the matrix contains NaN or Inf"):
        sg.rsvd(bad, rank=2)
    bad[3, 4] = math.inf
    with pytest.raises(ValueError, match="rsvd: the matrix contains NaN or Inf"):
        sg.rsvd(a, [bad], rank=2)


def test_opcheck_fixed_rank():
    a, b = random((40, 70), torch.bfloat16), random((40, 70), torch.bfloat16, seed=1)
    torch.library.opcheck(torch.ops.safegene_fast.rsvd, (a, [b], 8, 8, 2, 0, 0.0, 0))


def test_opcheck_energy_rank():
    # The rank comes from the data, so the fake kernel returns an unbacked size.
    a = with_spectrum(40, 70, SPECTRA["geometric"](40))
    torch.library.opcheck(torch.ops.safegene_fast.rsvd, (a, [], 0, 8, 2, 0, 0.9, 20))
