"""``prune.random``: zero a random subset of weights, the honest baseline for comparisons.

The same sparsity, scope and overrides as ``prune.magnitude``, with uniform random scores
drawn from the run's seeded generator (Blalock et al. 2020 argue every pruning result should
be compared against it). Weights an earlier stage pruned stay pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.context import Context
from modelpress.parametrizations import effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.unstructured import (
    PRUNABLE,
    UnstructuredConfig,
    apply_masks,
    sparsity_masks,
)


class RandomConfig(UnstructuredConfig):
    """Random unstructured pruning to a target sparsity."""


@technique("prune.random", RandomConfig)
def apply_random(model: nn.Module, cfg: RandomConfig, ctx: Context) -> nn.Module:
    """Zero uniformly random weights (seeded), layer-wise or globally, with kept masks."""
    selected = select_weighted(model, cfg, owner="prune.random", supported=PRUNABLE)
    gen = ctx.generator()
    scores = {}
    for name, module in selected:
        weight = effective_tensor(module)
        # weights already pruned rank lowest, so the sparsity reached is the one asked
        scores[name] = torch.rand(weight.shape, generator=gen).masked_fill(weight == 0, -1.0)
    masks = sparsity_masks(selected, scores, cfg.sparsity, cfg.scope, cfg.layer_sparsity)
    apply_masks(selected, masks, ctx)
    return model
