"""Weight-only low-bit layers as onnxruntime's block-quantized contrib ops.

A Linear becomes ``com.microsoft::MatMulNBits``: ``Y = A @ dequant(B)^T`` with ``B`` the
``(N, K)`` weight stored as ``(N, k_blocks, blob)`` bytes, ``dequant = (q - z) * s`` per block
of ``block_size`` inputs (a power of two >= 16), codes packed low bits first. An Embedding
becomes ``com.microsoft::GatherBlockQuantized`` with the same packing along each row.

Code widths: the op takes 2, 4 or 8-bit codes, so 3-bit codes travel in 4-bit containers and
5..7-bit codes in 8-bit ones (the values, and so the outputs, are unchanged). A per-channel
grid is one block per row (``block_size`` = the next power of two >= K); a group-wise grid
needs its ``group_size`` to be a power of two >= 16, otherwise export raises (it never falls
back to float silently). ``MatMulNBits`` blocks are at most 256 wide (its 2-bit kernel refuses
more, and its fast kernels for every width stop there): a wider group is split into blocks
that repeat its scale and zero point, which leaves the weight unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import UnsupportedModuleError
from modelpress.runtime.layers import WeightCodes

MIN_BLOCK = 16
MAX_MATMUL_BLOCK = 256


def container_bits(bits: int) -> int:
    """The op code width holding ``bits``-bit codes: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last axis, low bits first (the ORT layout).

    ``byte[j] = sum_i codes[j * p + i] << (i * bits)`` with ``p = 8 // bits`` codes per byte;
    the last axis is zero-padded to a multiple of ``p``.

    Args:
        codes: ``(..., n)`` integers in ``[0, 2^bits - 1]``.
        bits: 2, 4 or 8.

    Returns:
        ``(..., ceil(n / p))`` uint8.
    """
    per = 8 // bits
    codes = F.pad(codes.to(torch.int32), (0, (-codes.shape[-1]) % per))
    codes = codes.reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(..., n)`` int64 codes from ``(..., bytes)`` uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def block_size(name: str, weight: WeightCodes, max_block: int | None = None) -> int:
    """The op's ``block_size`` for ``weight``: its group size, or one block per row, capped at
    ``max_block`` (a power of two; wider groups are split, see :func:`blocked_payloads`).

    Raises:
        UnsupportedModuleError: a group size that is not a power of two >= 16 (names ``name``).
    """
    cols = weight.codes.shape[1]
    if weight.group_size is None:
        block = max(MIN_BLOCK, 1 << (cols - 1).bit_length())
    else:
        block = weight.group_size
        if block < MIN_BLOCK or block & (block - 1):
            raise UnsupportedModuleError(
                f"{name}: group_size {block} cannot be exported to MatMulNBits/GatherBlockQuantized "
                "(they need a power of two >= 16); quantize with group_size 16, 32, 64 or 128, or "
                "export with mode='fp32'."
            )
    return block if max_block is None else min(block, max_block)


def blocked_payloads(weight: WeightCodes, block: int) -> dict[str, torch.Tensor]:
    """MatMulNBits inputs: packed codes ``(rows, k_blocks, blob)``, scales ``(rows, k_blocks)``
    and zero points (see :func:`zero_payload`). The last block is padded with each row's zero
    code, which dequantizes to 0. A group wider than ``block`` repeats its scale and zero point
    in each of its blocks.
    """
    rows, cols = weight.codes.shape
    bits = container_bits(weight.bits)
    k_blocks = -(-cols // block)
    weight = _split_groups(weight, block, k_blocks)
    pad_code = torch.round(weight.zero[:, -1:]).clamp(0, (1 << weight.bits) - 1).long()
    codes = torch.cat([weight.codes, pad_code.expand(rows, k_blocks * block - cols)], dim=1)
    packed = pack_codes(codes.reshape(rows, k_blocks, block), bits)
    return {"packed": packed, "scales": weight.scale.float().contiguous(),
            "zero_points": zero_payload(weight)}  # fmt: skip


def _split_groups(weight: WeightCodes, block: int, k_blocks: int) -> WeightCodes:
    """``weight`` with one scale and zero point per ``block`` columns (groups are a multiple)."""
    width = weight.group_size or weight.codes.shape[1]
    if width <= block:
        return weight
    per_group = -(-width // block)

    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(per_group, dim=1)[:, :k_blocks].contiguous()

    return replace(weight, scale=spread(weight.scale), zero=spread(weight.zero), group_size=block)


def zero_payload(weight: WeightCodes) -> torch.Tensor | None:
    """Zero points as the ops take them: None when the default ``2^(bits-1)`` of the container
    is right (symmetric grids), float32 ``(rows, groups)`` when real-valued, else packed uint8
    ``(rows, ceil(groups * bits / 8))``."""
    bits = container_bits(weight.bits)
    if weight.float_zero:
        return weight.zero.float().contiguous()
    if weight.symmetric and bits == weight.bits:
        return None
    return pack_codes(weight.zero.long(), bits)


def dequantize_rows(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block: int,
    cols: int | None = None,
) -> torch.Tensor:
    """The float rows of packed codes: ``(q - z) * s`` with one ``(s, z)`` per ``block`` codes.

    Args:
        packed: ``(rows, ..., bytes)`` packed codes (flattened per row).
        scales: ``(rows, groups)``.
        zero_points: as :func:`zero_payload` makes them.
        bits: the container width.
        block: codes per group.
        cols: columns to keep (default: ``groups * block`` clipped to the codes present).

    Returns:
        ``(rows, cols)`` float32.
    """
    rows, groups = scales.shape
    q = unpack_codes(packed.reshape(rows, -1), bits, groups * block).float()
    if zero_points is None:
        z = torch.full_like(scales, float(1 << (bits - 1)))
    elif zero_points.dtype == torch.uint8:
        z = unpack_codes(zero_points, bits, groups).float()
    else:
        z = zero_points
    width = q.shape[1]
    s = scales.repeat_interleave(block, dim=1)[:, :width]
    w = (q - z.repeat_interleave(block, dim=1)[:, :width]) * s
    return w[:, :cols] if cols is not None else w


class _MatMulNBits(torch.autograd.Function):
    """``x @ dequant(B)^T`` in torch; ``com.microsoft::MatMulNBits`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, x, packed, scales, zero_points, bits: int, k: int):  # type: ignore[override]
        block = packed.shape[2] * 8 // bits
        w = dequantize_rows(packed, scales, zero_points, bits, block, k)  # (N, K)
        return x @ w.T.to(x.dtype)

    @staticmethod
    def symbolic(g, x, packed, scales, zero_points, bits: int, k: int):  # type: ignore[no-untyped-def]
        n, _, blob = packed.type().sizes()
        inputs = [x, packed, scales] + ([] if zero_points is None else [zero_points])
        y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits,
                 block_size_i=blob * 8 // bits)  # fmt: skip
        y.setType(x.type().with_sizes([*x.type().varyingSizes()[:-1], n]))
        return y


class NBitsLinear(nn.Module):
    """A Linear whose weight is exported as ``MatMulNBits`` (bias added after)."""

    def __init__(self, name: str, linear: nn.Linear, weight: WeightCodes) -> None:
        super().__init__()
        self.bits, self.k = container_bits(weight.bits), linear.in_features
        payloads = blocked_payloads(weight, block_size(name, weight, MAX_MATMUL_BLOCK))
        self.register_buffer("packed", payloads["packed"])
        self.register_buffer("scales", payloads["scales"])
        self.register_buffer("zero_points", payloads["zero_points"])
        self.register_buffer("in_scale", weight.in_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x / in_scale) @ dequant(B)^T + bias``."""
        if self.in_scale is not None:
            x = x / self.in_scale
        y = _MatMulNBits.apply(x, self.packed, self.scales, self.zero_points, self.bits, self.k)
        return y if self.bias is None else y + self.bias


class _GatherBlockQuantized(torch.autograd.Function):
    """Rows ``ids`` of the dequantized table in torch; ``GatherBlockQuantized`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, ids, packed, scales, zero_points, bits: int, block: int):  # type: ignore[override]
        table = dequantize_rows(packed, scales, zero_points, bits, block)
        return table[ids]

    @staticmethod
    def symbolic(g, ids, packed, scales, zero_points, bits: int, block: int):  # type: ignore[no-untyped-def]
        inputs = [packed, ids, scales] + ([] if zero_points is None else [zero_points])
        y = g.op("com.microsoft::GatherBlockQuantized", *inputs, bits_i=bits,
                 block_size_i=block, gather_axis_i=0, quantize_axis_i=1)  # fmt: skip
        dim = packed.type().sizes()[1] * 8 // bits
        y.setType(scales.type().with_sizes([*ids.type().varyingSizes(), dim]))
        return y


class NBitsEmbedding(nn.Module):
    """An Embedding whose table is exported as ``GatherBlockQuantized``."""

    def __init__(self, name: str, embedding: nn.Embedding, weight: WeightCodes) -> None:
        super().__init__()
        self.bits, self.dim = container_bits(weight.bits), embedding.embedding_dim
        if embedding.max_norm is not None or self.dim * self.bits % 8:
            raise UnsupportedModuleError(
                f"{name}: an Embedding with max_norm, or whose rows do not fill whole bytes of "
                f"{self.bits}-bit codes, cannot be exported to GatherBlockQuantized."
            )
        self.block = block_size(name, weight)
        self.register_buffer("packed", pack_codes(weight.codes, self.bits))  # (V, D*bits/8)
        self.register_buffer("scales", weight.scale.float().contiguous())  # (V, groups)
        self.register_buffer("zero_points", zero_payload(weight))
        self.register_buffer("in_scale", weight.in_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` (divided by ``in_scale`` when there is one)."""
        out = _GatherBlockQuantized.apply(ids, self.packed, self.scales, self.zero_points,
                                          self.bits, self.block)  # fmt: skip
        return out if self.in_scale is None else out / self.in_scale
