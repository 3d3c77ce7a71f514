"""The weight fake-quantizer parametrization and the matching artifact codec.

:class:`AffineFakeQuant` sits on ``module.weight`` and makes the forward pass see
``(q - z) * s``; :class:`AffineCodec` stores the same ``q`` bit-packed with ``s`` and ``z``,
so a loaded artifact reproduces the in-memory weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from modelpress.artifact.bitpack import pack_bits, unpack_bits
from modelpress.artifact.codecs import EncodedValues, register_codec
from modelpress.errors import UnsupportedModuleError
from modelpress.parametrizations import find_parametrization
from modelpress.techniques.quantization.affine import (
    _DTYPES,
    Granularity,
    GroupLayout,
    compute_qparams,
    dequantize,
    fake_quantize,
    qmax,
    quantize_codes,
)


class AffineFakeQuant(nn.Module):
    """``W -> (clamp(round(W/s) + z, 0, 2^b-1) - z) * s`` per group, rounding straight-through.

    ``scale`` and ``zero_point`` are buffers fixed when the quantizer is created (from the
    weight it will quantize); later fine-tuning moves the weight, not the grid.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        *,
        symmetric: bool,
        granularity: Granularity,
        group_size: int | None,
        scale_dtype: str,
    ) -> None:
        super().__init__()
        self.bits, self.symmetric, self.scale_dtype = bits, symmetric, scale_dtype
        self.layout = GroupLayout(tuple(weight.shape), granularity, group_size)
        scale, zero = compute_qparams(self.layout.to_groups(weight), bits, symmetric, scale_dtype)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight."""
        return fake_quantize(w, self.layout, self.scale, self.zero_point, self.bits)

    def value_codec(self) -> AffineCodec:
        """The codec that stores this quantizer's integer codes in an artifact."""
        return AffineCodec(
            bits=self.bits,
            symmetric=self.symmetric,
            granularity=self.layout.granularity,
            group_size=self.layout.group_size,
            scale_dtype=self.scale_dtype,
            scale=self.scale,
            zero_point=self.zero_point,
        )


def check_unquantized(selected: list[tuple[str, nn.Module]], owner: str) -> None:
    """Raise before any change if a selected weight already carries a fake quantizer.

    Raises:
        UnsupportedModuleError: names the first such module.
    """
    for name, module in selected:
        if find_parametrization(module, "weight", AffineFakeQuant) is not None:
            raise UnsupportedModuleError(
                f"{name}: already quantized by an earlier stage; {owner} quantizes a weight "
                "once (add it to 'ignore')."
            )


@register_codec("affine")
@dataclass(frozen=True)
class AffineCodec:
    """Integer codes at ``bits`` bits, plus one scale (and zero point) per group."""

    bits: int
    symmetric: bool
    granularity: Granularity
    group_size: int | None
    scale_dtype: str
    scale: torch.Tensor
    zero_point: torch.Tensor
    name: ClassVar[str] = "affine"

    def value_bits(self) -> float:
        """``bits`` per kept value (side payloads are per group, not per value)."""
        return float(self.bits)

    def encode(
        self, values: torch.Tensor, positions: torch.Tensor | None, shape: tuple[int, ...]
    ) -> EncodedValues:
        """Recover each value's code ``round(v / s) + z``; values are already on the grid."""
        layout = GroupLayout(shape, self.granularity, self.group_size)
        if positions is None:  # every value, in order: work in the group view
            groups = layout.to_groups(values.float().reshape(shape))
            codes = quantize_codes(groups, self.scale, self.zero_point, self.bits)
            codes = layout.from_groups(codes).reshape(-1)
        else:
            s, z = _per_value(layout, self.scale, self.zero_point, positions)
            codes = torch.clamp(torch.round(values.float() / s) + z, 0, qmax(self.bits))
        payloads = {"scale": self.scale.to(_DTYPES[self.scale_dtype])}
        if not self.symmetric:
            zp = pack_bits(self.zero_point.to(torch.int64).numpy(), self.bits)
            payloads["zero_point"] = torch.from_numpy(zp)
        meta = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
        }
        return EncodedValues(meta, payloads, codes.to(torch.int64).numpy(), self.bits)

    @staticmethod
    def decode(
        meta: dict[str, Any],
        payloads: dict[str, torch.Tensor],
        codes: np.ndarray | None,
        positions: torch.Tensor | None,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """``(q - z) * s`` for each stored code, with the group of its position."""
        bits = int(meta["bits"])
        layout = GroupLayout(shape, meta["granularity"], meta["group_size"])
        scale = payloads["scale"].float()
        if meta["symmetric"]:
            zero = torch.full_like(scale, float(1 << (bits - 1)))
        else:
            zp = unpack_bits(payloads["zero_point"].numpy(), bits, layout.num_groups)
            zero = torch.from_numpy(zp).float()
        q = torch.from_numpy(np.asarray(codes)).float()
        if positions is None:  # every value, in order: the group view, as the quantizer does
            groups = layout.to_groups(q.reshape(shape))
            return layout.from_groups(dequantize(groups, scale[:, None], zero[:, None])).reshape(-1)
        s, z = _per_value(layout, scale, zero, positions)
        return dequantize(q, s, z)


def _per_value(
    layout: GroupLayout, scale: torch.Tensor, zero: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each kept value, by the group of its flat position."""
    gid = layout.group_ids(positions)
    return scale[gid], zero[gid]
