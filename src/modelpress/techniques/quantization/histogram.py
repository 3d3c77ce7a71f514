"""Histogram maths for choosing a clip range: re-binning, interpolation, and the two criteria
the ``mse`` and ``kl`` observers minimise (see :mod:`~modelpress.techniques.quantization.
observers`). Every function is vectorised over candidate grids ``(K,)`` and bins ``(n,)``.
"""

from __future__ import annotations

import torch

from modelpress.techniques.quantization.affine import qmax


def grid_limits(
    scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest representable values, ``-z s`` and ``(2^b - 1 - z) s``."""
    return -zero * scale, (qmax(bits) - zero) * scale


def rebin(counts: torch.Tensor, radius: float, new_radius: float) -> torch.Tensor:
    """Histogram ``counts`` over ``[-radius, radius]`` moved onto as many bins over the wider
    ``[-new_radius, new_radius]``, by linear interpolation of the cumulative counts (values
    taken as uniform within each bin); the total is kept.
    """
    n = len(counts)
    old = torch.linspace(-radius, radius, n + 1, dtype=torch.float64)
    new = torch.linspace(-new_radius, new_radius, n + 1, dtype=torch.float64)
    cdf = torch.cat([counts.new_zeros(1), counts.double().cumsum(0)])
    return interp(new, old, cdf).diff().clamp(min=0)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` for non-decreasing ``xp``: piecewise linear, constant outside; on a
    flat stretch of ``xp`` the first point reaching ``x`` is used."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    width = x1 - x0
    frac = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, 1), 1.0)
    out = f0 + frac.clamp(0, 1) * (f1 - f0)
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], out))


def _rounding_integral(v: torch.Tensor) -> torch.Tensor:
    """``G(v) = integral from -1/2 to v of (u - round(u))^2 du``: ``n / 12 + (r^3 + 1/8) / 3``
    with ``n = round(v)`` and ``r = v - n``."""
    n = torch.floor(v + 0.5)
    r = v - n
    return n / 12 + (r**3 + 0.125) / 3


def expected_mse(
    lower: torch.Tensor,
    upper: torch.Tensor,
    counts: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    total: float,
) -> torch.Tensor:
    """Expected squared quantization error of each candidate grid over a histogram.

    Values are taken as uniform within each bin ``[a, b)``; on a grid ``s Z`` clipped to
    ``[lo, hi]`` (:func:`grid_limits`) the integral of the error over the bin is
    ``((lo - a)^3 - (lo - min(b, lo))^3) / 3`` below ``lo``, ``s^3 (G(b'/s) - G(a'/s))`` over
    its part ``[a', b']`` inside (see :func:`_rounding_integral`) and likewise above ``hi``.

    Args:
        lower, upper: ``(n,)`` the bins' edges.
        counts: ``(n,)`` values per bin.
        scale, zero: ``(K,)`` candidate grids.
        bits: code width.
        total: number of values (more than ``counts.sum()`` when exact zeros are kept apart).

    Returns:
        ``(K,)`` float64 mean squared errors.
    """
    a, b = lower.double()[None], upper.double()[None]  # (1, n)
    s = scale.double()[:, None]  # (K, 1)
    lo, hi = (t.double()[:, None] for t in grid_limits(scale, zero, bits))
    below = ((lo - a).clamp(min=0) ** 3 - (lo - torch.minimum(b, lo)).clamp(min=0) ** 3) / 3
    above = ((b - hi).clamp(min=0) ** 3 - (torch.maximum(a, hi) - hi).clamp(min=0) ** 3) / 3
    a_in, b_in = torch.maximum(a, lo), torch.minimum(b, hi)
    inside = s**3 * (_rounding_integral(b_in / s) - _rounding_integral(a_in / s))
    inside = torch.where(b_in > a_in, inside, 0.0)
    per_value = (below + above + inside) / (b - a)  # (K, n)
    return (per_value * counts.double()[None]).sum(1) / max(total, 1.0)


def kl_divergences(
    counts: torch.Tensor, centers: torch.Tensor, ks: torch.Tensor, scale: torch.Tensor,
    zero: torch.Tensor, bits: int,
) -> torch.Tensor:  # fmt: skip
    """``KL(P || Q)`` of each clip candidate (TensorRT's entropy calibration, Migacz 2017).

    For candidate ``k`` the slice is the ``2k`` bins around zero. ``P`` is the slice with the
    counts outside it added to its two edge bins; ``Q`` gives each bin of the slice the mass
    of its grid cell (bins whose centres round to the same code) divided by the cell's
    number of bins where ``P > 0``, and 0 where ``P = 0``. Both are normalised; a ``Q`` of 0
    where ``P > 0`` is raised to ``1e-10`` first.

    Args:
        counts: ``(2 n,)`` histogram over ``[-R, R]`` (zero at index ``n``).
        centers: ``(2 n,)`` bin centres.
        ks: ``(K,)`` half-widths of the slices, in bins.
        scale, zero: ``(K,)`` the grid of each candidate.
        bits: code width.

    Returns:
        ``(K,)`` float64 divergences.
    """
    n = len(counts) // 2
    idx = torch.arange(2 * n)[None]  # (1, 2n)
    start, stop = (n - ks)[:, None], (n + ks)[:, None]  # (K, 1)
    inside = (idx >= start) & (idx < stop)
    sliced = torch.where(inside, counts.double()[None], 0.0)  # (K, 2n)
    cum = torch.cat([counts.new_zeros(1), counts.double().cumsum(0)])
    p = sliced.clone()
    p.scatter_add_(1, start, cum[start])  # left outliers into the first bin of the slice
    p.scatter_add_(1, stop - 1, cum[-1] - cum[stop])  # right outliers into the last
    codes = torch.clamp(torch.round(centers[None] / scale[:, None]) + zero[:, None], 0, qmax(bits))
    codes = torch.where(inside, codes, 0).long()
    mass = torch.zeros(len(ks), qmax(bits) + 1, dtype=torch.float64)
    mass.scatter_add_(1, codes, sliced)
    used = torch.zeros_like(mass).scatter_add_(1, codes, (inside & (p > 0)).double())
    q = torch.where(p > 0, mass.gather(1, codes) / used.gather(1, codes).clamp(min=1), 0.0)
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
    q = torch.where((p > 0) & (q <= 0), 1e-10, q)
    terms = torch.where(p > 0, p * torch.log(p / torch.where(q > 0, q, 1.0)), 0.0)
    return terms.sum(1)
