"""The bit-allocation solver: an exact multiple-choice knapsack over layers.

Each layer ``l`` has ``K`` options (bit widths) with an integer cost ``c[l, k]`` (bytes) and an
error ``e[l, k]`` (its sensitivity). Choose one option per layer to minimise ``sum_l e[l, k_l]``
subject to ``sum_l c[l, k_l] <= budget``: the multiple-choice knapsack problem (MCKP), as in
ZeroQ (Cai et al. 2020, "ZeroQ: A Novel Zero Shot Quantization Framework", sec. 3.3, which
solves it by dynamic programming over the Pareto frontier) and HAWQ-V3 (Yao et al. 2021, as
an integer linear programme).

Why this method. A dynamic programme over a discretised byte axis is exact only at a 1-byte
step, which for a 20 MB model is 20 M cells per layer; coarser steps make it approximate. A
Lagrangian relaxation alone reaches only the allocations on the convex hull of the
error-bytes trade-off and can miss the optimum. So this module runs the *exact* dynamic
programme over partial allocations (Nemhauser & Ullmann 1969): after adding each layer it keeps
only Pareto-optimal ``(bytes, error)`` states, since a state that costs more and errs more than
another can never complete to a better allocation. Two exact prunings keep the frontier small:

* a state whose bytes plus the cheapest options of the remaining layers exceed the budget is
  dropped (so the result never exceeds the budget);
* a state whose error plus a lower bound on the remaining layers' error exceeds the error of a
  known feasible allocation is dropped. The bound is the LP relaxation of the remaining MCKP
  at the remaining budget (Sinha & Zoltners 1979): walk each layer's lower convex hull of
  ``(bytes, error)`` points, taking hull steps of all layers in order of error saved per byte;
  the greedy prefix of the same steps is the known feasible allocation.

On MiniLM-sized instances (37 layers, 4 options) the frontier stays at a few hundred states;
on 400 layers of random shapes with 6 options it solves in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelpress.errors import ConfigError

_REL_TOL = 1e-9  # slack on the error bound, so float rounding never prunes the optimum


@dataclass(frozen=True)
class Allocation:
    """The solver's answer.

    Attributes:
        choice: ``(L,)`` int, the option chosen for each layer.
        error: the total error of the choice, ``sum_l e[l, choice[l]]``.
        cost: its total cost, ``sum_l c[l, choice[l]]`` (never above the budget).
    """

    choice: np.ndarray
    error: float
    cost: int


@dataclass(frozen=True)
class HullTable:
    """The LP relaxation of an MCKP over a set of layers, as a piecewise-linear function.

    With ``r`` bytes to spend, the relaxed minimum error is ``interp(r - base_cost, xs, ys)``:
    every layer starts at its cheapest option (total ``base_cost``), then hull steps are taken
    in order of error saved per byte; ``xs`` are their cumulative bytes, ``ys`` the errors.
    """

    base_cost: float
    xs: np.ndarray
    ys: np.ndarray

    def bound(self, remaining: np.ndarray) -> np.ndarray:
        """Lower bound of the error reachable with ``remaining`` bytes (vectorised)."""
        return np.interp(remaining - self.base_cost, self.xs, self.ys)

    def greedy(self, budget: float) -> float:
        """Error of the feasible allocation that takes whole hull steps while they fit."""
        i = np.searchsorted(self.xs, budget - self.base_cost, side="right") - 1
        return float(self.ys[max(i, 0)])


def lower_hull(cost: np.ndarray, error: np.ndarray) -> np.ndarray:
    """The lower-left convex hull of one layer's ``(cost, error)`` options.

    Args:
        cost: ``(K,)`` bytes of each option.
        error: ``(K,)`` error of each option.

    Returns:
        ``(H, 2)`` hull points by increasing cost and strictly decreasing error, from the
        cheapest option (least error among equally cheap ones) to the least-error option;
        consecutive slopes ``d error / d cost`` strictly increase (the hull is convex).
    """
    points: list[tuple[float, float]] = []
    for k in np.lexsort((error, cost)):  # K options: a few bit widths
        c, e = float(cost[k]), float(error[k])
        if points and e >= points[-1][1]:
            continue  # costs no less and errs no less than a point already on the hull
        while len(points) >= 2:
            (c1, e1), (c2, e2) = points[-2], points[-1]
            if (e2 - e1) * (c - c1) >= (e - e1) * (c2 - c1):  # points[-1] is not below
                points.pop()
            else:
                break
        points.append((c, e))
    return np.asarray(points, dtype=np.float64)


def hull_tables(costs: np.ndarray, errors: np.ndarray) -> list[HullTable]:
    """``tables[l]``: the LP relaxation over layers ``l, l+1, ..., L-1`` (``tables[L]`` is empty).

    Args:
        costs: ``(L, K)`` bytes.
        errors: ``(L, K)`` errors.
    """
    hulls = [lower_hull(c, e) for c, e in zip(costs, errors, strict=True)]
    tables = [HullTable(0.0, np.zeros(1), np.zeros(1))]
    base_cost, base_error, steps = 0.0, 0.0, np.zeros((0, 2))
    for hull in reversed(hulls):
        base_cost, base_error = base_cost + hull[0, 0], base_error + hull[0, 1]
        steps = np.concatenate([steps, np.diff(hull, axis=0)])  # (S, 2): (bytes, error change)
        steps = steps[np.argsort(steps[:, 1] / steps[:, 0], kind="stable")]
        xs = np.concatenate([[0.0], np.cumsum(steps[:, 0])])
        ys = base_error + np.concatenate([[0.0], np.cumsum(steps[:, 1])])
        tables.append(HullTable(base_cost, xs, ys))
    return tables[::-1]


def pareto_front(cost: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal states: no other state costs no more and errs less.

    Returns:
        Indices into ``cost``/``error`` by increasing cost (and strictly decreasing error);
        of several equal states, one is kept.
    """
    order = np.lexsort((error, cost))
    err = error[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], err[:-1]]))
    return order[err < best_before]


def solve_allocation(errors: np.ndarray, costs: np.ndarray, budget: int) -> Allocation:
    """One option per layer with the least total error whose total cost fits ``budget``.

    Exact (see the module docstring for the method and why).

    Args:
        errors: ``(L, K)`` finite errors (sensitivities) of each layer's options.
        costs: ``(L, K)`` non-negative integer costs (bytes).
        budget: the most the chosen options may cost together.

    Returns:
        The optimal :class:`Allocation` (ties: the cheaper one).

    Raises:
        ConfigError: even the cheapest option of every layer exceeds ``budget``.
    """
    errors = np.asarray(errors, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.int64)
    n_layers, n_options = errors.shape
    cheapest = np.concatenate([np.cumsum(costs.min(1)[::-1])[::-1], [0]])  # (L + 1,)
    if cheapest[0] > budget:
        raise ConfigError(
            f"no allocation fits {budget:,} bytes: the cheapest options take {cheapest[0]:,}."
        )
    tables = hull_tables(costs, errors)
    known = tables[0].greedy(budget)
    ceiling = known + _REL_TOL * abs(known)
    state_cost, state_error = np.zeros(1, np.int64), np.zeros(1)
    parents = []
    for layer in range(n_layers):
        cost = (state_cost[:, None] + costs[layer]).ravel()  # (states * K,)
        error = (state_error[:, None] + errors[layer]).ravel()
        left = budget - cost
        ok = (left >= cheapest[layer + 1]) & (error + tables[layer + 1].bound(left) <= ceiling)
        candidates = np.flatnonzero(ok)
        kept = candidates[pareto_front(cost[candidates], error[candidates])]
        state_cost, state_error = cost[kept], error[kept]
        parents.append(kept)
    best = int(np.argmin(state_error))
    choice = np.empty(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        best, choice[layer] = divmod(int(parents[layer][best]), n_options)
    total = int(costs[np.arange(n_layers), choice].sum())
    if total > budget:  # unreachable by construction; never hand back an over-budget answer
        raise RuntimeError(f"solver bug: allocation costs {total} > budget {budget}")
    return Allocation(choice, float(errors[np.arange(n_layers), choice].sum()), total)
