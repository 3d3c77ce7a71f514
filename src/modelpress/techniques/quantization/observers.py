"""Observers: watch a stream of tensors and choose a per-tensor affine grid for them.

An observer is fed batches with :meth:`Observer.update` and asked for a grid with
:meth:`Observer.qparams`, in the conventions of :mod:`~modelpress.techniques.quantization.affine`
(unsigned codes ``0 .. 2^b - 1``; the clip range always holds 0 and the zero point is an
integer, so 0.0 is exact; symmetric grids have ``z = 2^(b-1)`` and ``s = t / (2^(b-1) - 1)``;
a zero range gives ``s = 1``, as onnxruntime's ``DynamicQuantizeLinear`` does).

* ``minmax``: the exact running minimum and maximum.
* ``moving_average``: exponential moving averages of each batch's min and max
  (``m <- (1 - momentum) m + momentum * batch_m``, as torch.ao's MovingAverageMinMaxObserver).
* ``percentile``: clip at the p-th percentile of ``|x|`` (symmetric) or at the ``100 - p``
  and ``p`` percentiles of ``x`` (asymmetric).
* ``mse``: the clip ``t`` minimising the expected squared quantization error over the
  histogram (values taken as uniform within each bin; the expectation is exact under that
  assumption, see :func:`~modelpress.techniques.quantization.histogram.expected_mse`).
* ``kl``: entropy calibration (Migacz 2017, "8-bit Inference with TensorRT"): the clip ``t``
  minimising ``KL(P || Q)`` between the histogram clipped at ``t`` (outliers folded into the
  edge bins) and its quantized version (each grid cell's mass spread over its non-empty bins).

The last three keep a fixed-size histogram over ``[-R, R]`` (``R`` the largest ``|x|`` seen;
when a batch exceeds it the counts are re-binned onto the wider range by interpolating the
cumulative counts), so memory does not grow with the data. Exact zeros (ReLU outputs) are
counted apart: they are always exact on the grid. Clip candidates are ``t_k = k R / bins``;
the asymmetric range for ``t`` is ``[max(min x, -t), min(max x, t)]`` (each tail clipped at
magnitude ``t``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from modelpress.errors import ConfigError, DataError, UnknownNameError, suggest
from modelpress.techniques.quantization.affine import qmax
from modelpress.techniques.quantization.histogram import (
    expected_mse,
    interp,
    kl_divergences,
    rebin,
)

_MAX_CANDIDATES = 128  # clip thresholds tried by the mse and kl observers


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the grid covering ``[lo, hi]`` (any matching shapes).

    Asymmetric: ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``; symmetric:
    ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``, ``z = 2^(b-1)``; the range is first widened to hold
    0. ``s = 0`` (an all-zero range) becomes 1; other scales are at least the smallest normal
    float32.

    Returns:
        ``(scale, zero_point)``, float32, the shape of ``lo``.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0)
    half = (1 << (bits - 1)) - 1
    scale = torch.maximum(-lo, hi) / half if symmetric else (hi - lo) / qmax(bits)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(scale > 0, scale.clamp(min=tiny), torch.ones_like(scale))
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(0, qmax(bits)) + 0.0  # + 0.0: no -0.0
    return scale, zero


class Observer:
    """Base class: ``update(x)`` with each batch, then ``qparams(bits, symmetric)``.

    Subclasses implement ``_update`` (``x`` flat, finite float32, non-empty) and
    ``clip_range``. ``seen`` counts the values observed.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.seen = 0
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))

    def update(self, x: torch.Tensor) -> None:
        """Observe the values of ``x`` (any shape; empty tensors are ignored).

        Raises:
            DataError: ``x`` holds NaN or inf.
        """
        x = x.detach().reshape(-1).float()
        if not x.numel():
            return
        if not torch.isfinite(x).all():
            raise DataError(f"the {self.name} observer was given NaN or inf values.")
        self.lo, self.hi = torch.minimum(self.lo, x.min()), torch.maximum(self.hi, x.max())
        self._update(x)
        self.seen += x.numel()

    def _update(self, x: torch.Tensor) -> None:
        """Subclass hook: fold a flat, finite batch into the statistics."""

    def clip_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``(lo, hi)`` to cover; the grid is :func:`range_qparams` of it."""
        return self.lo, self.hi

    def qparams(self, bits: int = 8, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (float32 scalars) of the chosen ``bits``-bit grid.

        Raises:
            DataError: nothing was observed yet.
        """
        if not self.seen:
            raise DataError(f"the {self.name} observer has seen no values; feed it data first.")
        lo, hi = self.clip_range(bits, symmetric)
        return range_qparams(lo, hi, bits, symmetric)


class MinMaxObserver(Observer):
    """The exact running range ``[min x, max x]``."""

    name = "minmax"


class MovingAverageObserver(Observer):
    """Exponential moving averages of each batch's min and max (the first batch starts them).

    Args:
        momentum: weight of the newest batch, in (0, 1].
    """

    name = "moving_average"

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        _check_option(self.name, "momentum", momentum, 0.0, 1.0, "a float in (0, 1]", low_open=True)
        self.momentum = momentum
        self.avg_lo = self.avg_hi = torch.tensor(0.0)

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min(), x.max()
        if not self.seen:
            self.avg_lo, self.avg_hi = lo, hi
        else:
            m = self.momentum
            self.avg_lo = (1 - m) * self.avg_lo + m * lo
            self.avg_hi = (1 - m) * self.avg_hi + m * hi

    def clip_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The averaged range."""
        return self.avg_lo, self.avg_hi


class HistogramObserver(Observer):
    """A histogram of the nonzero values over ``[-R, R]`` with ``2 * bins`` bins of width ``R /
    bins`` (``R`` the largest ``|x|`` so far), plus the count of exact zeros.

    Args:
        bins: bins on each side of zero.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        _check_option(self.name, "bins", bins, 16, 1 << 16, "an int in [16, 65536]")
        self.bins = int(bins)
        self.radius = 0.0
        self.counts = torch.zeros(2 * self.bins, dtype=torch.float64)
        self.zeros = 0

    def _update(self, x: torch.Tensor) -> None:
        nonzero = x[x != 0]
        self.zeros += x.numel() - nonzero.numel()
        if not nonzero.numel():
            return
        peak = float(nonzero.abs().max())
        if peak > self.radius:
            if self.radius > 0:
                self.counts = rebin(self.counts, self.radius, peak)
            self.radius = peak
        r = self.radius
        self.counts += torch.histc(nonzero, 2 * self.bins, -r, r).double()

    @property
    def edges(self) -> torch.Tensor:
        """``(2 bins + 1,)`` float64 bin edges over ``[-R, R]``."""
        return torch.linspace(-self.radius, self.radius, 2 * self.bins + 1, dtype=torch.float64)

    def counts_with_zeros(self) -> torch.Tensor:
        """The counts with the exact zeros put in the bin ``[0, R / bins)``."""
        counts = self.counts.clone()
        counts[self.bins] += self.zeros
        return counts

    def candidates(self, first: int) -> torch.Tensor:
        """At most ``_MAX_CANDIDATES`` bin counts ``k`` in ``[first, bins]`` (clip ``t = k w``)."""
        first = min(max(first, 1), self.bins)
        steps = min(_MAX_CANDIDATES, self.bins - first + 1)
        return torch.linspace(first, self.bins, steps).round().long().unique()

    def candidate_ranges(self, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[max(min x, -t), min(max x, t)]`` for ``t = k R / bins``, as float32 ``(K,)``."""
        t = ks.double() * (self.radius / self.bins)
        lo = torch.maximum(self.lo.double(), -t)
        hi = torch.minimum(self.hi.double(), t)
        return lo.float(), hi.float()


class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile``-th percentile of ``|x|`` (symmetric) or of each tail.

    Args:
        percentile: in [50, 100]; 100 is min-max up to the histogram's resolution.
        bins: histogram bins on each side of zero.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        _check_option(self.name, "percentile", percentile, 50.0, 100.0, "a float in [50, 100]")
        super().__init__(bins)
        self.percentile = float(percentile)

    def clip_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The percentile range from the histogram's cumulative counts (interpolated)."""
        q = self.percentile / 100
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), self.counts_with_zeros().cumsum(0)])
        total = float(cdf[-1])
        if symmetric:
            k = torch.arange(self.bins + 1)
            mass = cdf[self.bins + k] - cdf[self.bins - k]  # of |x| <= k w
            t = interp(
                torch.tensor([q * total], dtype=torch.float64), mass, self.edges[self.bins :]
            )
            return -t[0].float(), t[0].float()
        tails = torch.tensor([(1 - q) * total, q * total], dtype=torch.float64)
        lo, hi = interp(tails, cdf, self.edges).float()
        return lo.clamp(min=self.lo), hi.clamp(max=self.hi)


class MSEObserver(HistogramObserver):
    """The clip minimising the expected quantization MSE over the histogram.

    Args:
        bins: histogram bins on each side of zero.
    """

    name = "mse"

    def clip_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate range whose grid has the smallest :func:`expected_mse`."""
        if self.radius == 0:
            return self.lo, self.hi
        lo, hi = self.candidate_ranges(self.candidates(1))
        scale, zero = range_qparams(lo, hi, bits, symmetric)
        filled = self.counts > 0  # empty bins add nothing: leave them out
        edges = self.edges
        lower, upper = edges[:-1][filled], edges[1:][filled]
        errors = expected_mse(
            lower, upper, self.counts[filled], scale, zero, bits, float(self.seen)
        )
        best = int(errors.argmin())
        return lo[best], hi[best]


class KLObserver(HistogramObserver):
    """Entropy calibration: the clip minimising ``KL(P || Q)`` (Migacz 2017, TensorRT).

    Candidates start at ``2^(b-1)`` bins per side, TensorRT's 128 for 8 bits (with 2048 bins).

    Args:
        bins: histogram bins on each side of zero.
    """

    name = "kl"

    def clip_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate range with the smallest :func:`kl_divergences`."""
        if self.radius == 0:
            return self.lo, self.hi
        ks = self.candidates(1 << (bits - 1))
        lo, hi = self.candidate_ranges(ks)
        scale, zero = range_qparams(lo, hi, bits, symmetric)
        edges = self.edges
        centers = (edges[:-1] + edges[1:]) / 2
        # exact zeros are exact on every grid: the same atom in P and Q, so they scale the
        # divergence by a constant and are left out (in a merged cell they would be smeared)
        divergence = kl_divergences(self.counts, centers, ks, scale, zero, bits)
        best = int(divergence.argmin())
        return lo[best], hi[best]


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver, KLObserver)
}


def make_observer(name: str, **options: Any) -> Observer:
    """A fresh observer by name (``minmax``, ``moving_average``, ``percentile``, ``mse``,
    ``kl``) with its options (``momentum``, ``percentile``, ``bins``).

    Raises:
        UnknownNameError: no such observer (the nearest names are suggested).
        ConfigError: an option the observer does not take, or a value out of range.
    """
    cls = OBSERVERS.get(name)
    if cls is None:
        raise UnknownNameError(
            f"Unknown observer {name!r}{suggest(name, OBSERVERS)}; observers: "
            f"{', '.join(OBSERVERS)}."
        )
    valid = list(inspect.signature(cls).parameters)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ConfigError(
            f"The {name} observer takes no option {unknown[0]!r}; its options: "
            f"{', '.join(valid) or 'none'}."
        )
    return cls(**options)


def _check_option(
    owner: str, option: str, value: float, lo: float, hi: float, expected: str,
    *, low_open: bool = False,
) -> None:  # fmt: skip
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (value <= lo if low_open else value < lo) or value > hi:
        raise ConfigError(
            f"The {option!r} option of the {owner} observer must be {expected}. "
            f"Got {value!r} instead."
        )
