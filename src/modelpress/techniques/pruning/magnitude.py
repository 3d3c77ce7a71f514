"""``prune.magnitude``: unstructured magnitude pruning (Han et al. 2015, "Learning both
Weights and Connections"): zero the weights of smallest ``|w|``, layer-wise or globally.

Layer-wise keeps the largest ``(1 - s_l) * n_l`` weights of each layer ``l``; global ranks
every selected weight together and keeps the largest ``(1 - s) * sum(n_l)``, so layers
with many small weights lose more. Masks are parametrizations, so fine-tuning keeps them.
Ties are broken by position (a stable sort), so the same weights give the same mask.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import ConfigError
from modelpress.parametrizations import effective_tensor
from modelpress.registry import technique
from modelpress.targeting import matches, select_weighted
from modelpress.techniques.pruning.mask import set_mask

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class MagnitudeConfig(TargetedConfig):
    """Unstructured magnitude pruning to a target sparsity."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of weights to zero.")
    scope: Literal["global", "layer"] = Field(
        "global", description="Rank weights across all selected layers, or within each layer."
    )
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict,
        description="Per-layer sparsity overrides: selector -> sparsity (pruned layer-wise).",
    )


def keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * n)`` largest ``scores``.

    Args:
        scores: importance of each weight (any shape), e.g. ``|w|``.
        sparsity: fraction to remove, in [0, 1).

    Returns:
        A bool tensor of ``scores``' shape; exactly ``n - round(sparsity * n)`` True.
    """
    flat = scores.reshape(-1)
    n_prune = round(sparsity * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_prune]] = False
    return mask.reshape(scores.shape)


def _override(name: str, module: nn.Module, cfg: MagnitudeConfig) -> float | None:
    for sel, s in cfg.layer_sparsity.items():
        if matches(sel, name, module):
            return s
    return None


@technique("prune.magnitude", MagnitudeConfig)
def apply_magnitude(model: nn.Module, cfg: MagnitudeConfig, ctx: Context) -> nn.Module:
    """Zero the smallest-magnitude weights, layer-wise or globally, with kept masks."""
    for sel, s in cfg.layer_sparsity.items():
        if not 0 <= s < 1:
            raise ConfigError(
                f"The 'layer_sparsity' parameter of prune.magnitude must map selectors to "
                f"floats in [0, 1). Got {sel!r}: {s!r} instead."
            )
    selected = select_weighted(model, cfg, owner="prune.magnitude", supported=PRUNABLE)
    weights = {name: effective_tensor(m).abs() for name, m in selected}
    masks: dict[str, torch.Tensor] = {}
    pooled = []
    for name, module in selected:
        s = _override(name, module, cfg)
        if s is not None or cfg.scope == "layer":
            masks[name] = keep_mask(weights[name], cfg.sparsity if s is None else s)
        else:
            pooled.append(name)
    if pooled:
        flat = torch.cat([weights[n].reshape(-1) for n in pooled])
        keep = keep_mask(flat, cfg.sparsity).split([weights[n].numel() for n in pooled])
        masks.update({n: k.reshape(weights[n].shape) for n, k in zip(pooled, keep, strict=True)})
    modules = dict(selected)
    for name, mask in masks.items():
        set_mask(modules[name], "weight", mask)
    ctx.report("sparsity", {n: round(1 - float(m.float().mean()), 4) for n, m in masks.items()})
    return model
