"""``prune.nm``: N:M semi-structured sparsity (e.g. 2:4, as NVIDIA's sparse tensor cores run).

In every run of ``m`` consecutive weights along the input dimension, keep the ``n`` of largest
``|w|`` (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). For a convolution
``(out, in, *k)`` the groups run along ``in`` at each kernel position, as in NVIDIA's ASP.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import UnsupportedModuleError
from modelpress.parametrizations import effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.unstructured import apply_masks

NM_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NMConfig(TargetedConfig):
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension."""

    n: int = Field(2, ge=1, description="Weights kept in each group.")
    m: int = Field(4, ge=2, le=64, description="Group size along the input dimension.")

    @model_validator(mode="after")
    def _n_below_m(self) -> NMConfig:
        if self.n >= self.m:
            raise ValueError(f"'n' ({self.n}) must be smaller than 'm' ({self.m})")
        return self


def _inputs_last(w: torch.Tensor) -> torch.Tensor:
    """``(out, in, *k)`` -> ``(out, *k, in)``: the input dimension last."""
    return w.movedim(1, -1) if w.dim() > 2 else w


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the ``n`` largest of each ``m`` consecutive scores along dim 1.

    Args:
        scores: ``(out, in)`` or ``(out, in, *k)``; ``in`` divisible by ``m``.
        n: kept per group; m: group size.

    Returns:
        A bool tensor of ``scores``' shape, exactly ``n`` True in every group.
    """
    moved = _inputs_last(scores)
    groups = moved.reshape(-1, m)  # (groups, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    # a stable order: equal scores keep the earlier position
    order = torch.argsort(groups, dim=1, descending=True, stable=True)
    keep.scatter_(1, order[:, :n], True)
    mask = keep.reshape(moved.shape)
    return mask.movedim(-1, 1) if scores.dim() > 2 else mask


def check_divisible(selected: list[tuple[str, nn.Module]], m: int, owner: str) -> None:
    """Raise before any change if a layer's input dimension is not a multiple of ``m``.

    Raises:
        UnsupportedModuleError: names the first such module, its inputs and ``m``.
    """
    for name, module in selected:
        inputs = module.weight.shape[1]
        if inputs % m:
            raise UnsupportedModuleError(
                f"{name}: {inputs} inputs per output are not a multiple of m={m}, so {owner} "
                "cannot group them; add it to 'ignore' or choose another m."
            )


@technique("prune.nm", NMConfig)
def apply_nm(model: nn.Module, cfg: NMConfig, ctx: Context) -> nn.Module:
    """Keep the n largest of every m consecutive input weights (N:M sparsity)."""
    selected = select_weighted(model, cfg, owner="prune.nm", supported=NM_PRUNABLE)
    check_divisible(selected, cfg.m, "prune.nm")
    masks = {name: nm_mask(effective_tensor(m).abs(), cfg.n, cfg.m) for name, m in selected}
    apply_masks(selected, masks, ctx)
    return model
