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
from modelpress.techniques.pruning.unstructured import UnstructuredConfig, prune_by_scores


class RandomConfig(UnstructuredConfig):
    """Random unstructured pruning to a target sparsity."""


@technique("prune.random", RandomConfig)
def apply_random(model: nn.Module, cfg: RandomConfig, ctx: Context) -> nn.Module:
    """Zero uniformly random weights (seeded), layer-wise or globally, with kept masks."""
    gen = ctx.generator()

    def score(module: nn.Module) -> torch.Tensor:
        weight = effective_tensor(module)
        # weights already pruned rank lowest, so the sparsity reached is the one asked
        return torch.rand(weight.shape, generator=gen).masked_fill(weight == 0, -1.0)

    return prune_by_scores(model, cfg, ctx, "prune.random", score)
