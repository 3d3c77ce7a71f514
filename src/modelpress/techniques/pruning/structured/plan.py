"""From channel scores to a shrink plan: how many channels each group loses, and which.

Layer-wise: every group loses ``round(s · C)`` channels. Global: scores are divided by their
group's mean (so groups of different scale compete on relative importance, as Torch-Pruning's
mean normaliser does) and the lowest ``s`` of all channels go, with each group capped at
``max_sparsity`` and keeping at least one channel. Kept counts are rounded up to a multiple
of ``round_to`` (SIMD-friendly widths). A FLOPs target is met by bisection on ``s`` with the
FLOPs of every Conv/Linear predicted as ``F · (kept_in / in) · (kept_out / out)``, kept counts
rounded to the *nearest* multiple there, and the budget the bisection leaves unused refilled.

FLOPs-aware ranking (``costs``) divides each normalised score by the FLOPs one channel of its
group costs (relative to the mean group), so channels go in order of importance per FLOP: the
greedy solution of the knapsack "keep the most importance within the FLOPs budget" (Aflalo et
al. 2020, "Knapsack Pruning with Inner Distillation"). Without it a channel of a 32×32 map and
one of an 8×8 map compete on importance alone, although in ResNet-20 the first costs ~4× the
FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from modelpress.context import Context
from modelpress.measure.flops import call_model, eval_mode
from modelpress.techniques.pruning.structured.graph import Group
from modelpress.techniques.pruning.structured.shrink import Plan

Counts = list[int]  # channels removed per group


def layer_counts(sizes: Sequence[int], sparsity: Sequence[float], cap: float) -> Counts:
    """``round(s_g · C_g)`` removed from each group, at most ``cap · C_g`` and ``C_g - 1``."""
    return [
        min(round(s * c), math.floor(cap * c), c - 1) for c, s in zip(sizes, sparsity, strict=True)
    ]


def ranking_scores(
    scores: Sequence[torch.Tensor], costs: Sequence[float] | None = None
) -> list[torch.Tensor]:
    """Each group's scores divided by their mean, and by the group's relative channel cost
    (``costs``, from :func:`channel_costs`) when ranking per FLOP."""
    normed = [s.float() / s.float().mean().clamp_min(1e-12) for s in scores]
    if costs is None:
        return normed
    return [n / c for n, c in zip(normed, costs, strict=True)]


def global_counts(
    scores: Sequence[torch.Tensor],
    sparsity: float,
    cap: float,
    costs: Sequence[float] | None = None,
) -> Counts:
    """Remove the lowest ``sparsity`` of all ranking scores (:func:`ranking_scores`), ≤ ``cap``
    per group."""
    sizes = [len(s) for s in scores]
    limits = [min(math.floor(cap * c), c - 1) for c in sizes]
    normed = torch.cat(ranking_scores(scores, costs))
    owner = torch.cat([torch.full((c,), i) for i, c in enumerate(sizes)])
    order = torch.argsort(normed, stable=True)
    target = round(sparsity * sum(sizes))
    counts = [0] * len(sizes)
    removed = 0
    for g in owner[order].tolist():
        if removed == target:
            break
        if counts[g] < limits[g]:
            counts[g] += 1
            removed += 1
    return counts


def round_counts(
    sizes: Sequence[int], counts: Counts, round_to: int, nearest: bool = False
) -> Counts:
    """Each group keeps a multiple of ``round_to`` channels (or all of them): rounded up (remove
    fewer than asked), or with ``nearest`` to the nearest multiple, at least ``round_to``.

    A FLOPs search rounds to the nearest: rounding up inside the bisection would turn a
    16-channel group that keeps 9 into one that keeps all 16, spending the budget on whichever
    groups happen to sit just above a multiple (on ResNet-20: the costly 32×32 stage).
    """
    out = []
    for c, r in zip(sizes, counts, strict=True):
        steps = (c - r) / round_to
        multiple = max(math.floor(steps + 0.5), 1) if nearest else math.ceil(steps)
        out.append(c - min(c, multiple * round_to))
    return out


def least_that_fits(
    counts_at: Callable[[float], Counts],
    hi: float,
    fits: Callable[[Counts], bool],
    steps: int = 30,
) -> Counts | None:
    """Bisection on ``x`` in ``[0, hi]`` for the smallest ``x`` whose ``counts_at(x)`` fit
    (more ``x`` removes more channels, so fitting is taken as monotone in ``x``); those
    counts, or None when even ``counts_at(hi)`` does not fit."""
    best = counts_at(hi)
    if not fits(best):
        return None
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        counts = counts_at(mid)
        if fits(counts):
            hi, best = mid, counts
        else:
            lo = mid
    return best


def refill(
    counts: Counts,
    scores: Sequence[torch.Tensor],
    step: int,
    fits: Callable[[Counts], bool],
    frozen: Sequence[bool],
    costs: Sequence[float] | None = None,
) -> Counts:
    """Give channels back while the budget holds: the bisection lands on a step of a step
    function (more so with ``round_to``), leaving budget unused.

    Repeatedly restore ``step`` channels (the best removed ones) to the group whose restored
    channels have the highest ranking score (:func:`ranking_scores`), as long as ``fits``
    still holds; ``frozen`` groups (explicit per-layer sparsity) are left as they are.
    """
    counts = list(counts)
    normed = [torch.sort(n).values for n in ranking_scores(scores, costs)]
    while True:
        candidates = []
        for g, removed in enumerate(counts):
            if removed and not frozen[g]:
                back = min(step, removed)
                value = float(normed[g][removed - back : removed].mean())
                candidates.append((value, g, back))
        for _, g, back in sorted(candidates, reverse=True):
            trial = list(counts)
            trial[g] -= back
            if fits(trial):
                counts = trial
                break
        else:
            return counts


def kept_channels(scores: torch.Tensor, removed: int) -> list[int]:
    """Indices (ascending) of the ``len - removed`` highest scores; ties keep earlier ones."""
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[: len(scores) - removed].tolist())


def build_plan(groups: Sequence[Group], keeps: Sequence[list[int]]) -> Plan:
    """Per module, the rows (``out``) and columns (``in``) kept by pruned groups."""
    axes: dict[tuple[str, str], torch.Tensor] = {}
    widths = _axis_widths(groups)
    for group, keep in zip(groups, keeps, strict=True):
        if len(keep) == group.size:
            continue
        dropped = torch.ones(group.size, dtype=torch.bool)
        dropped[keep] = False
        for m in group.members:
            axis = "in" if m.role == "in" else "out"
            mask = axes.setdefault((m.module, axis), torch.ones(widths[m.module, axis], dtype=bool))
            span = mask.narrow(0, m.offset, group.size * m.expand).view(group.size, m.expand)
            span[dropped] = False
    plan: Plan = {}
    for (module, axis), mask in axes.items():
        plan.setdefault(module, {})[axis] = torch.nonzero(mask).flatten().tolist()
    return plan


def _axis_widths(groups: Sequence[Group]) -> dict[tuple[str, str], int]:
    """Width of each module axis: the furthest channel any member reaches."""
    widths: dict[tuple[str, str], int] = {}
    for g in groups:
        for m in g.members:
            key = (m.module, "in" if m.role == "in" else "out")
            widths[key] = max(widths.get(key, 0), m.offset + g.size * m.expand)
    return widths


def layer_flops(model: nn.Module, ctx: Context) -> dict[str, tuple[float, int, int]]:
    """``{name: (flops, in_width, out_width)}`` of each Conv/Linear on the example input.

    FLOPs are ``2 · out_elements · in_per_group · kernel`` (one multiply-add per weight use).
    """
    found: dict[str, tuple[float, int, int]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
            w = module.weight
            per_output = w[0].numel()  # in/groups · kernel (Conv) or in (Linear)
            if isinstance(module, nn.Linear):
                width_in, width_out = module.in_features, module.out_features
            else:
                width_in, width_out = module.in_channels, module.out_channels
            found[name] = (2.0 * out.numel() * per_output, width_in, width_out)

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, ctx.example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def channel_costs(
    groups: Sequence[Group], flops: dict[str, tuple[float, int, int]], total: float
) -> list[float]:
    """FLOPs that removing one channel of each group saves (every member's share of its
    layer), divided by the mean over groups."""
    saved = []
    for i in range(len(groups)):
        one = [0] * len(groups)
        one[i] = 1
        saved.append(total - predicted_flops(groups, one, flops, total))
    mean = sum(saved) / len(saved)
    return [max(s, 1e-12 * mean) / mean for s in saved]


def predicted_flops(
    groups: Sequence[Group],
    counts: Counts,
    flops: dict[str, tuple[float, int, int]],
    total: float,
) -> float:
    """Model FLOPs once ``counts`` channels leave each group (other FLOPs unchanged)."""
    removed: dict[tuple[str, str], int] = {}
    for g, r in zip(groups, counts, strict=True):
        for m in g.members:
            axis = "in" if m.role == "in" else "out"
            removed[m.module, axis] = removed.get((m.module, axis), 0) + r * m.expand
    scaled = 0.0
    for name, (f, width_in, width_out) in flops.items():
        frac_out = 1 - removed.get((name, "out"), 0) / width_out
        frac_in = 1 - removed.get((name, "in"), 0) / width_in
        scaled += f * frac_out * frac_in - f  # a depthwise conv has no "in" member
    return total + scaled
