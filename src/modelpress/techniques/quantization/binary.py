"""``quant.binary``: binary weights with a per-channel scale (Rastegari et al. 2016, "XNOR-Net:
ImageNet Classification Using Binary Convolutional Neural Networks", the BWN weights).

Each output channel ``W_c`` (``n`` weights) is replaced by ``alpha_c * sign(W_c)`` with the
least-squares scale ``alpha_c = ||W_c||_1 / n = mean|W_c|`` (``sign(0) = +1``). ``alpha`` is
recomputed from the real-valued weights at every forward pass, and the next ``train`` stage
trains those through the straight-through estimator: by the chain rule through
``alpha * sign(W)``, with ``d sign(w) / d w = 1_{|w| <= 1}`` (the gradient is *cancelled*
where ``|w| > 1``, Hubara et al. 2016), the gradient is XNOR-Net's
``dC/dW_i = dC/dW~_i * (1/n + alpha * 1_{|W_i| <= 1})`` (the ``1/n`` term carried by
``alpha``'s own gradient). ``alpha`` is rounded to ``scale_dtype`` in the forward pass.

Stored at one bit per weight: :class:`BinaryCodec` packs the signs (1 = positive) and keeps
one ``alpha`` per channel. Binary weights have no zero, so a pruned layer is refused (use
``quant.ternary``, which keeps zeros). Keeping the first and last layers in full precision
is the usual practice (XNOR-Net does): list them in ``ignore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from modelpress.artifact.codecs import EncodedValues, register_codec
from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import UnsupportedModuleError
from modelpress.parametrizations import add_parametrization, effective_tensor, find_parametrization
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.quantization.affine import _DTYPES, GroupLayout
from modelpress.techniques.quantization.fake_quant import check_unquantized
from modelpress.techniques.quantization.ste import on_dtype_grid, sign_ste

OWNER = "quant.binary"
TRAINABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class BinaryConfig(TargetedConfig):
    """Binary weights ``alpha * sign(W)``, trained in the next train stage (XNOR-Net)."""

    granularity: Literal["channel", "tensor"] = Field(
        "channel", description="One alpha per output channel, or one per tensor."
    )
    scale_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Storage dtype of the scales alpha."
    )


def binary_alpha(groups: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's optimal scale ``alpha = ||W||_1 / n`` of each row of ``groups`` ``(G, n)``."""
    return groups.abs().mean(dim=1)


def binarize(
    groups: torch.Tensor, scale_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha * sign(W)`` per row of ``groups`` ``(G, n)``, with XNOR-Net's gradients.

    Args:
        groups: real-valued weights, one row per scale.
        scale_dtype: ``alpha`` is rounded to this storage dtype (and kept positive).

    Returns:
        ``(values, alpha)``: ``(G, n)`` values in ``{-alpha_g, +alpha_g}`` and ``(G,)``
        ``alpha`` as stored.
    """
    alpha = on_dtype_grid(binary_alpha(groups), scale_dtype)
    return alpha[:, None] * sign_ste(groups), alpha


class BinaryFakeQuant(nn.Module):
    """The weight as ``alpha * sign(W)``; ``scale`` holds the last ``alpha`` as stored."""

    def __init__(self, weight: torch.Tensor, granularity: str, scale_dtype: str) -> None:
        super().__init__()
        self.scale_dtype = scale_dtype
        self.layout = GroupLayout(tuple(weight.shape), granularity)  # type: ignore[arg-type]
        self.register_buffer("scale", torch.ones(self.layout.num_groups))
        self.forward(weight.detach())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The binarized weight (``alpha`` from ``w`` itself)."""
        out, alpha = binarize(self.layout.to_groups(w), self.scale_dtype)
        with torch.no_grad():
            self.scale.copy_(alpha)
        return self.layout.from_groups(out).to(w.dtype)

    def value_codec(self) -> BinaryCodec:
        """The codec storing one sign bit per weight and ``alpha`` per channel."""
        return BinaryCodec(self.layout.granularity, self.scale_dtype, self.scale.clone())


@register_codec("binary")
@dataclass(frozen=True)
class BinaryCodec:
    """One bit per value (1: ``+alpha``, 0: ``-alpha``) and one ``alpha`` per group."""

    granularity: str
    scale_dtype: str
    scale: torch.Tensor
    name: ClassVar[str] = "binary"

    def value_bits(self) -> float:
        """One bit per kept value."""
        return 1.0

    def encode(
        self, values: torch.Tensor, positions: torch.Tensor | None, shape: tuple[int, ...]
    ) -> EncodedValues:
        """The sign bit of each value; the values are already ``+-alpha``."""
        codes = (values.detach().reshape(-1) > 0).to(torch.int64).numpy()
        meta = {"granularity": self.granularity, "scale_dtype": self.scale_dtype}
        return EncodedValues(meta, {"scale": self.scale.to(_DTYPES[self.scale_dtype])}, codes, 1)

    @staticmethod
    def decode(
        meta: dict[str, Any],
        payloads: dict[str, torch.Tensor],
        codes: np.ndarray | None,
        positions: torch.Tensor | None,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """``alpha * (2 q - 1)`` for each stored bit ``q``, with the group of its position."""
        layout = GroupLayout(shape, meta["granularity"])
        q = torch.from_numpy(np.asarray(codes)).float()
        if positions is None:
            positions = torch.arange(q.numel())
        alpha = payloads["scale"].float()[layout.group_ids(positions)]
        return alpha * (2.0 * q - 1.0)


def _check_unpruned(selected: list[tuple[str, nn.Module]]) -> None:
    for name, module in selected:
        if find_parametrization(module, "weight", Mask) is not None:
            raise UnsupportedModuleError(
                f"{name}: pruned by an earlier stage, and binary weights cannot be zero; use "
                "quant.ternary (keeps zeros) or add it to 'ignore'."
            )


@technique(OWNER, BinaryConfig, needs=("later_train",))
def apply_binary(model: nn.Module, cfg: BinaryConfig, ctx: Context) -> nn.Module:
    """Binarize weights to alpha * sign(W) per channel and train them next (XNOR-Net)."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=TRAINABLE)
    check_unquantized(selected, OWNER)
    _check_unpruned(selected)
    for _, module in selected:
        quantizer = BinaryFakeQuant(effective_tensor(module), cfg.granularity, cfg.scale_dtype)
        add_parametrization(module, "weight", quantizer)
    ctx.report("bits", {n: 1 for n, _ in selected})
    return model
