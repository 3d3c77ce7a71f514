"""``prune.magnitude``: unstructured magnitude pruning (Han et al. 2015, "Learning both
Weights and Connections"): zero the weights of smallest ``|w|``, layer-wise or globally.

Masks are parametrizations, so fine-tuning keeps them; see
:mod:`~modelpress.techniques.pruning.unstructured` for the ranking.
"""

from __future__ import annotations

from torch import nn

from modelpress.context import Context
from modelpress.parametrizations import effective_tensor
from modelpress.registry import technique
from modelpress.techniques.pruning.unstructured import UnstructuredConfig, prune_by_scores


class MagnitudeConfig(UnstructuredConfig):
    """Unstructured magnitude pruning to a target sparsity."""


@technique("prune.magnitude", MagnitudeConfig)
def apply_magnitude(model: nn.Module, cfg: MagnitudeConfig, ctx: Context) -> nn.Module:
    """Zero the smallest-magnitude weights, layer-wise or globally, with kept masks."""
    return prune_by_scores(
        model, cfg, ctx, "prune.magnitude", lambda module: effective_tensor(module).abs()
    )
