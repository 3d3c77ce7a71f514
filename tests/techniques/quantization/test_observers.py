"""Observers on known distributions: grid conventions, clipping that pays, bounded memory."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import ConfigError, DataError, UnknownNameError
from modelpress.techniques.quantization.histogram import expected_mse, grid_limits, rebin
from modelpress.techniques.quantization.observers import (
    OBSERVERS,
    HistogramObserver,
    make_observer,
    range_qparams,
)


def _laplace(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed)) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1) by inversion


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8):
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def _mse(x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor], bits: int = 8) -> float:
    return float((_fake_quant(x, *grid, bits) - x).square().mean())


def _observed(name: str, x: torch.Tensor, batches: int = 10, **options) -> object:
    obs = make_observer(name, **options)
    for chunk in x.chunk(batches):
        obs.update(chunk)
    return obs


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_conventions(name, symmetric):
    x = torch.cat([_laplace(20_000) + 1.5, torch.zeros(500)])  # skewed, with exact zeros
    scale, zero = _observed(name, x).qparams(8, symmetric)
    assert scale.dtype == zero.dtype == torch.float32 and scale > 0
    assert zero == torch.round(zero) and 0 <= zero <= 255
    if symmetric:
        assert zero == 128
    assert _fake_quant(torch.zeros(1), scale, zero).item() == 0.0  # 0.0 is exact
    lo, hi = grid_limits(scale, zero, 8)
    assert lo <= 0 <= hi


def test_range_qparams_formulas_and_degenerate_range():
    scale, zero = range_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False)
    assert scale == pytest.approx(4 / 255) and zero == round(255 / 4)
    scale, zero = range_qparams(torch.tensor(-1.0), torch.tensor(3.0), 4, symmetric=True)
    assert scale == pytest.approx(3 / 7) and zero == 8
    scale, zero = range_qparams(torch.tensor(0.5), torch.tensor(2.0), 8, symmetric=False)
    assert zero == 0 and scale == pytest.approx(2 / 255)  # widened to hold 0
    scale, zero = range_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric=False)
    assert scale == 1 and zero == 0  # as DynamicQuantizeLinear


def test_minmax_is_the_exact_range():
    x = _laplace(10_000)
    obs = _observed("minmax", x)
    assert obs.lo == x.min() and obs.hi == x.max()
    assert obs.qparams(8, False) == range_qparams(x.min(), x.max(), 8, False)


def test_moving_average_follows_its_recursion_and_the_mean_range():
    g = torch.Generator().manual_seed(0)
    widths = 1 + torch.rand(400, generator=g)  # batch ranges vary around a mean of 1.5
    batches = [w * (2 * torch.rand(256, generator=g) - 1) for w in widths]
    obs = make_observer("moving_average", momentum=0.02)
    expected_hi = batches[0].max()
    for i, b in enumerate(batches):
        obs.update(b)
        if i:
            expected_hi = 0.98 * expected_hi + 0.02 * b.max()
    assert obs.avg_hi == pytest.approx(float(expected_hi), rel=1e-5)
    mean_hi = torch.stack([b.max() for b in batches]).mean()
    mean_lo = torch.stack([b.min() for b in batches]).mean()
    # the EMA averages ~50 recent batches: within a few percent of the mean of the ranges
    assert obs.avg_hi == pytest.approx(float(mean_hi), rel=0.05)
    assert obs.avg_lo == pytest.approx(float(mean_lo), rel=0.05)
    assert obs.avg_hi < torch.stack([b.max() for b in batches]).max()


def test_percentile_matches_quantiles_despite_outliers():
    x = _laplace(100_000)
    x[:20] *= 30  # a few far outliers stretch the histogram's range
    obs = _observed("percentile", x, percentile=99.9)
    lo, hi = obs.clip_range(8, symmetric=False)
    # the histogram estimates agree with the exact quantiles to a couple of bins
    width = obs.radius / obs.bins
    assert hi == pytest.approx(float(torch.quantile(x, 0.999)), abs=2 * width)
    assert lo == pytest.approx(float(torch.quantile(x, 0.001)), abs=2 * width)
    t = obs.clip_range(8, symmetric=True)[1]
    assert t == pytest.approx(float(torch.quantile(x.abs(), 0.999)), abs=2 * width)
    assert hi < 0.2 * x.max()  # the bulk, not the outliers


@pytest.mark.parametrize("percentile", [99.9, 99.99])
def test_percentile_clipping_beats_minmax_on_heavy_tails(percentile):
    x = _laplace(100_000)
    for symmetric in (False, True):
        clipped = _mse(
            x, _observed("percentile", x, percentile=percentile).qparams(6, symmetric), 6
        )
        full = _mse(x, _observed("minmax", x).qparams(6, symmetric), 6)
        assert clipped < 0.75 * full  # measured 0.53-0.67 at 6 bits


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_mse_and_kl_clip_laplacian_tails_and_beat_minmax(name):
    x = _laplace(100_000)
    for bits in (4, 8):
        obs = _observed(name, x)
        _, hi = obs.clip_range(bits, symmetric=True)
        assert hi < 0.95 * x.abs().max()  # clipped below the largest value
        minmax = _mse(x, _observed("minmax", x).qparams(bits, True), bits)
        assert _mse(x, obs.qparams(bits, True), bits) <= minmax


def test_mse_observer_is_near_the_best_clip():
    x = _laplace(100_000)
    mse = _mse(x, _observed("mse", x).qparams(4, True), 4)
    ts = torch.linspace(0.5, float(x.abs().max()), 400)
    brute = min(_mse(x, range_qparams(-t, t, 4, True), 4) for t in ts)
    assert mse <= 1.02 * brute  # measured 1.001


def test_expected_mse_matches_the_empirical_error():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(1)) * 8 - 3
    edges = torch.linspace(-3, 5, 65, dtype=torch.float64)
    counts = torch.histc(x, 64, -3, 5).double()
    lo, hi = torch.tensor([-3.0, -1.0, -0.2]), torch.tensor([5.0, 2.0, 0.3])
    for bits in (3, 8):
        scale, zero = range_qparams(lo, hi, bits, symmetric=False)
        predicted = expected_mse(edges[:-1], edges[1:], counts, scale, zero, bits, len(x))
        actual = torch.stack([(_fake_quant(x, s, z, bits) - x).square().mean()
                              for s, z in zip(scale, zero, strict=True)])  # fmt: skip
        assert ((predicted.float() - actual).abs() / actual).max() < 0.03  # measured < 0.5%


def test_kl_keeps_the_whole_range_of_uniform_data():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _, hi = _observed("kl", x).clip_range(8, symmetric=True)
    assert hi >= 0.97 * x.max()  # nothing to gain from clipping a flat distribution


def test_histogram_memory_is_bounded_and_rebinning_keeps_counts():
    obs = make_observer("percentile", bins=256)
    for scale in (1.0, 2.0, 5.0, 10.0):  # the range grows four times
        obs.update(scale * _laplace(5_000, seed=int(scale)))
    assert isinstance(obs, HistogramObserver) and obs.counts.shape == (512,)
    assert obs.counts.sum() + obs.zeros == pytest.approx(20_000)
    counts = torch.tensor([0.0, 4.0, 4.0, 0.0], dtype=torch.float64)  # 8 values in [-0.5, 0.5)
    assert torch.allclose(rebin(counts, 1.0, 2.0), counts)  # the same bins, twice as wide
    assert torch.allclose(rebin(counts, 1.0, 1.5).sum(), counts.sum())


def test_exact_zeros_do_not_drag_the_kl_clip():
    x = torch.relu(_laplace(100_000, seed=3))  # half exact zeros, as after a ReLU
    lo, hi = _observed("kl", x).clip_range(8, symmetric=False)
    assert lo == 0 and hi > 0.5 * x.max()


def test_bad_observer_names_options_and_data():
    with pytest.raises(UnknownNameError, match=r"Unknown observer 'mimax' \(did you mean 'minmax'"):
        make_observer("mimax")
    with pytest.raises(ConfigError, match=r"'percentile' option of the percentile observer must"):
        make_observer("percentile", percentile=120)
    with pytest.raises(ConfigError, match="'momentum' option of the moving_average observer"):
        make_observer("moving_average", momentum=0)
    with pytest.raises(ConfigError, match="The mse observer takes no option 'percentile'"):
        make_observer("mse", percentile=99)
    obs = make_observer("minmax")
    with pytest.raises(DataError, match="has seen no values"):
        obs.qparams()
    with pytest.raises(DataError, match="NaN or inf"):
        obs.update(torch.tensor([1.0, float("nan")]))
