"""``prune.structured``: remove whole channels, neurons, heads and FFN neurons so the model
physically shrinks (smaller dense weights, fewer FLOPs, real speedups).

Steps: find the coupled groups (a traced channel graph, or the transformer block layout),
drop groups that are pinned or whose producing layers are not targeted, score channels,
decide how many each group loses (layer-wise, global, or by bisection to a FLOPs target,
optionally searched with adaptive BN: :mod:`.search`), then check every module can be
sliced *before* slicing any, shrink, and record the edit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import LayerFractions, TargetedConfig
from modelpress.context import Batch, Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.measure.flops import count_flops
from modelpress.registry import technique
from modelpress.targeting import matches, select_modules
from modelpress.techniques.pruning.structured.graph import Group, build_graph
from modelpress.techniques.pruning.structured.importance import group_scores
from modelpress.techniques.pruning.structured.plan import (
    Counts,
    build_plan,
    channel_costs,
    global_counts,
    kept_channels,
    layer_counts,
    layer_flops,
    least_that_fits,
    predicted_flops,
    refill,
    round_counts,
)
from modelpress.techniques.pruning.structured.search import (
    random_counts,
    recalibrate_batchnorm,
    search_allocation,
)
from modelpress.techniques.pruning.structured.shrink import Attrs, Plan, shrink_modules
from modelpress.techniques.pruning.structured.transformer import head_attrs, transformer_groups

OWNER = "prune.structured"


class StructuredConfig(TargetedConfig):
    """Structured pruning: whole channels / neurons / heads, to a sparsity or a FLOPs budget."""

    sparsity: float = Field(
        0.5, ge=0, lt=1, description="Fraction of channels removed (per group, or overall)."
    )
    flops_target: float | None = Field(
        None, gt=0, lt=1, description="Keep this fraction of the FLOPs; overrides sparsity."
    )
    flops_of: Literal["model", "original"] = Field(
        "model",
        description="flops_target is a fraction of this stage's input model, or of the "
        "pipeline's original model (for iterative recipes: 0.8, 0.65, 0.5 of the original).",
    )
    importance: Literal["l1", "l2", "group_l1", "group_l2", "taylor", "bn_scale"] = Field(
        "l1",
        description="Channel importance: filter norm, norm of all coupled parameters "
        "(group_*), Taylor (needs data), or BN scale.",
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="Prune each group by the same fraction, or rank channels globally."
    )
    layer_sparsity: LayerFractions = Field(
        default_factory=dict, description="Per-layer overrides: producer selector -> sparsity."
    )
    max_sparsity: float = Field(
        0.9, gt=0, lt=1, description="The most any one group may lose (global and FLOPs)."
    )
    round_to: int = Field(1, ge=1, description="Kept channels per group: a multiple of this.")
    flops_aware: bool = Field(
        False,
        description="Global FLOPs target: rank channels by importance per FLOP they cost "
        "(greedy knapsack), so costly high-resolution channels go first.",
    )
    search_candidates: int = Field(
        0,
        ge=0,
        le=100_000,
        description="EagleEye search (needs flops_target and data): also try this many random "
        "allocations of the FLOPs budget over the groups, score each by its loss after "
        "re-estimating its BatchNorm statistics, keep the best; 0: off.",
    )
    search_batches: int = Field(
        8, ge=1, description="Search: training batches for BatchNorm statistics, and as many "
        "others for the loss.",
    )  # fmt: skip
    n_batches: int = Field(8, ge=1, description="Labelled batches for Taylor importance.")
    batch_size: int = Field(
        32, ge=1, description="Batch size of the training batches read (Taylor, search)."
    )

    @model_validator(mode="after")
    def _search_needs_a_flops_target(self) -> StructuredConfig:
        if self.search_candidates and self.flops_target is None:
            raise ValueError(
                "search_candidates spreads a FLOPs budget over the groups: set flops_target, "
                "or drop search_candidates"
            )
        return self

    @model_validator(mode="after")
    def _flops_aware_needs_a_global_flops_target(self) -> StructuredConfig:
        if self.flops_aware and (self.flops_target is None or self.scope != "global"):
            raise ValueError(
                "flops_aware ranks channels against a FLOPs budget: set flops_target and "
                "scope: global, or drop flops_aware"
            )
        return self


def find_groups(model: nn.Module, ctx: Context) -> tuple[list[Group], dict[int, str]]:
    """Coupled groups: transformer heads/FFN if the model has such blocks, else the traced
    channel graph; with the head-count owner of each head group (by index)."""
    groups, owners = transformer_groups(model)
    if groups:
        return groups, owners
    if ctx.example_inputs is None:
        raise DataError(f"{OWNER} traces the model on example inputs; pass data=...")
    return build_graph(model, ctx.example_inputs).groups(), {}


def _why_kept(group: Group, selected: set[str]) -> str | None:
    if group.pinned:
        return f"its channels {group.pinned}"
    untargeted = [m.module for m in group.producers if m.module not in selected]
    if untargeted:
        return f"{untargeted[0]} is not targeted"
    return None if group.producers else "no layer creates its channels"


def _check_named_targets(
    cfg: StructuredConfig, groups: list[Group], reasons: list[str | None]
) -> None:
    """A module the user named exactly must be prunable; raise naming why it is not."""
    if "targets" not in cfg.model_fields_set:
        return
    for name in cfg.targets:
        for group, why in zip(groups, reasons, strict=True):
            if why and any(m.module == name for m in group.producers):
                raise UnsupportedModuleError(
                    f"{name}: its output channels cannot be pruned ({why}); remove it from targets."
                )


def _override(cfg: StructuredConfig, modules: dict[str, nn.Module], group: Group) -> float | None:
    for sel, s in cfg.layer_sparsity.items():
        if any(matches(sel, m.module, modules[m.module]) for m in group.producers):
            return s
    return None


def _counts(
    cfg: StructuredConfig,
    sparsity: float,
    scores: list[torch.Tensor],
    fixed: list[float | None],
    costs: list[float] | None = None,
    nearest: bool = False,
) -> Counts:
    sizes = [len(s) for s in scores]
    if cfg.scope == "layer":
        fractions = [sparsity if f is None else f for f in fixed]
        counts = layer_counts(sizes, fractions, cfg.max_sparsity)
    else:
        free = [i for i, f in enumerate(fixed) if f is None]
        free_costs = None if costs is None else [costs[i] for i in free]
        pooled = global_counts([scores[i] for i in free], sparsity, cfg.max_sparsity, free_costs)
        own = layer_counts(sizes, [f or 0.0 for f in fixed], cfg.max_sparsity)
        counts = list(own)
        for i, c in zip(free, pooled, strict=True):
            counts[i] = c
    return round_counts(sizes, counts, cfg.round_to, nearest)


@dataclass(frozen=True)
class FlopsBudget:
    """What counts of removed channels cost: the predicted FLOPs as a fraction of the
    reference model's, and whether they fit ``flops_target`` of it (the one test both the
    bisection and the search use)."""

    predict: Callable[[Counts], float]
    reference: float
    target: float

    def kept(self, counts: Counts) -> float:
        """The fraction of the reference FLOPs ``counts`` keep."""
        return self.predict(counts) / self.reference

    def fits(self, counts: Counts) -> bool:
        """Whether ``counts`` keep at most ``target`` of the reference FLOPs."""
        return self.predict(counts) <= self.target * self.reference


def _counts_for_flops(
    cfg: StructuredConfig,
    model: nn.Module,
    ctx: Context,
    groups: list[Group],
    scores: list[torch.Tensor],
    fixed: list[float | None],
) -> tuple[Counts, FlopsBudget]:
    """Bisection on the sparsity for the least pruning whose predicted FLOPs fit the target,
    then (global scope) channels given back greedily while the budget still holds."""
    assert cfg.flops_target is not None
    flops = layer_flops(model, ctx)
    total = float(count_flops(model, ctx.example_inputs))
    reference = total
    if cfg.flops_of == "original":
        if ctx.original is None:
            raise ConfigError(
                f"{OWNER}: flops_of 'original' needs the pipeline's original model; run it "
                "through compress() or use flops_of: model"
            )
        reference = float(count_flops(ctx.original, ctx.example_inputs))
    budget = FlopsBudget(lambda c: predicted_flops(groups, c, flops, total), reference,
                         cfg.flops_target)  # fmt: skip
    costs = channel_costs(groups, flops, total) if cfg.flops_aware else None

    def counts_at(s: float) -> Counts:
        return _counts(cfg, s, scores, fixed, costs, nearest=True)

    best = least_that_fits(counts_at, cfg.max_sparsity, budget.fits)
    if best is None:
        most = budget.kept(counts_at(cfg.max_sparsity))
        raise UnsupportedModuleError(
            f"{OWNER}: flops_target {cfg.flops_target} is out of reach; pruning every group to "
            f"max_sparsity {cfg.max_sparsity} keeps {most:.3f} of the FLOPs. Raise "
            "max_sparsity, target more layers or ask for a larger flops_target."
        )
    if cfg.scope == "global":
        frozen = [f is not None for f in fixed]
        best = refill(best, scores, cfg.round_to, budget.fits, frozen, costs)
    return best, budget


@technique(OWNER, StructuredConfig)
def apply_structured(model: nn.Module, cfg: StructuredConfig, ctx: Context) -> nn.Module:
    """Remove whole channels/neurons/heads along coupled groups; the model really shrinks."""
    groups, owners = find_groups(model, ctx)
    strict = "targets" in cfg.model_fields_set
    picked = select_modules(model, cfg.targets, cfg.ignore, owner=OWNER, strict_targets=strict)
    selected = {name for name, _ in picked}
    reasons = [_why_kept(g, selected) for g in groups]
    _check_named_targets(cfg, groups, reasons)
    live = [i for i, why in enumerate(reasons) if why is None]
    if not live:
        why = next((w for w in reasons if w), "the model has no prunable channels")
        raise UnsupportedModuleError(f"{OWNER}: nothing can be pruned; e.g. {why}.")
    chosen = [groups[i] for i in live]
    batches = None
    if cfg.importance == "taylor":
        if not ctx.has_data():
            raise DataError(f"{OWNER} with importance 'taylor' needs labelled data; pass data=...")
        batches = list(islice(ctx.training_batches(cfg.batch_size), cfg.n_batches))
    scores = group_scores(model, chosen, cfg.importance, ctx, batches)
    modules = dict(model.named_modules())
    fixed = [_override(cfg, modules, g) for g in chosen]

    def plan_of(counts: Counts) -> tuple[Plan, Attrs]:
        keeps = [kept_channels(s, r) for s, r in zip(scores, counts, strict=True)]
        return build_plan(chosen, keeps), _head_attrs(model, groups, live, owners, keeps)

    bn_batches: list[Batch] = []
    if cfg.flops_target is not None:
        counts, budget = _counts_for_flops(cfg, model, ctx, chosen, scores, fixed)
        if cfg.search_candidates:
            bn_batches, score_batches = _search_batches(cfg, ctx)
            counts = _search(model, cfg, ctx, plan_of, [len(s) for s in scores], fixed, counts,
                             budget, bn_batches, score_batches)  # fmt: skip
        ctx.report("flops_kept_predicted", round(budget.kept(counts), 4))
    else:
        counts = _counts(cfg, cfg.sparsity, scores, fixed)
    shrink_modules(model, *plan_of(counts))
    if bn_batches:  # the model as it was scored
        recalibrate_batchnorm(model, bn_batches)
    ctx.report(
        "channels",
        {_label(g): f"{g.size - r}/{g.size}" for g, r in zip(chosen, counts, strict=True)},
    )
    kept = {_label(g): why for g, why in zip(groups, reasons, strict=True) if why}
    if kept:
        ctx.report("kept_groups", kept)
    return model


def _head_attrs(
    model: nn.Module,
    groups: list[Group],
    live: list[int],
    owners: dict[int, str],
    keeps: list[list[int]],
) -> Attrs:
    """The head counts of the attention modules whose head groups shrink."""
    attrs: Attrs = {}
    for i, keep in zip(live, keeps, strict=True):
        if i in owners:
            q, k = groups[i].members[0], groups[i].members[1]
            attrs[owners[i]] = head_attrs(model, owners[i], len(keep), q.expand // k.expand)
    return attrs


def _search_batches(cfg: StructuredConfig, ctx: Context) -> tuple[list[Batch], list[Batch]]:
    """Up to ``search_batches`` labelled training batches for BatchNorm statistics, and as
    many further ones for the loss."""
    if not ctx.has_data():
        raise DataError(f"{OWNER} with search_candidates needs labelled data; pass data=...")
    batches = list(islice(ctx.training_batches(cfg.batch_size), 2 * cfg.search_batches))
    if len(batches) < 2:
        raise DataError(
            f"{OWNER}: the search needs 2 training batches or more (BatchNorm statistics, "
            f"then the loss); the data gave {len(batches)}. Pass more data."
        )
    half = len(batches) // 2
    return batches[:half], batches[half:]


def _search(
    model: nn.Module,
    cfg: StructuredConfig,
    ctx: Context,
    plan_of: Callable[[Counts], tuple[Plan, Attrs]],
    sizes: list[int],
    fixed: list[float | None],
    first: Counts,
    budget: FlopsBudget,
    bn_batches: list[Batch],
    score_batches: list[Batch],
) -> Counts:
    """The EagleEye search (:mod:`.search`) around the importance allocation ``first``;
    reported as ``search``."""

    def build(counts: Counts) -> nn.Module:
        clone = copy.deepcopy(model)
        shrink_modules(clone, *plan_of(counts))
        return clone

    def propose(generator: torch.Generator) -> Counts | None:
        return random_counts(sizes, fixed, cfg.max_sparsity, cfg.round_to, budget.fits,
                             generator)  # fmt: skip

    counts, report = search_allocation(
        first, propose, build, candidates=cfg.search_candidates, bn_batches=bn_batches,
        score_batches=score_batches, loss_fn=ctx.loss_fn, generator=ctx.generator(offset=1),
    )  # fmt: skip
    ctx.report("search", report)
    return counts


def _label(group: Group) -> str:
    names = sorted(m.module for m in group.producers) or [f"{group.members[0].module} inputs"]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} coupled)"
