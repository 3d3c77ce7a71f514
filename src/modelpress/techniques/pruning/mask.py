"""The pruning mask: a parametrization ``W -> W * mask`` kept through fine-tuning."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.parametrizations import add_parametrization, find_parametrization


class Mask(nn.Module):
    """Multiplies a weight by a fixed 0/1 mask; pruned weights get zero gradient too."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``W * mask``."""
        return w * self.mask.to(w.dtype)


def set_mask(module: nn.Module, tensor_name: str, mask: torch.Tensor) -> None:
    """Put ``mask`` on ``module.<tensor_name>``: narrow the existing mask or register one.

    An existing mask is combined with the new one (logical and), so pruning again never
    revives a weight an earlier stage removed.
    """
    existing = find_parametrization(module, tensor_name, Mask)
    if existing is not None:
        existing.mask &= mask.to(torch.bool)
        return
    add_parametrization(module, tensor_name, Mask(mask))
