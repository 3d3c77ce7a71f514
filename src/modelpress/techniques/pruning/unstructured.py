"""Shared maths of unstructured pruning: rank scores, keep the top, layer-wise or globally.

Layer-wise keeps the largest ``(1 - s_l) * n_l`` scores of each layer ``l``; global ranks every
selected weight together and keeps the largest ``(1 - s) * sum(n_l)``, so layers with many
low scores lose more. Ties are broken by position (a stable sort): same scores, same mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from modelpress.config import LayerFractions, TargetedConfig
from modelpress.context import Context
from modelpress.targeting import matches, select_weighted
from modelpress.techniques.pruning.mask import set_mask

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
Selected = list[tuple[str, nn.Module]]


class UnstructuredConfig(TargetedConfig):
    """Unstructured pruning to a target sparsity, layer-wise or global."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of weights to zero.")
    scope: Literal["global", "layer"] = Field(
        "global", description="Rank weights across all selected layers, or within each layer."
    )
    layer_sparsity: LayerFractions = Field(
        default_factory=dict,
        description="Per-layer sparsity overrides: selector -> sparsity (pruned layer-wise).",
    )


def keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``n - round(sparsity * n)`` largest ``scores``.

    Args:
        scores: importance of each weight (any shape), e.g. ``|w|``.
        sparsity: fraction to remove, in [0, 1).

    Returns:
        A bool tensor of ``scores``' shape with exactly ``n - round(sparsity * n)`` True.
    """
    flat = scores.reshape(-1)
    n_prune = round(sparsity * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_prune]] = False
    return mask.reshape(scores.shape)


def _override(name: str, module: nn.Module, layer_sparsity: dict[str, float]) -> float | None:
    for sel, s in layer_sparsity.items():
        if matches(sel, name, module):
            return s
    return None


def sparsity_masks(
    selected: Selected,
    scores: dict[str, torch.Tensor],
    sparsity: float,
    scope: str,
    layer_sparsity: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep masks for each selected layer from its ``scores`` (higher = more important).

    Layers named in ``layer_sparsity`` (by selector) are pruned layer-wise to their own
    value; the rest layer-wise or pooled globally to ``sparsity`` as ``scope`` says.
    """
    masks: dict[str, torch.Tensor] = {}
    pooled = []
    for name, module in selected:
        s = _override(name, module, layer_sparsity or {})
        if s is not None or scope == "layer":
            masks[name] = keep_mask(scores[name], sparsity if s is None else s)
        else:
            pooled.append(name)
    if pooled:
        flat = torch.cat([scores[n].reshape(-1) for n in pooled])
        keep = keep_mask(flat, sparsity).split([scores[n].numel() for n in pooled])
        masks.update({n: k.reshape(scores[n].shape) for n, k in zip(pooled, keep, strict=True)})
    return masks


def apply_masks(selected: Selected, masks: dict[str, torch.Tensor], ctx: Context | None) -> None:
    """Put each mask on its module's weight and report the resulting per-layer sparsity."""
    modules = dict(selected)
    for name, mask in masks.items():
        set_mask(modules[name], "weight", mask)
    if ctx is not None:
        ctx.report("sparsity", {n: round(1 - float(m.float().mean()), 4) for n, m in masks.items()})


def prune_by_scores(
    model: nn.Module,
    cfg: UnstructuredConfig,
    ctx: Context,
    owner: str,
    score: Callable[[nn.Module], torch.Tensor],
) -> nn.Module:
    """Select ``cfg``'s layers, score each weight with ``score(module)`` (higher = keep),
    mask to ``cfg``'s sparsity (layer-wise or global, with overrides) and report."""
    selected = select_weighted(model, cfg, owner=owner, supported=PRUNABLE)
    scores = {name: score(module) for name, module in selected}
    masks = sparsity_masks(selected, scores, cfg.sparsity, cfg.scope, cfg.layer_sparsity)
    apply_masks(selected, masks, ctx)
    return model
