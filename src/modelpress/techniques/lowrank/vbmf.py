"""Rank selection by global analytic empirical variational Bayesian matrix factorization (EVBMF).

Nakajima, Sugiyama, Babacan and Tomioka (2013), "Global analytic solution of fully-observed
variational Bayesian matrix factorization" (JMLR 14), and Nakajima, Tomioka, Sugiyama and
Babacan (2015), "Condition for perfect dimensionality recovery by variational Bayesian PCA"
(JMLR 16), give the EVB solution of ``Y = B A^T + E`` (``Y`` of shape ``L × M``, ``L <= M``,
Gaussian noise of variance ``σ²``) in closed form: with ``γ_h`` the singular values of ``Y``
and ``α = L / M``, component ``h`` is kept exactly when

    γ_h > γ_EVB = σ · sqrt(M · (1 + τ̄) · (1 + α / τ̄)),

where ``τ̄ = τ̄(α)`` is the unique zero of the decreasing function
``Ξ(τ; α) = Φ(τ) + Φ(τ / α)``, ``Φ(z) = log(1 + z) / z − 1/2``. The unknown noise variance is
estimated by minimizing the (scaled) free energy over ``σ²``:

    Ω(σ²) = Σ_h ψ(x_h),    x_h = γ_h² / (M σ²),
    ψ(x) = x − log x + [x > x̲] · (log(τ(x) + 1) + α log(τ(x) / α + 1) − τ(x)),
    τ(x) = (x − (1 + α) + sqrt((x − (1 + α))² − 4α)) / 2,    x̲ = (1 + τ̄)(1 + α / τ̄),

on the interval the 2015 paper proves holds the minimizer:
``σ̄² = ||Y||²_F / (L M)`` above and
``σ̲² = max(γ²_{h̄+1} / (M x̲), Σ_{h > h̄} γ_h² / (M (L − h̄)))`` below,
``h̄ = ⌈L / (1 + α)⌉ − 1``. The rank is the number of ``γ_h`` above ``γ_EVB(σ̂)``.

Kim et al. (2016) apply this to the mode-0 and mode-1 unfoldings of a convolution kernel to
pick the two ranks of its Tucker-2 decomposition (:mod:`~modelpress.techniques.lowrank.tucker`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRID_POINTS = 2001  # candidate noise variances, log-spaced over [σ̲², σ̄²]


@dataclass(frozen=True)
class VBMFResult:
    """What EVBMF found for one matrix.

    Attributes:
        rank: components kept (singular values above the threshold).
        sigma2: the estimated noise variance σ̂².
        threshold: the singular-value threshold ``γ_EVB`` at σ̂².
    """

    rank: int
    sigma2: float
    threshold: float


def evb_tau_bar(alpha: float) -> float:
    """``τ̄(α)``, the zero of ``Ξ(τ; α) = Φ(τ) + Φ(τ / α)``, ``Φ(z) = log(1 + z) / z − 1/2``.

    Nakajima et al. (2015), Theorem 2 (``τ̄(1) = 2.5129``; ``≈ 2.5129 √α`` in general).
    ``Ξ`` falls from 1 (τ → 0) to −1 (τ → ∞), so bisection on a bracket finds the zero.

    Args:
        alpha: ``L / M`` in ``(0, 1]``.

    Returns:
        τ̄, to about 1e-12 relative precision.

    Raises:
        ValueError: ``alpha`` is not in ``(0, 1]``.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha!r}")

    def xi(tau: float) -> float:
        return math.log1p(tau) / tau + math.log1p(tau / alpha) * alpha / tau - 1.0

    lo, hi = 1e-12, 1.0
    while xi(hi) > 0:  # widen the bracket (τ̄ is about 2.5 √α)
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if xi(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def evb_free_energy(sigma2: torch.Tensor, s2: torch.Tensor, m: int, alpha: float,
                    x_bar: float) -> torch.Tensor:  # fmt: skip
    """The scaled EVB free energy ``Ω(σ²) = Σ_h ψ(γ_h² / (M σ²))`` for many ``σ²`` at once.

    Nakajima et al. (2015), Theorem 5 (``ψ = ψ0 + [x > x̲] ψ1``; see the module docstring).

    Args:
        sigma2: candidate noise variances ``(G,)``, positive.
        s2: squared singular values ``γ_h²`` ``(L,)`` (all of them).
        m: the larger dimension ``M``.
        alpha: ``L / M``.
        x_bar: the threshold ``x̲ = (1 + τ̄)(1 + α / τ̄)``.

    Returns:
        ``(G,)`` free energies (float64).
    """
    x = s2[None, :] / (m * sigma2[:, None])  # (G, L)
    psi0 = x - torch.log(x)
    big = x > x_bar
    xb = torch.where(big, x, torch.full_like(x, x_bar + 1.0))  # keep sqrt/log finite
    b = xb - (1.0 + alpha)
    tau = 0.5 * (b + torch.sqrt((b * b - 4.0 * alpha).clamp_min(0.0)))
    psi1 = torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau
    return (psi0 + torch.where(big, psi1, torch.zeros_like(psi1))).sum(dim=1)


def evbmf(matrix: torch.Tensor) -> VBMFResult:
    """Global analytic empirical VBMF of ``matrix``: its rank and noise variance.

    Nakajima et al. (2013, 2015): ``σ̂² = argmin Ω(σ²)`` over ``[σ̲², σ̄²]`` (a log-spaced grid
    of :data:`GRID_POINTS`, refined once around the best point), then
    ``rank = #{γ_h > σ̂ sqrt(M (1 + τ̄)(1 + α / τ̄))}``.

    Args:
        matrix: a 2-D tensor ``(L, M)`` (transposed internally when ``L > M``).

    Returns:
        The :class:`VBMFResult`; rank 0 for an all-zero matrix.

    Raises:
        ValueError: ``matrix`` is not 2-D, is empty, or holds NaN/inf.
    """
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise ValueError(f"evbmf needs a non-empty 2-D matrix; got shape {tuple(matrix.shape)}")
    y = matrix.detach().double()
    if not torch.isfinite(y).all():
        raise ValueError("evbmf: the matrix holds NaN or inf")
    if y.shape[0] > y.shape[1]:
        y = y.T
    n_rows, m = y.shape  # L <= M
    s = torch.linalg.svdvals(y)  # (L,) descending
    s2 = s * s
    if float(s2.sum()) == 0.0:
        return VBMFResult(rank=0, sigma2=0.0, threshold=0.0)
    alpha = n_rows / m
    tau_bar = evb_tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    sigma2 = _noise_variance(s2, m, alpha, x_bar)
    threshold = math.sqrt(m * sigma2 * x_bar)
    return VBMFResult(rank=int((s > threshold).sum()), sigma2=sigma2, threshold=threshold)


def _noise_variance(s2: torch.Tensor, m: int, alpha: float, x_bar: float) -> float:
    """``argmin Ω(σ²)`` over the interval of Nakajima et al. (2015), Theorem 6."""
    n_rows = s2.numel()
    upper = float(s2.sum()) / (n_rows * m)
    h_bar = min(math.ceil(n_rows / (1 + alpha)) - 1, n_rows - 1)
    tail = s2[h_bar:]
    lower = max(float(tail[0]) / (m * x_bar), float(tail.sum()) / (m * tail.numel()))
    lower = min(max(lower, upper * 1e-12), upper)  # a zero tail (exactly low-rank Y)
    grid = torch.logspace(math.log10(lower), math.log10(upper), GRID_POINTS, dtype=torch.float64)
    best = int(torch.argmin(evb_free_energy(grid, s2, m, alpha, x_bar)))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]
    fine = torch.linspace(float(lo), float(hi), GRID_POINTS, dtype=torch.float64)
    return float(fine[torch.argmin(evb_free_energy(fine, s2, m, alpha, x_bar))])
