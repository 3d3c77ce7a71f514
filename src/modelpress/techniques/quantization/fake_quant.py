"""The weight fake-quantizer parametrization and the matching artifact codec.

:class:`AffineFakeQuant` sits on ``module.weight`` and makes the forward pass see
``(q - z) * s``; :class:`AffineCodec` stores the same ``q`` bit-packed with ``s`` and ``z``,
so a loaded artifact reproduces the in-memory weights exactly.

What a runtime exporter reads from a quantizer ``fq`` (all float32 tensors, already rounded
to their storage dtypes, so they are exactly what the artifact holds):

* ``fq.scale``, ``fq.zero_point``: ``(num_groups,)`` per group of ``fq.layout`` (groups run
  along the inputs of each output row);
* ``fq.float_zero`` (``fq.zero_dtype == "float16"``): the zero points are real numbers (HQQ),
  codes are ``clamp(round(W / s + z), 0, 2^b - 1)``; otherwise they are integers in
  ``[0, 2^b - 1]`` and codes are ``clamp(round(W / s) + z, ...)``;
* ``fq.in_scale``: None, or ``(cols,)`` positive per-input-column scales (AWQ). The grid then
  quantizes ``W diag(in_scale)`` and the effective weight is ``dequant(q) / in_scale``, so
  ``x @ W_eff^T == (x / in_scale) @ dequant(q)^T``: the runtime divides the input by
  ``in_scale`` before the integer matmul. ``cols`` is ``in_features`` of a Linear (the
  columns of ``weight.flatten(1)`` in general).

In an artifact the codec record carries ``"zero_dtype": "float16"`` for float zero points
(the ``zero_point`` payload is then fp16 instead of bit-packed) and an ``in_scale`` payload
(fp16) when there is one; records without them are the plain integer grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from modelpress.artifact.bitpack import pack_bits, unpack_bits
from modelpress.artifact.codecs import EncodedValues, register_codec
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.parametrizations import parametrizations_of
from modelpress.techniques.quantization.affine import (
    _DTYPES,
    Granularity,
    GroupLayout,
    compute_qparams,
    dequantize,
    fake_quantize,
    qmax,
    quantize_codes,
    scale_columns,
    unscale_columns,
)

ZeroDtype = Literal["int", "float16"]


class AffineFakeQuant(nn.Module):
    """``W -> (clamp(round(W/s) + z, 0, 2^b-1) - z) * s`` per group, rounding straight-through.

    ``scale`` and ``zero_point`` are buffers fixed when the quantizer is created: min-max of
    the weight it will quantize, unless given; later fine-tuning moves the weight, not the
    grid. With ``in_scale`` the grid quantizes ``W diag(in_scale)`` and divides it back out;
    with ``zero_dtype="float16"`` the zero points are real numbers (see the module docstring).
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
        in_scale: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
        zero_dtype: ZeroDtype = "int",
    ) -> None:
        """Fix the grid of ``weight``.

        Args:
            weight: the weight to quantize (its shape and, without ``scale``, its range).
            bits, symmetric, granularity, group_size, scale_dtype: the grid.
            in_scale: ``(cols,)`` positive per-input-column scales (rounded to fp16), or None.
            scale: ``(num_groups,)`` scales to use instead of min-max (rounded to
                ``scale_dtype``); ``zero_point`` must then be given for asymmetric grids.
            zero_point: ``(num_groups,)`` zero points (rounded to integers, or to fp16).
            zero_dtype: ``"int"``, or ``"float16"`` for real-valued zero points.

        Raises:
            ConfigError: a bad ``zero_dtype``, ``in_scale``, ``scale`` or ``zero_point``.
        """
        super().__init__()
        if zero_dtype not in ("int", "float16"):
            raise ConfigError(f"zero_dtype must be 'int' or 'float16'; got {zero_dtype!r}.")
        if symmetric and zero_dtype != "int":
            raise ConfigError(
                "a symmetric grid has a fixed integer zero point; use zero_dtype 'int'."
            )
        self.bits, self.symmetric, self.scale_dtype = bits, symmetric, scale_dtype
        self.zero_dtype: ZeroDtype = zero_dtype
        self.layout = GroupLayout(tuple(weight.shape), granularity, group_size)
        in_scale = None if in_scale is None else _checked_in_scale(in_scale, weight.shape)
        self.register_buffer("in_scale", in_scale)
        if scale is None:
            w = weight.detach().float()
            w = w if in_scale is None else scale_columns(w, in_scale)
            scale, min_max_zero = compute_qparams(
                self.layout.to_groups(w), bits, symmetric, scale_dtype
            )
            zero_point = min_max_zero if zero_point is None else zero_point
        scale, zero_point = self._checked_grid(scale, zero_point)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    @property
    def float_zero(self) -> bool:
        """Whether the zero points are real numbers (stored as fp16), not integer codes."""
        return self.zero_dtype == "float16"

    def _checked_grid(
        self, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale`` and ``zero`` rounded to their storage forms; raises ConfigError if bad."""
        groups = self.layout.num_groups
        scale = scale.detach().float().reshape(-1).to(_DTYPES[self.scale_dtype]).float()
        if scale.numel() != groups or not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ConfigError(
                f"scale must hold {groups} positive finite values in {self.scale_dtype}."
            )
        if self.symmetric:
            return scale, torch.full_like(scale, float(1 << (self.bits - 1)))
        if zero is None:
            raise ConfigError("an asymmetric grid given a scale needs its zero_point too.")
        zero = zero.detach().float().reshape(-1)
        if self.float_zero:
            zero = zero.half().float()
        else:
            zero = torch.round(zero).clamp(0, qmax(self.bits))
        if zero.numel() != groups or not torch.isfinite(zero).all():
            raise ConfigError(f"zero_point must hold {groups} finite values in {self.zero_dtype}.")
        return scale, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight, ``dequant(Q(W diag(in_scale))) / in_scale``."""
        if self.in_scale is None:
            return fake_quantize(
                w, self.layout, self.scale, self.zero_point, self.bits, self.float_zero
            )
        q = fake_quantize(
            scale_columns(w, self.in_scale),
            self.layout,
            self.scale,
            self.zero_point,
            self.bits,
            self.float_zero,
        )
        return unscale_columns(q, self.in_scale)

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
            in_scale=self.in_scale,
            zero_dtype=self.zero_dtype,
        )


def _checked_in_scale(in_scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``in_scale`` as float32 rounded to fp16 (its storage dtype).

    Raises:
        ConfigError: not one positive finite fp16 value per column of ``weight.flatten(1)``.
    """
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    s = in_scale.detach().float().reshape(-1).half().float()
    if s.numel() != cols or not (torch.isfinite(s).all() and (s > 0).all()):
        raise ConfigError(
            f"in_scale must hold {cols} positive finite fp16 values (one per input column); "
            f"got shape {tuple(in_scale.shape)} with min {float(s.min()) if s.numel() else 0:.3g}."
        )
    return s


def check_unquantized(selected: list[tuple[str, nn.Module]], owner: str) -> None:
    """Raise before any change if a selected weight already carries a quantizer: any
    parametrization that stores the weight's values itself (one with a ``value_codec``:
    affine grids, LSQ, binary, ternary, fp16/bf16 casts).

    Raises:
        UnsupportedModuleError: names the first such module.
    """
    for name, module in selected:
        if any(hasattr(p, "value_codec") for p in parametrizations_of(module, "weight")):
            raise UnsupportedModuleError(
                f"{name}: already quantized by an earlier stage; {owner} quantizes a weight "
                "once (add it to 'ignore')."
            )


@register_codec("affine")
@dataclass(frozen=True)
class AffineCodec:
    """Integer codes at ``bits`` bits, plus one scale (and zero point) per group, and
    optionally per-input-column scales (``in_scale``) and fp16 zero points."""

    bits: int
    symmetric: bool
    granularity: Granularity
    group_size: int | None
    scale_dtype: str
    scale: torch.Tensor
    zero_point: torch.Tensor
    in_scale: torch.Tensor | None = None
    zero_dtype: ZeroDtype = "int"
    name: ClassVar[str] = "affine"

    def value_bits(self) -> float:
        """``bits`` per kept value (side payloads are per group, not per value)."""
        return float(self.bits)

    def encode(
        self, values: torch.Tensor, positions: torch.Tensor | None, shape: tuple[int, ...]
    ) -> EncodedValues:
        """Recover each value's code ``round(v in_scale / s) + z``; values are on the grid."""
        layout = GroupLayout(shape, self.granularity, self.group_size)
        float_zero = self.zero_dtype == "float16"
        values = values.float()
        if positions is None:  # every value, in order: work in the group view
            w = values.reshape(shape)
            w = w if self.in_scale is None else scale_columns(w, self.in_scale)
            codes = quantize_codes(
                layout.to_groups(w), self.scale, self.zero_point, self.bits, float_zero
            )
            codes = layout.from_groups(codes).reshape(-1)
        else:
            if self.in_scale is not None:
                values = values * self.in_scale[_columns(shape, positions)]
            s, z = _per_value(layout, self.scale, self.zero_point, positions)
            codes = quantize_codes(values[:, None], s, z, self.bits, float_zero)[:, 0]
        return EncodedValues(
            self._meta(), self._payloads(), codes.to(torch.int64).numpy(), self.bits
        )

    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
        }
        if self.zero_dtype != "int":
            meta["zero_dtype"] = self.zero_dtype
        return meta

    def _payloads(self) -> dict[str, torch.Tensor]:
        payloads = {"scale": self.scale.to(_DTYPES[self.scale_dtype])}
        if self.zero_dtype == "float16":
            payloads["zero_point"] = self.zero_point.half()
        elif not self.symmetric:
            zp = pack_bits(self.zero_point.to(torch.int64).numpy(), self.bits)
            payloads["zero_point"] = torch.from_numpy(zp)
        if self.in_scale is not None:
            payloads["in_scale"] = self.in_scale.half()
        return payloads

    @staticmethod
    def decode(
        meta: dict[str, Any],
        payloads: dict[str, torch.Tensor],
        codes: np.ndarray | None,
        positions: torch.Tensor | None,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """``(q - z) * s / in_scale`` for each stored code, with the group of its position."""
        bits = int(meta["bits"])
        layout = GroupLayout(shape, meta["granularity"], meta["group_size"])
        scale = payloads["scale"].float()
        if meta["symmetric"]:
            zero = torch.full_like(scale, float(1 << (bits - 1)))
        elif meta.get("zero_dtype", "int") == "float16":
            zero = payloads["zero_point"].float()
        else:
            zp = unpack_bits(payloads["zero_point"].numpy(), bits, layout.num_groups)
            zero = torch.from_numpy(zp).float()
        in_scale = payloads["in_scale"].float() if "in_scale" in payloads else None
        q = torch.from_numpy(np.asarray(codes)).float()
        if positions is None:  # every value, in order: the group view, as the quantizer does
            groups = layout.to_groups(q.reshape(shape))
            w = layout.from_groups(dequantize(groups, scale[:, None], zero[:, None]))
            w = w if in_scale is None else unscale_columns(w.reshape(shape), in_scale)
            return w.reshape(-1)
        s, z = _per_value(layout, scale, zero, positions)
        w = dequantize(q, s, z)
        return w if in_scale is None else w / in_scale[_columns(shape, positions)]


def _per_value(
    layout: GroupLayout, scale: torch.Tensor, zero: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each kept value, by the group of its flat position."""
    gid = layout.group_ids(positions)
    return scale[gid], zero[gid]


def _columns(shape: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    """Column of ``weight.flatten(1)`` of each flat position (for ``in_scale``)."""
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    return torch.remainder(positions, cols)
