"""The bit-allocation solver: exact against brute force, within budget, and its parts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from modelpress.errors import ConfigError
from modelpress.techniques.quantization.mixed.solver import (
    hull_tables,
    lower_hull,
    pareto_front,
    solve_allocation,
)


def brute_force(errors: np.ndarray, costs: np.ndarray, budget: int) -> float:
    """The least total error over every assignment that fits (inf if none)."""
    n_layers, n_options = errors.shape
    rows = np.arange(n_layers)
    best = np.inf
    for choice in itertools.product(range(n_options), repeat=n_layers):
        if costs[rows, choice].sum() <= budget:
            best = min(best, errors[rows, choice].sum())
    return best


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    n_layers, n_options = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    costs = rng.integers(0, 40, size=(n_layers, n_options))
    errors = rng.random((n_layers, n_options))
    if rng.random() < 0.3:  # many ties
        errors = np.round(errors * 3) / 3
    budget = int(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 3))
    return errors, costs, budget


def test_exact_against_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(300):
        errors, costs, budget = random_instance(rng)
        alloc = solve_allocation(errors, costs, budget)
        rows = np.arange(len(errors))
        assert alloc.cost == costs[rows, alloc.choice].sum() <= budget
        assert alloc.error == pytest.approx(errors[rows, alloc.choice].sum(), abs=1e-12)
        assert alloc.error == pytest.approx(brute_force(errors, costs, budget), abs=1e-12)


def test_hand_made_instance_where_the_greedy_on_the_hull_is_not_optimal():
    # three layers, each low (cost 0) or high bits; the most efficient upgrade (A: 7 error
    # for 6 bytes) blocks the two others (5 for 5 each), which together save more in 10 bytes
    errors = np.array([[7.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    costs = np.array([[0, 6], [0, 5], [0, 5]])
    assert hull_tables(costs, errors)[0].greedy(10) == 10.0  # takes A, then nothing fits
    alloc = solve_allocation(errors, costs, 10)
    assert alloc.choice.tolist() == [0, 1, 1] and alloc.cost == 10 and alloc.error == 7.0
    assert solve_allocation(errors, costs, 9).error == 10.0  # one byte less: one upgrade only
    assert solve_allocation(errors, costs, 16).error == 0.0


def test_never_exceeds_budget_and_tighter_budget_costs_less():
    rng = np.random.default_rng(1)
    bits = np.array([2, 3, 4, 8])
    numel = rng.integers(100, 5000, size=40)
    costs = (numel[:, None] * bits[None, :] + 7) // 8 + 2 * (numel[:, None] // 64)
    errors = rng.lognormal(size=(40, 1)) * 4.0 ** (-bits[None, :].astype(float))
    previous_cost, previous_bits = np.inf, np.inf
    for budget in np.linspace(costs[:, -1].sum(), costs[:, 0].sum(), 12).astype(int):
        alloc = solve_allocation(errors, costs, int(budget))
        mean_bits = float((bits[alloc.choice] * numel).sum() / numel.sum())
        assert alloc.cost <= budget
        assert alloc.cost <= previous_cost and mean_bits <= previous_bits
        previous_cost, previous_bits = alloc.cost, mean_bits
    assert previous_bits == 2.0  # the tightest budget leaves only the lowest width


def test_infeasible_budget_names_the_cheapest_total():
    costs = np.array([[5, 10], [7, 9]])
    with pytest.raises(
        ConfigError, match="no allocation fits 11 bytes: the cheapest options take 12"
    ):
        solve_allocation(np.zeros((2, 2)), costs, 11)


def test_lower_hull_is_convex_and_decreasing():
    cost = np.array([8.0, 2.0, 4.0, 3.0, 6.0, 2.0])
    error = np.array([0.0, 9.0, 4.0, 8.0, 3.5, 10.0])
    hull = lower_hull(cost, error)
    assert hull[0].tolist() == [2.0, 9.0]  # the cheapest, least error among equally cheap
    assert hull[-1].tolist() == [8.0, 0.0]
    slopes = np.diff(hull[:, 1]) / np.diff(hull[:, 0])
    assert (np.diff(hull[:, 0]) > 0).all() and (slopes < 0).all() and (np.diff(slopes) > 0).all()
    assert [3.0, 8.0] not in hull.tolist()  # above the segment (2, 9)-(4, 4)


def test_lp_bound_never_exceeds_the_integer_optimum():
    rng = np.random.default_rng(2)
    for _ in range(50):
        errors, costs, budget = random_instance(rng)
        table = hull_tables(costs, errors)[0]
        assert table.bound(np.array([budget]))[0] <= brute_force(errors, costs, budget) + 1e-12
        greedy = table.greedy(budget)  # a feasible allocation's error
        assert greedy >= brute_force(errors, costs, budget) - 1e-12


def test_pareto_front_keeps_only_undominated_states():
    cost = np.array([5, 3, 3, 8, 4, 9])
    error = np.array([2.0, 4.0, 5.0, 1.0, 4.0, 1.0])
    kept = pareto_front(cost, error)
    front = sorted(zip(cost[kept].tolist(), error[kept].tolist(), strict=True))
    assert front == [(3, 4.0), (5, 2.0), (8, 1.0)]
