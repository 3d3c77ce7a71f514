"""Ranks for a model-wide budget: the least discarded energy for a parameter or FLOP budget.

Layer ``l`` either stays dense (cost ``D_l``, nothing discarded) or is factorized at a rank
``r ∈ {t, 2t, ...}`` (``t`` = ``round_to``) cheaper than dense, costing ``r · c_l`` (``c_l`` =
``in + out`` parameters, or ``2 · rows · (in + out)`` FLOPs) and discarding
``d_l(r) = Σ_{i>r} σ_i² / Σ_i σ_i²`` of its (normalised) energy. We minimise ``Σ_l d_l(r_l)``
subject to ``Σ_l cost_l ≤ B``: a multiple-choice knapsack.

Because singular values are sorted, ``d_l`` is convex in ``r``: each further step of ``t``
ranks buys less energy for the same cost. Only the last step, to dense, may buy more per unit
of cost than the one before it; merging such steps (pool-adjacent-violators) leaves each layer's
steps on the lower convex hull of its (cost, discarded energy) curve. Taking steps across all
layers in order of energy per unit cost then solves the LP relaxation of the knapsack exactly
(Sinha & Zoltners 1979, "The Multiple-Choice Knapsack Problem"). The integer answer takes that
order's steps up to the first that does not fit, which is the LP optimum for what they cost;
then, of a step that does not fit whole, its first ``t`` ranks as far as they fit, and later
steps of other layers that still fit. So its discarded energy is at most the optimum at budget
``B`` plus the energy of the one step that did not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerCosts:
    """What the budget knows about one layer.

    Attributes:
        energies: ``σ_i² / Σ σ_j²`` ``(q,)``, descending.
        rank_cost: cost of one rank (``in + out`` params, or its FLOPs).
        dense_cost: cost of the dense layer (``in · out`` params, or its FLOPs).
    """

    energies: torch.Tensor
    rank_cost: float
    dense_cost: float

    def max_rank(self, step: int) -> int:
        """The largest multiple of ``step`` (at most ``q``) cheaper than dense; 0 if none."""
        q = int(self.energies.numel())
        below = (self.dense_cost / self.rank_cost) - 1e-9  # rank * rank_cost < dense_cost
        return min(int(below // step), q // step) * step


@dataclass(frozen=True)
class _Step:
    """One hull step of a layer: its unmerged parts ``(cost, gain, rank after)`` in order."""

    parts: tuple[tuple[float, float, int | None], ...]  # rank None: the layer is dense

    @property
    def cost(self) -> float:
        return sum(p[0] for p in self.parts)

    @property
    def ratio(self) -> float:
        cost = self.cost
        return sum(p[1] for p in self.parts) / cost if cost > 0 else float("inf")


def _steps(layer: LayerCosts, step: int) -> list[_Step]:
    """The layer's steps from rank ``step`` upward, merged onto the lower convex hull."""
    top = layer.max_rank(step)
    ranks = torch.arange(step, top + 1, step)  # (K,)
    kept = torch.cat([torch.zeros(1, dtype=layer.energies.dtype), layer.energies.cumsum(0)])
    discarded = (1 - kept[ranks]).clamp_min(0)  # d(r) at each rank, (K,)
    gains = discarded[:-1] - discarded[1:]  # one step of `step` ranks each
    out = [_Step(((step * layer.rank_cost, float(g), int(r)),))
           for g, r in zip(gains, ranks[1:], strict=True)]  # fmt: skip
    out.append(_Step(((layer.dense_cost - top * layer.rank_cost, float(discarded[-1]), None),)))
    while len(out) >= 2 and out[-1].ratio > out[-2].ratio:  # keep ratios non-increasing
        last, prev = out.pop(), out.pop()
        out.append(_Step(prev.parts + last.parts))
    return out


def budget_ranks(layers: list[LayerCosts], budget: float, step: int = 1) -> list[int | None]:
    """Ranks (multiples of ``step``) minimising the total discarded energy within ``budget``.

    See the module docstring for the problem and why this greedy is near-optimal.

    Args:
        layers: every layer that can be factorized (``max_rank(step) >= step``).
        budget: the total cost allowed (parameters or FLOPs of these layers).
        step: ranks are multiples of it (``round_to``).

    Returns:
        Per layer its rank, or None where the budget keeps the layer dense.

    Raises:
        ValueError: ``budget`` is below every layer at rank ``step`` (the caller says so in
            the user's terms).
    """
    floor = smallest_cost(layers, step)
    if budget < floor:
        raise ValueError(f"budget {budget} is below the smallest reachable cost {floor}")
    ranks: list[int | None] = [step] * len(layers)
    per_layer = [_steps(layer, step) for layer in layers]
    order = sorted(
        ((s.ratio, i, j) for i, steps in enumerate(per_layer) for j, s in enumerate(steps)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    left, taken, blocked = budget - floor, [0] * len(layers), [False] * len(layers)
    for _, i, j in order:
        if blocked[i] or j != taken[i]:
            continue
        chosen = per_layer[i][j]
        whole = chosen.cost <= left
        taken[i] += whole
        blocked[i] = not whole  # the layer stops here: its later steps would skip this one
        for cost, _, rank in chosen.parts:  # not whole: its first ranks, as far as they fit
            if cost > left:
                break
            left -= cost
            ranks[i] = rank
    return ranks


def smallest_cost(layers: list[LayerCosts], step: int) -> float:
    """The cost of every layer at rank ``step``: the lowest budget :func:`budget_ranks` takes."""
    return sum(step * layer.rank_cost for layer in layers)
