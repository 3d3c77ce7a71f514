"""The packing step with entropy coding: each integer stream coded where that is smaller.

A model marked by ``encode.huffman`` or ``encode.ans`` carries an :class:`EntropyCoding`
(a model attribute, like the edit log, so it survives ``copy.deepcopy`` and later stages).
``save`` then stores every tensor through :func:`encode_tensor_coded`, which entropy-codes
(:mod:`~modelpress.artifact.entropy`) its integer streams:

* the value codes of any codec that returns ``codes`` (affine quantization, codebook
  indices): ``"packing": {"kind": "ans", ...}`` instead of ``{"kind": "bitpack", ...}``;
* the sparse index, in one of three coded forms next to the plain ones:
  ``{"format": "gaps", "nnz": k, "packing": {...}}`` — the gaps ``p_i - p_{i-1} - 1`` between
  kept positions themselves (Han et al. 2016 Huffman-code the index differences; no escape
  codes are needed once the coder sees the whole alphabet);
  ``{"format": "bitmask", "nnz": k, "packing": {...}}`` — the mask as ``numel`` binary symbols
  (ANS only: a Huffman code spends at least a bit per symbol, never less than the plain mask);
  ``{"format": "nm", "n": .., "m": .., "bits": .., "packing": {...}}`` — the group codes.

Every choice compares true sizes: payload bytes plus the JSON bytes of the record that
describes them. The layout is the cheapest of dense, the best positional index and the best
N:M index, each with its values actually encoded and packed; a stream stays bit-packed when
coding it is not smaller, and its record says why (``"why_bitpack"``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modelpress.artifact.bitpack import bits_needed, pack_bits, unpack_bits
from modelpress.artifact.codecs import ValueCodec, dtype_name
from modelpress.artifact.entropy import CODERS, Coder, Uncodable, decode_symbols, encode_symbols
from modelpress.artifact.nm_index import decode_nm, encode_nm, find_nm_pattern
from modelpress.artifact.sparse_index import choose_index_format, encode_index
from modelpress.errors import ArtifactError

__all__ = [
    "EntropyCoding", "decode_coded_positions", "encode_tensor_coded", "entropy_coding_of",
    "pack_symbols", "set_entropy_coding",
]  # fmt: skip

Record = dict[str, Any]
Payloads = Literal["all", "values", "indices"]
PAYLOADS: tuple[Payloads, ...] = ("all", "values", "indices")
_ATTR = "_modelpress_entropy"


@dataclass(frozen=True)
class EntropyCoding:
    """How ``save`` entropy-codes a model's integer payloads.

    Attributes:
        coder: ``"huffman"`` or ``"ans"``.
        payloads: which streams: ``"all"``, only the value codes, or only sparse indices.
    """

    coder: Coder
    payloads: Payloads = "all"

    @property
    def values(self) -> Coder | None:
        """The coder for value codes, or None when they stay bit-packed."""
        return self.coder if self.payloads in ("all", "values") else None

    @property
    def indices(self) -> Coder | None:
        """The coder for sparse indices, or None when they stay as they are."""
        return self.coder if self.payloads in ("all", "indices") else None

    def to_dict(self) -> dict[str, str]:
        """The manifest entry ``{"coder": ..., "payloads": ...}``."""
        return {"coder": self.coder, "payloads": self.payloads}

    @classmethod
    def from_dict(cls, data: Any) -> EntropyCoding:
        """Inverse of :meth:`to_dict`.

        Raises:
            ArtifactError: not a coding this modelpress knows.
        """
        if (
            not isinstance(data, dict)
            or data.get("coder") not in CODERS
            or (data.get("payloads", "all") not in PAYLOADS)
        ):
            raise ArtifactError(f"artifact names an unknown entropy coding {data!r}.")
        return cls(data["coder"], data.get("payloads", "all"))


def set_entropy_coding(model: nn.Module, coding: EntropyCoding | None) -> None:
    """Mark ``model`` so that ``save`` entropy-codes its integer payloads (None: unmark)."""
    if coding is None:
        if hasattr(model, _ATTR):
            delattr(model, _ATTR)
        return
    setattr(model, _ATTR, coding)


def entropy_coding_of(model: nn.Module) -> EntropyCoding | None:
    """The model's entropy-coding mark, or None."""
    return getattr(model, _ATTR, None)


def _json_nbytes(record: Record) -> int:
    return len(json.dumps(record, separators=(",", ":")))


def pack_symbols(symbols: np.ndarray, bits: int, coder: Coder | None) -> tuple[Record, np.ndarray]:
    """Bit-pack a stream of integers, or entropy-code it when that is smaller.

    Args:
        symbols: ``(n,)`` integers in ``0..2^bits - 1``.
        bits: the bit-packing width.
        coder: the entropy coder to try, or None for plain bit-packing.

    Returns:
        ``(packing record, uint8 payload)``; the coded form is kept only when its payload
        plus record is smaller than bit-packing's, else the record says why not.
    """
    plain: tuple[Record, np.ndarray] = (
        {"kind": "bitpack", "bits": bits, "count": int(symbols.size)},
        pack_bits(symbols, bits),
    )
    if coder is None:
        return plain
    try:
        coded = encode_symbols(symbols, coder, bits)
    except Uncodable as exc:
        return {**plain[0], "why_bitpack": str(exc)}, plain[1]
    costs = [p.size + _json_nbytes(r) for r, p in (coded, plain)]
    if costs[0] < costs[1]:
        return coded
    return {**plain[0], "why_bitpack": f"{coder} {costs[0]} >= {costs[1]} B"}, plain[1]


Candidate = tuple[Record, np.ndarray | None, np.ndarray | None]  # layout, index, positions


def _coded_index(
    layout: Record, symbols: np.ndarray, bits: int, coder: Coder, pos: np.ndarray
) -> Candidate | None:
    """``layout`` with its index entropy-coded, or None when the coder cannot take it."""
    try:
        record, payload = encode_symbols(symbols, coder, bits)
    except Uncodable:
        return None
    return {**layout, "packing": record}, payload, pos


def _index_cost(candidate: Candidate) -> int:
    layout, index, _ = candidate
    return _json_nbytes(layout) + (0 if index is None else index.size)


def _positional(nonzero: np.ndarray, coder: Coder | None) -> Candidate:
    """The cheapest positional index: bitmask or delta, plain or entropy-coded."""
    pos = np.flatnonzero(nonzero)
    numel, nnz = nonzero.size, int(pos.size)
    choice = choose_index_format(pos, numel)
    found: list[Candidate | None] = [
        ({"format": choice.format, "bits": choice.bits, "nnz": nnz},
         encode_index(pos, numel, choice), pos)
    ]  # fmt: skip
    if coder is not None:
        gaps = np.diff(pos, prepend=-1) - 1
        width = bits_needed(numel - 1)
        found.append(_coded_index({"format": "gaps", "nnz": nnz}, gaps, width, coder, pos))
        if coder == "ans":  # a Huffman code cannot beat the plain mask's bit per element
            mask = nonzero.astype(np.int64)
            found.append(_coded_index({"format": "bitmask", "nnz": nnz}, mask, 1, coder, pos))
    return min((c for c in found if c is not None), key=_index_cost)


def _nm(
    nonzero: np.ndarray, shape: tuple[int, ...], value_bits: float, coder: Coder | None
) -> Candidate | None:
    """The N:M index, plain or entropy-coded (whichever is smaller), or None."""
    pattern = find_nm_pattern(nonzero, shape, value_bits)
    if pattern is None:
        return None
    index, pos = encode_nm(nonzero, shape, pattern)
    layout = {"format": "nm", "n": pattern.n, "m": pattern.m, "bits": pattern.bits}
    found: list[Candidate | None] = [(layout, index, pos)]
    if coder is not None:
        ranks = unpack_bits(index, pattern.bits, pattern.groups)
        found.append(_coded_index(layout, ranks, pattern.bits, coder, pos))
    return min((c for c in found if c is not None), key=_index_cost)


def _layouts(tensor: torch.Tensor, value_bits: float, coder: Coder | None) -> list[Candidate]:
    """Dense, and for a tensor with zeros the best positional and N:M indices."""
    dense: Candidate = ({"format": "dense"}, None, None)
    if not tensor.numel() or tensor.dtype == torch.bool:
        return [dense]
    nonzero = (tensor.reshape(-1) != 0).numpy()
    if nonzero.all():
        return [dense]
    nm = _nm(nonzero, tuple(tensor.shape), value_bits, coder)
    return [dense, _positional(nonzero, coder)] + ([nm] if nm is not None else [])


def _values(
    flat: torch.Tensor,
    candidate: Candidate,
    codec: ValueCodec,
    shape: tuple[int, ...],
    coder: Coder | None,
) -> tuple[Record, dict[str, np.ndarray | torch.Tensor], int]:
    """Encode and pack the values a layout keeps: codec record, payloads, their true cost."""
    _, _, pos = candidate
    positions = None if pos is None else torch.from_numpy(pos)
    values = flat if positions is None else flat[positions]
    enc = codec.encode(values, positions, shape)
    record: Record = {"codec": {"name": codec.name, **enc.meta}}
    parts: dict[str, np.ndarray | torch.Tensor] = {}
    cost = 0
    if enc.codes is not None:
        record["packing"], parts["codes"] = pack_symbols(enc.codes, enc.code_bits, coder)
        cost += parts["codes"].size + _json_nbytes(record["packing"])
    for part, t in enc.payloads.items():
        parts[part] = t.contiguous()
        cost += t.numel() * t.element_size()
    return record, parts, cost


def encode_tensor_coded(
    name: str, tensor: torch.Tensor, codec: ValueCodec, coding: EntropyCoding
) -> tuple[Record, dict[str, torch.Tensor]]:
    """Encode one tensor as :func:`~modelpress.artifact.tensor_codec.encode_tensor` does, with
    its integer streams entropy-coded where smaller and the layout chosen by true coded size.

    Args:
        name: the state-dict key; payload keys are ``name/<part>``.
        tensor: the effective tensor (detached).
        codec: how kept values are stored.
        coding: the coder and which payloads it codes.

    Returns:
        The manifest record and the payload tensors to write.
    """
    flat, shape = tensor.reshape(-1), tuple(tensor.shape)
    layouts = _layouts(tensor, codec.value_bits(), coding.indices)
    values = [_values(flat, c, codec, shape, coding.values) for c in layouts]
    costs = [_index_cost(c) + v[2] for c, v in zip(layouts, values, strict=True)]
    best = int(np.argmin(costs))  # ties keep the earlier: dense, positional, nm
    (layout, index, _), (value_record, parts, _) = layouts[best], values[best]
    record: Record = {"shape": list(shape), "dtype": dtype_name(tensor.dtype), "layout": layout}
    record |= value_record
    payloads: dict[str, torch.Tensor] = {}
    if index is not None:
        payloads[f"{name}/index"] = torch.from_numpy(index)
    for part, t in parts.items():
        payloads[f"{name}/{part}"] = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
    record["payloads"] = {k.removeprefix(f"{name}/"): k for k in payloads}
    return record, payloads


def decode_coded_positions(layout: Record, shape: tuple[int, ...], index: np.ndarray) -> Any:
    """Kept flat positions of an entropy-coded sparse index (a layout with ``"packing"``).

    Raises:
        ArtifactError: an unknown coded format, or a stream that is corrupt or disagrees with
            the layout (count, range, N:M group codes).
    """
    fmt, numel, nnz = layout.get("format"), math.prod(shape), layout.get("nnz")
    expected = {"gaps": nnz, "bitmask": numel, "nm": numel // max(1, _int(layout.get("m")))}
    packing = layout["packing"] if isinstance(layout["packing"], dict) else {}
    count = packing.get("count")
    if fmt in expected and (count != expected[fmt] or _int(nnz, numel) > numel):
        raise ArtifactError(f"coded {fmt} index of {count} symbols does not fit {numel} elements "
                            f"(nnz {nnz})")  # fmt: skip
    symbols = decode_symbols(_as_bytes(index), packing)
    if fmt == "gaps":
        pos = np.cumsum(symbols + 1) - 1
        if pos.size != nnz or (pos.size and pos[-1] >= numel):
            raise ArtifactError(f"gap index decodes to {pos.size} positions, not {nnz} < {numel}")
        return pos
    if fmt == "bitmask":
        pos = np.flatnonzero(symbols)
        if symbols.size != numel or pos.size != nnz:
            raise ArtifactError(f"coded bitmask holds {symbols.size} bits / {pos.size} kept, "
                                f"not {numel} / {nnz}")  # fmt: skip
        return pos
    if fmt == "nm":
        try:
            packed = pack_bits(symbols, layout.get("bits"))
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"coded nm index does not fit its layout ({exc})") from None
        return decode_nm(packed, shape, layout.get("n"), layout.get("m"), layout.get("bits"))
    raise ArtifactError(f"unknown entropy-coded layout {fmt!r}; this modelpress reads "
                        "'gaps', 'bitmask' and 'nm' (upgrade modelpress?)")  # fmt: skip


def _int(value: Any, default: int = 0) -> int:
    """``value`` if it is an int (not a bool), else ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _as_bytes(payload: np.ndarray) -> np.ndarray:
    if payload.dtype != np.uint8:
        raise ArtifactError(f"entropy-coded payload must be uint8 bytes, got {payload.dtype}")
    return payload.ravel()


def decode_coded_values(payload: np.ndarray, packing: Record, count: int) -> np.ndarray:
    """The ``count`` value codes of an entropy-coded ``codes`` payload.

    Raises:
        ArtifactError: the stream is corrupt or holds another number of codes.
    """
    codes = decode_symbols(_as_bytes(payload), packing)
    if codes.size != count:
        raise ArtifactError(f"coded stream holds {codes.size} codes for {count} values")
    return codes
