"""Search for how many channels each group keeps, scored with adaptive BatchNorm (EagleEye).

Li et al. 2020, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning":
right after pruning, a network's accuracy says little about how it will fine-tune, because
its BatchNorm running statistics still describe the unpruned network (a ResNet-20 pruned to
half its FLOPs scores chance level on CIFAR-10). Re-estimating those statistics on a few
training batches — *adaptive BN*, no gradient step — gives a score that EagleEye found to
rank candidate sub-networks the way fine-tuning later does (on our ResNet-20 benchmark the
allocation it picked started far ahead but was level after 3 fine-tune epochs:
bench/README.md, ``modelpress-l2-search-kd-hint``). So: draw random per-group pruning fractions,
scale each draw to the FLOPs budget, re-estimate each candidate's BatchNorm statistics,
score its task loss on other training batches, and keep the lowest. The importance ranking's
own allocation is candidate 0, so the search never picks worse on that score.

Within a group the channels kept are always the most important ones; the search only moves
the budget between groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from modelpress.context import Batch, LossFn, forward
from modelpress.techniques.pruning.structured.plan import (
    Counts,
    layer_counts,
    least_that_fits,
    round_counts,
)


def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Adaptive BN: reset every BatchNorm's running statistics and re-estimate them as the
    plain average of the per-batch statistics over ``batches`` (a train-mode forward of the
    norms only, without gradients); the model is left in eval mode."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


def mean_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn) -> float:
    """The task loss of ``model`` (eval mode) averaged over ``batches``."""
    model.eval()
    with torch.no_grad():
        losses = [float(loss_fn(forward(model, batch), batch)) for batch in batches]
    return sum(losses) / len(losses)


def random_counts(
    sizes: Sequence[int],
    fixed: Sequence[float | None],
    cap: float,
    round_to: int,
    fits: Callable[[Counts], bool],
    generator: torch.Generator,
) -> Counts | None:
    """One random allocation that fits the budget, or None when none of its scalings does.

    Each free group draws a fraction ``r_g ~ U(0, 1)``; the fractions ``min(a · r_g, cap)``
    are scaled by the smallest ``a`` (bisection) whose counts, rounded to the nearest
    multiple of ``round_to``, fit. Groups with a fixed fraction keep it.
    """
    draws = torch.rand(len(sizes), generator=generator).clamp_min(1e-3).tolist()

    def counts(a: float) -> Counts:
        fractions = [min(a * r, cap) if f is None else f for r, f in zip(draws, fixed, strict=True)]
        return round_counts(sizes, layer_counts(sizes, fractions, cap), round_to, nearest=True)

    return least_that_fits(counts, cap / min(draws), fits)


def search_allocation(
    first: Counts,
    propose: Callable[[torch.Generator], Counts | None],
    build: Callable[[Counts], nn.Module],
    *,
    candidates: int,
    bn_batches: Sequence[Batch],
    score_batches: Sequence[Batch],
    loss_fn: LossFn,
    generator: torch.Generator,
) -> tuple[Counts, dict[str, Any]]:
    """The allocation with the lowest loss after adaptive BN, among ``first`` and
    ``candidates`` random ones.

    Args:
        first: the importance ranking's allocation (candidate 0).
        propose: a random allocation that fits the budget, or None.
        build: a pruned copy of the model for an allocation.
        candidates: random allocations to try besides ``first``.
        bn_batches: batches for re-estimating BatchNorm statistics.
        score_batches: other batches, for the loss.
        loss_fn: the task loss.
        generator: the source of the random draws.

    Returns:
        The chosen counts and a report: every candidate's loss (None for a draw that could
        not fit the budget), the index chosen, and candidate 0's loss.
    """
    losses: list[float | None] = []
    best, best_loss, chosen = first, math.inf, 0
    for i in range(candidates + 1):
        counts = first if i == 0 else propose(generator)
        if counts is None:
            losses.append(None)
            continue
        model = build(counts)
        recalibrate_batchnorm(model, bn_batches)
        loss = mean_loss(model, score_batches, loss_fn)
        losses.append(round(loss, 5))
        if loss < best_loss:
            best, best_loss, chosen = counts, loss, i
    report = {
        "candidates": candidates + 1,
        "chosen": chosen,
        "loss_chosen": round(best_loss, 5),
        "loss_importance_allocation": losses[0],
        "losses": losses,
    }
    return best, report
