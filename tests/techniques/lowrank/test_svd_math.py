"""lowrank.svd maths: truncation error, whitening, energy ranks and the budget solver."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from modelpress.errors import DataError
from modelpress.techniques.lowrank.rank_rule import round_rank
from modelpress.techniques.lowrank.svd import factorize, low_rank
from modelpress.techniques.lowrank.svd_budget import LayerCosts, budget_ranks
from modelpress.techniques.lowrank.svd_math import (
    Spectrum,
    energy_rank,
    plain_spectrum,
    whitened_spectrum,
    whitening_factor,
)


def anisotropic_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a steeply falling spectrum, as real activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen, dtype=torch.float64)
    scale = torch.logspace(1, -2, width, dtype=torch.float64)
    return torch.randn(rows, width, generator=gen, dtype=torch.float64) * scale @ mix


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_linear_is_reproduced(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    pair = factorize(linear, min(shape))
    x = torch.randn(5, 3, shape[1])
    with torch.no_grad():
        assert torch.allclose(pair(x), linear(x), atol=1e-5, rtol=0)
    assert torch.allclose(pair.weight, linear.weight, atol=1e-5, rtol=0)
    assert pair.second.bias is not None and torch.equal(pair.second.bias, linear.bias)


def test_full_rank_embedding_is_reproduced_and_keeps_its_options():
    torch.manual_seed(0)
    emb = nn.Embedding(30, 8, padding_idx=3)
    pair = factorize(emb, 8)
    assert isinstance(pair.first, nn.Embedding) and pair.first.padding_idx == 3
    assert pair.second.bias is None and pair.weight.shape == (30, 8)
    idx = torch.randint(0, 30, (4, 7))
    with torch.no_grad():
        assert torch.allclose(pair(idx), emb(idx), atol=1e-5, rtol=0)
        assert pair(torch.tensor([3])).abs().max() < 1e-6  # the padding row stays zero


def test_truncation_error_is_the_discarded_energy():
    """Eckart–Young: ||W - W_r||_F^2 = sum_{i>r} sigma_i^2, for the balanced factors too."""
    torch.manual_seed(0)
    w = torch.randn(16, 24, dtype=torch.float64)
    spec = plain_spectrum(w)
    for r in (1, 5, 12):
        first, second = spec.factors(r)
        err = float((w - second @ first).square().sum())
        assert err == pytest.approx(float(spec.s[r:].square().sum()), rel=1e-9)
        assert first.norm(dim=1).allclose(second.norm(dim=0))  # the scale split evenly


def test_whitened_truncation_costs_exactly_the_whitened_tail():
    """SVD-LLM: ||(W - W_r) S||_F^2 = sum_{i>r} sigma_i(W S)^2."""
    w = torch.randn(10, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = anisotropic_inputs(200, 14)
    chol = whitening_factor(x.T @ x, 0.0, "fc")
    spec = whitened_spectrum(w, chol)
    for r in (2, 6):
        first, second = spec.factors(r)
        err = float(((w - second @ first) @ chol).square().sum())
        assert err == pytest.approx(float(spec.s[r:].square().sum()), rel=1e-8)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_whitening_lowers_the_output_error_at_the_same_rank(rank):
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    x = anisotropic_inputs(256, 16, seed=3)
    w = linear.weight.detach().double()
    chol = whitening_factor(x.T @ x, 1e-4, "fc")
    errors = {}
    for kind, spec in (("plain", plain_spectrum(w)), ("whiten", whitened_spectrum(w, chol))):
        pair = low_rank(linear, spec, rank).double()
        with torch.no_grad():
            errors[kind] = float((pair(x) - linear.double()(x)).norm())
    assert errors["whiten"] < 0.7 * errors["plain"]


def test_whitened_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    x = anisotropic_inputs(256, 16, seed=3)
    chol = whitening_factor(x.T @ x, 0.01, "fc")
    pair = low_rank(linear, whitened_spectrum(linear.weight.detach(), chol), 12)
    probe = torch.randn(9, 16)
    with torch.no_grad():
        assert torch.allclose(pair(probe), linear(probe), atol=1e-5, rtol=0)


def test_singular_gram_without_damping_is_a_data_error():
    x = torch.zeros(8, 6, dtype=torch.float64)
    with pytest.raises(DataError, match="fc2: the Gram matrix of its calibration inputs plus "
                       "damping is not positive definite; raise 'damping'"):  # fmt: skip
        whitening_factor(x.T @ x, 0.01, "fc2")


def test_energy_rank_is_the_smallest_that_reaches_the_threshold():
    spec = Spectrum(torch.eye(4), torch.tensor([4.0, 3.0, 2.0, 1.0]).sqrt(), torch.eye(4))
    assert [energy_rank(spec, e) for e in (0.1, 0.4, 0.7, 0.71, 0.9, 1.0)] == [1, 1, 2, 3, 3, 4]
    assert spec.energy_kept(2) == pytest.approx(0.7)
    assert [round_rank(r, 8, 20) for r in (1, 8, 9, 17)] == [8, 8, 16, 20]


# ------------------------------------------------------------------------- the budget solver


def _random_layers(seed: int) -> list[LayerCosts]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        rows, cols = (int(v) for v in torch.randint(3, 9, (2,), generator=gen))
        decay = float(torch.rand((), generator=gen)) * 2
        s2 = torch.exp(-decay * torch.arange(min(rows, cols), dtype=torch.float64))
        s2 = s2 * (1 + 0.3 * torch.rand(s2.shape, generator=gen, dtype=torch.float64))
        s2 = s2.sort(descending=True).values
        out.append(LayerCosts(s2 / s2.sum(), rows + cols, rows * cols))
    return out


def _discard(layer: LayerCosts, rank: int | None) -> float:
    return 0.0 if rank is None else float(1 - layer.energies[:rank].sum())


def _cost(layer: LayerCosts, rank: int | None) -> float:
    return layer.dense_cost if rank is None else rank * layer.rank_cost


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_budget_is_within_one_step_of_the_brute_force_optimum(seed, fraction):
    layers = _random_layers(seed)
    total = sum(layer.dense_cost for layer in layers)
    floor = sum(layer.rank_cost for layer in layers)
    budget = max(fraction * total, floor)
    ranks = budget_ranks(layers, budget)
    assert sum(_cost(lc, r) for lc, r in zip(layers, ranks, strict=True)) <= budget
    options = [[*range(1, layer.max_rank(1) + 1), None] for layer in layers]
    best = min(
        sum(_discard(lc, r) for lc, r in zip(layers, combo, strict=True))
        for combo in itertools.product(*options)
        if sum(_cost(lc, r) for lc, r in zip(layers, combo, strict=True)) <= budget
    )
    got = sum(_discard(lc, r) for lc, r in zip(layers, ranks, strict=True))
    largest_step = max(
        max(float(layer.energies.max()), _discard(layer, layer.max_rank(1))) for layer in layers
    )
    assert best - 1e-12 <= got <= best + largest_step


def test_budget_with_equal_costs_is_exact_and_follows_the_spectra():
    """Two layers of one shape: the budget goes to the slower-decaying spectrum."""
    fast = torch.tensor([0.9, 0.05, 0.03, 0.02], dtype=torch.float64)
    slow = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    layers = [LayerCosts(fast, 9.0, 20.0), LayerCosts(slow, 9.0, 20.0)]  # shape (4, 5)
    assert budget_ranks(layers, 27.0) == [1, 2]
    assert budget_ranks(layers, 18.0) == [1, 1]
    with pytest.raises(ValueError, match="below the smallest reachable cost"):
        budget_ranks(layers, 17.0)


def test_budget_keeps_a_layer_dense_when_that_buys_the_most():
    flat = torch.full((8,), 1 / 8, dtype=torch.float64)  # a random-like square layer
    layers = [LayerCosts(flat, 16.0, 64.0), LayerCosts(flat, 16.0, 64.0)]  # (8, 8): ranks 1-3
    ranks = budget_ranks(layers, 64.0 + 16.0)
    assert sorted(ranks, key=str) == [1, None]  # one dense layer beats two at rank 2
    assert budget_ranks(layers, 64.0, step=2) == [2, 2]
