"""Global analytic EVBMF (Nakajima et al. 2013/2015): threshold, noise variance and rank."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.techniques.lowrank.vbmf import GRID_POINTS, evb_free_energy, evb_tau_bar, evbmf


def low_rank_plus_noise(rows: int, cols: int, rank: int, sigma: float, seed: int) -> torch.Tensor:
    """``U diag(s) Vᵀ + σ E``: ``rank`` singular values 2-3× the noise edge σ(√L + √M)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64))
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))
    s = torch.linspace(3.0, 2.0, rank, dtype=torch.float64) * edge
    noise = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return (u * s) @ v.T + sigma * noise


def test_tau_bar_is_the_zero_of_xi_and_matches_the_paper():
    # Nakajima et al. (2015): tau_bar(1) = 2.5129, and about 2.5129 sqrt(alpha) below 1
    assert evb_tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (0.05, 0.3, 0.7):
        tau = evb_tau_bar(alpha)
        xi = math.log1p(tau) / tau + alpha * math.log1p(tau / alpha) / tau - 1
        assert abs(xi) < 1e-10
        assert tau == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.15)
    with pytest.raises(ValueError, match="alpha must be in"):
        evb_tau_bar(1.5)


@pytest.mark.parametrize(
    ("rows", "cols", "rank", "sigma"),
    [(40, 100, 6, 1.0), (64, 576, 10, 0.05), (200, 50, 8, 0.3), (16, 144, 1, 0.1)],
)
def test_recovers_the_rank_and_the_noise_variance(rows, cols, rank, sigma):
    result = evbmf(low_rank_plus_noise(rows, cols, rank, sigma, seed=rank))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.15)
    s = torch.linalg.svdvals(low_rank_plus_noise(rows, cols, rank, sigma, seed=rank))
    assert s[rank - 1] > result.threshold > s[rank]


def test_pure_noise_and_zero_give_rank_zero():
    g = torch.Generator().manual_seed(0)
    assert evbmf(torch.randn(80, 120, generator=g)).rank == 0
    assert evbmf(torch.zeros(5, 7)).rank == 0


def test_sigma2_minimizes_the_free_energy():
    y = low_rank_plus_noise(30, 90, 4, 0.5, seed=1)
    result = evbmf(y)
    s2 = torch.linalg.svdvals(y).square()
    alpha = 30 / 90
    tau = evb_tau_bar(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    dense = torch.linspace(0.05, 2.0, 4 * GRID_POINTS, dtype=torch.float64)  # an independent grid
    best = evb_free_energy(torch.tensor([result.sigma2], dtype=torch.float64), s2, 90, alpha, x_bar)
    assert float(best) <= float(evb_free_energy(dense, s2, 90, alpha, x_bar).min()) + 1e-9


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match="2-D matrix"):
        evbmf(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
