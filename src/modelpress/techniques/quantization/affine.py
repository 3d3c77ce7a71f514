"""Affine (scale, zero-point) integer quantization: the shared math of every weight quantizer.

A weight ``W`` is seen as a 2-D matrix ``(rows, cols)`` with ``rows = W.shape[0]`` (output
channels) and split into groups that each share one scale ``s`` and zero point ``z``:

* ``tensor``: one group for the whole tensor;
* ``channel``: one group per output channel (row);
* ``group``: runs of ``group_size`` consecutive inputs within a row (the last may be short).

Codes are unsigned, ``q = clamp(round(W / s) + z, 0, 2^b - 1)``, and ``W ≈ (q - z) * s``.
Asymmetric: ``lo = min(W, 0)``, ``hi = max(W, 0)``, ``s = (hi - lo) / (2^b - 1)``,
``z = round(-lo / s)``. Symmetric: ``z = 2^(b-1)``, ``s = max|W| / (2^(b-1) - 1)``.
Because the range always holds 0 and ``z`` is an integer, 0.0 is exact: pruned weights stay 0.
Scales are rounded to their storage dtype before use, so stored and in-memory weights agree.

Two optional variations: ``clip_ratio`` shrinks each group's range before the scale is taken
(AWQ's clipping search), and *float* zero points (HQQ) give codes ``clamp(round(W / s + z),
0, 2^b - 1)`` with a real-valued ``z`` (then 0.0 is no longer exact in general).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GroupLayout:
    """How a tensor of ``shape`` splits into quantization groups."""

    shape: tuple[int, ...]
    granularity: Granularity
    group_size: int | None = None

    @property
    def rows(self) -> int:
        """Rows of the 2-D view: output channels (1 for per-tensor)."""
        return 1 if self.granularity == "tensor" or not self.shape else self.shape[0]

    @property
    def cols(self) -> int:
        """Columns of the 2-D view."""
        return math.prod(self.shape) // max(self.rows, 1)

    @property
    def width(self) -> int:
        """Elements per group."""
        return self.group_size if self.granularity == "group" else self.cols  # type: ignore[return-value]

    @property
    def groups_per_row(self) -> int:
        """Groups in one row (the last group may be short)."""
        return -(-self.cols // self.width)

    @property
    def num_groups(self) -> int:
        """Total number of groups (= number of scales)."""
        return self.rows * self.groups_per_row

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` reshaped to ``(num_groups, width)``, zero-padded; zeros never move a range."""
        w2 = w.reshape(self.rows, self.cols)
        pad = self.groups_per_row * self.width - self.cols
        if pad:
            w2 = torch.nn.functional.pad(w2, (0, pad))
        return w2.reshape(self.num_groups, self.width)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups`."""
        w2 = g.reshape(self.rows, self.groups_per_row * self.width)[:, : self.cols]
        return w2.reshape(self.shape)

    def group_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Group index of each flat position (int64)."""
        row = torch.div(positions, self.cols, rounding_mode="floor")
        col = positions - row * self.cols
        return row * self.groups_per_row + torch.div(col, self.width, rounding_mode="floor")


def make_layout(
    shape: tuple[int, ...], granularity: Granularity, group_size: int | None
) -> GroupLayout:
    """The :class:`GroupLayout` of ``shape``; ``group_size`` is kept for ``group`` only (a
    config may carry a default group size next to another granularity)."""
    return GroupLayout(shape, granularity, group_size if granularity == "group" else None)


def qmax(bits: int) -> int:
    """Largest unsigned code, ``2^bits - 1``."""
    return (1 << bits) - 1


def compute_qparams(
    groups: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: str = "float16",
    clip_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zero points for each row of ``groups`` ``(G, width)``.

    Args:
        groups: ``(G, width)`` values.
        bits: code width.
        symmetric: zero point fixed at ``2^(b-1)``.
        scale_dtype: storage dtype the scales are rounded to.
        clip_ratio: ``(G,)`` factors in ``(0, 1]`` that shrink each group's range ``[lo, hi]``
            to ``[r lo, r hi]`` (values outside are clamped by the codes); None keeps it.

    Returns:
        ``(scale, zero_point)``, both float32 of shape ``(G,)``; the scale is already rounded
        to ``scale_dtype`` and clamped to its smallest normal number (no zero scales).
    """
    dtype = _DTYPES[scale_dtype]
    groups = groups.detach().float()
    if symmetric:
        half = (1 << (bits - 1)) - 1
        scale = groups.abs().amax(dim=1) / half
        if clip_ratio is not None:
            scale = scale * clip_ratio
    else:
        lo = groups.amin(dim=1).clamp(max=0)
        hi = groups.amax(dim=1).clamp(min=0)
        if clip_ratio is not None:
            lo, hi = lo * clip_ratio, hi * clip_ratio
        scale = (hi - lo) / qmax(bits)
    scale = scale.clamp(min=torch.finfo(dtype).tiny, max=torch.finfo(dtype).max)
    scale = scale.to(dtype).float()
    if symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(0, qmax(bits))
    return scale, zero


def quantize_codes(
    groups: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    float_zero: bool = False,
) -> torch.Tensor:
    """Codes ``clamp(round(x / s) + z, 0, 2^b - 1)`` for ``groups`` ``(G, width)``, as float;
    ``clamp(round(x / s + z), 0, 2^b - 1)`` when ``float_zero`` (real-valued ``z``)."""
    if float_zero:
        return torch.clamp(torch.round(groups / scale[:, None] + zero[:, None]), 0, qmax(bits))
    return torch.clamp(torch.round(groups / scale[:, None]) + zero[:, None], 0, qmax(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` elementwise; ``scale`` and ``zero`` broadcast against ``codes``."""
    return (codes - zero) * scale


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def fake_quantize(
    w: torch.Tensor,
    layout: GroupLayout,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    float_zero: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize ``w``; the gradient passes straight through the rounding (STE).

    ``float_zero`` rounds ``w / s + z`` (a real-valued zero point) instead of ``w / s``.
    """
    groups = layout.to_groups(w)
    # the same arithmetic as quantize_codes, with a rounding the gradient passes through
    if float_zero:
        codes = _RoundSTE.apply(groups / scale[:, None] + zero[:, None])
    else:
        codes = _RoundSTE.apply(groups / scale[:, None]) + zero[:, None]
    codes = torch.clamp(codes, 0, qmax(bits))
    return layout.from_groups(dequantize(codes, scale[:, None], zero[:, None])).to(w.dtype)


def scale_columns(w: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:
    """``W diag(in_scale)``: column ``j`` of the 2-D view ``(rows, cols)`` of ``w`` times
    ``in_scale[j]`` (AWQ's per-input-channel scaling), in ``w``'s shape."""
    return (w.reshape(w.shape[0], -1) * in_scale).reshape(w.shape)


def unscale_columns(w: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:
    """``W diag(in_scale)^-1``, the inverse of :func:`scale_columns` (a division, not a
    multiplication by ``1 / in_scale``, so stored and in-memory weights round alike)."""
    return (w.reshape(w.shape[0], -1) / in_scale).reshape(w.shape)
