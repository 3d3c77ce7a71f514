"""SmoothQuant's maths (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models").

A Linear computes ``X W^T``; for any positive ``s`` per input channel,
``X W^T = (X diag(s)^-1) (W diag(s))^T``. SmoothQuant picks
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` so that outlier input channels are divided
down and their difficulty migrates to the weight, which per-channel quantization absorbs
better: ``alpha = 0.5`` balances the two, larger values push more onto the weights.
``quant.int8_static`` keeps ``1 / s`` in the layer's :class:`InputQuantizer` (``smooth``);
the weight's columns are multiplied by ``s`` before it is quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.layerwise import set_weight
from modelpress.parametrizations import effective_tensor


def smoothing_factors(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (SmoothQuant, Eq. 4).

    Args:
        act_absmax: ``(in,)`` largest ``|x_j|`` of each input channel over the calibration data.
        weight_absmax: ``(in,)`` largest ``|W_ij|`` of each input column.
        alpha: migration strength in [0, 1].

    Returns:
        ``(in,)`` float32 factors; 1 where a channel never fired or its column is all zero
        (dividing a channel that was silent during calibration could blow it up later).
    """
    act, weight = act_absmax.double(), weight_absmax.double()
    live = (act > 0) & (weight > 0)
    s = act.clamp(min=1e-30) ** alpha / weight.clamp(min=1e-30) ** (1 - alpha)
    return torch.where(live & torch.isfinite(s) & (s > 0), s, 1.0).float()


class ChannelAbsMax:
    """Running ``max |x_j|`` over every axis but the last of the tensors fed to it."""

    def __init__(self, channels: int) -> None:
        self.absmax = torch.zeros(channels)

    def update(self, x: torch.Tensor) -> None:
        """Fold in ``x`` ``(..., channels)``."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        if len(x):
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))


def weight_column_absmax(module: nn.Linear) -> torch.Tensor:
    """``max_i |W_ij|`` of the weight as the forward pass sees it (masks applied), ``(in,)``."""
    return effective_tensor(module).abs().amax(0).float()


def smooth_weight(module: nn.Linear, factors: torch.Tensor) -> None:
    """``W <- W diag(s)``, written under any parametrization (a pruning mask keeps acting)."""
    set_weight(module, effective_tensor(module) * factors[None, :])
