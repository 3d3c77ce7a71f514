"""One tensor to payloads and back: layout (dense or sparse), value codec, packing.

A tensor record in the manifest::

    {"shape": [300, 784], "dtype": "float32",
     "layout": {"format": "delta", "bits": 5, "nnz": 23520},     # or bitmask, nm, or dense
     "codec": {"name": "affine", "bits": 4, ...},                # how kept values are stored
     "packing": {"kind": "bitpack", "bits": 4, "count": 23520},  # integer codes only
     "payloads": {"index": "fc1.weight/index", "codes": "fc1.weight/codes", "scale": ...}}

An N:M tensor's layout is ``{"format": "nm", "n": 2, "m": 4, "bits": 3}``: one combinadic
code per group (see :mod:`~modelpress.artifact.nm_index`) and ``groups * n`` kept values.

The layout is chosen per tensor as the smallest of dense, bitmask, delta and nm, counting
the index bytes plus the kept values' bytes (nm may keep a few zeros, so more than nnz).
Kept values go to the value codec in ascending flat-position order in every sparse layout.

With an :class:`~modelpress.artifact.packing.EntropyCoding` (``encode.huffman``/``encode.ans``)
the integer streams — value codes and sparse indices — may be entropy-coded instead: the
packing record (and a sparse layout's own ``"packing"``) then names the coder, and the
layout is chosen by true coded size; see :mod:`~modelpress.artifact.packing`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from modelpress.artifact.bitpack import pack_bits, packed_nbytes, unpack_bits
from modelpress.artifact.codecs import RawCodec, ValueCodec, decoder, dtype_from_name, dtype_name
from modelpress.artifact.nm_index import NMPattern, decode_nm, encode_nm, find_nm_pattern
from modelpress.artifact.packing import (
    EntropyCoding,
    decode_coded_positions,
    decode_coded_values,
    encode_tensor_coded,
)
from modelpress.artifact.sparse_index import (
    IndexChoice,
    choose_index_format,
    decode_index,
    encode_index,
)
from modelpress.errors import ArtifactError

Record = dict[str, Any]
SparseLayout = tuple[Record, torch.Tensor, torch.Tensor]  # layout record, index, kept positions
_SPARSE_FORMATS = ("bitmask", "delta", "nm")


def _values_nbytes(count: int, value_bits: float) -> int:
    """Bytes of ``count`` kept values at ``value_bits`` each."""
    return math.ceil(count * value_bits / 8)


def _positional_choice(nonzero: np.ndarray, value_bits: float) -> tuple[int, IndexChoice] | None:
    """Bytes (index + values) and format of the best bitmask/delta index of the nonzeros."""
    numel, nnz = nonzero.size, int(np.count_nonzero(nonzero))
    # a bitmask or delta index costs at least one bit per kept value: skip when that cannot win
    if (numel - nnz) * value_bits <= nnz:
        return None
    choice = choose_index_format(np.flatnonzero(nonzero), numel)
    return choice.nbytes + _values_nbytes(nnz, value_bits), choice


def _encode_layout(
    nonzero: np.ndarray, shape: tuple[int, ...], choice: IndexChoice | NMPattern
) -> SparseLayout:
    """Layout record, index payload and kept positions for the chosen sparse layout."""
    if isinstance(choice, NMPattern):
        index, pos = encode_nm(nonzero, shape, choice)
        layout = {"format": "nm", "n": choice.n, "m": choice.m, "bits": choice.bits}
    else:
        pos = np.flatnonzero(nonzero)
        index = encode_index(pos, nonzero.size, choice)
        layout = {"format": choice.format, "bits": choice.bits, "nnz": int(pos.size)}
    return layout, torch.from_numpy(index), torch.from_numpy(pos)


def _sparse_layout(tensor: torch.Tensor, codec: ValueCodec) -> SparseLayout | None:
    """The smallest sparse layout of ``tensor``, if it is smaller than storing every value."""
    if not tensor.numel() or tensor.dtype == torch.bool:
        return None
    nonzero = (tensor.reshape(-1) != 0).numpy()
    if nonzero.all():  # no layout can skip a value
        return None
    value_bits = codec.value_bits()
    shape = tuple(tensor.shape)
    best_nbytes = _values_nbytes(tensor.numel(), value_bits)  # dense
    best: IndexChoice | NMPattern | None = None
    positional = _positional_choice(nonzero, value_bits)
    if positional is not None and positional[0] < best_nbytes:
        best_nbytes, best = positional
    pattern = find_nm_pattern(nonzero, shape, value_bits)
    if pattern is not None and pattern.nbytes(value_bits) < best_nbytes:
        best = pattern
    return None if best is None else _encode_layout(nonzero, shape, best)


def encode_tensor(
    name: str,
    tensor: torch.Tensor,
    codec: ValueCodec | None = None,
    coding: EntropyCoding | None = None,
) -> tuple[Record, dict[str, torch.Tensor]]:
    """Encode ``tensor`` (the effective values the model uses) for the artifact.

    Args:
        name: the state-dict key; payload keys are ``name/<part>``.
        tensor: the tensor to store, exactly as the compressed model sees it.
        codec: how kept values are stored; default raw at the tensor's own dtype.
        coding: entropy-code the integer streams where smaller (None: bit-packing only).

    Returns:
        The manifest record and the payload tensors to write.
    """
    codec = codec or RawCodec(tensor.dtype)
    tensor = tensor.detach()
    if coding is not None:
        return encode_tensor_coded(name, tensor, codec, coding)
    flat = tensor.reshape(-1)
    record: Record = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    payloads: dict[str, torch.Tensor] = {}
    positions, values, layout = None, flat, {"format": "dense"}
    sparse = _sparse_layout(tensor, codec)
    if sparse is not None:
        layout, payloads[f"{name}/index"], positions = sparse
        values = flat[positions]
    record["layout"] = layout
    enc = codec.encode(values, positions, tuple(tensor.shape))
    record["codec"] = {"name": codec.name, **enc.meta}
    if enc.codes is not None:
        packed = pack_bits(enc.codes, enc.code_bits)
        payloads[f"{name}/codes"] = torch.from_numpy(packed)
        record["packing"] = {"kind": "bitpack", "bits": enc.code_bits, "count": int(enc.codes.size)}
    for part, t in enc.payloads.items():
        payloads[f"{name}/{part}"] = t.contiguous()
    record["payloads"] = {k.removeprefix(f"{name}/"): k for k in payloads}
    return record, payloads


def _decode_positions(
    name: str, layout: Record, shape: tuple[int, ...], index: torch.Tensor | None
) -> torch.Tensor | None:
    """Kept flat positions of a sparse layout, or None for dense.

    Raises:
        ArtifactError: naming the tensor, for an unknown or incomplete layout record, a
            missing index, or an index payload that is corrupt or short.
    """
    fmt = layout.get("format")
    if fmt == "dense":
        return None
    if "packing" in layout:
        return _decode_coded_positions(name, layout, shape, index)
    if fmt not in _SPARSE_FORMATS:
        raise ArtifactError(
            f"{name}: unknown layout {fmt!r}; this modelpress reads 'dense', 'bitmask', "
            "'delta' and 'nm' (upgrade modelpress?)."
        )
    if index is None:
        raise ArtifactError(f"{name}: the {fmt} layout has no index payload.")
    buf = index.numpy()
    try:
        if fmt == "nm":
            pos = decode_nm(buf, shape, layout["n"], layout["m"], layout["bits"])
        else:
            pos = decode_index(buf, math.prod(shape), fmt, layout["bits"], layout["nnz"])
    except KeyError as exc:
        raise ArtifactError(f"{name}: the {fmt} layout record lacks {exc}.") from None
    except ArtifactError as exc:
        raise ArtifactError(f"{name}: {exc}.") from None
    return torch.from_numpy(pos)


def _decode_coded_positions(
    name: str, layout: Record, shape: tuple[int, ...], index: torch.Tensor | None
) -> torch.Tensor:
    """Kept positions of an entropy-coded sparse index, errors naming the tensor."""
    if index is None:
        raise ArtifactError(
            f"{name}: the coded {layout.get('format')} layout has no index payload."
        )
    try:
        pos = decode_coded_positions(layout, shape, index.numpy())
    except ArtifactError as exc:
        raise ArtifactError(f"{name}: {exc}.") from None
    return torch.from_numpy(pos)


def _decode_codes(name: str, packing: Record, count: int, buf: np.ndarray) -> np.ndarray:
    """The ``count`` integer codes of a packed (bit-packed or entropy-coded) payload."""
    if int(packing["count"]) != count:
        raise ArtifactError(f"{name}: {packing['count']} codes stored for {count} values.")
    if packing.get("kind", "bitpack") != "bitpack":
        try:
            return decode_coded_values(buf, packing, count)
        except ArtifactError as exc:
            raise ArtifactError(f"{name}: {exc}.") from None
    if buf.size != packed_nbytes(count, int(packing["bits"])):
        raise ArtifactError(f"{name}: packed codes have {buf.size} bytes, expected more.")
    return unpack_bits(buf, int(packing["bits"]), count)


def decode_tensor(name: str, record: Record, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the tensor ``name`` from its ``record`` and the stored payloads.

    Raises:
        ArtifactError: a payload is missing, or the record and payloads disagree.
    """
    try:
        parts = {part: stored[key] for part, key in record["payloads"].items()}
        shape = tuple(int(d) for d in record["shape"])
        dtype = dtype_from_name(record["dtype"])
        layout, codec_meta = record["layout"], dict(record["codec"])
    except KeyError as exc:
        raise ArtifactError(f"{name}: the artifact is missing {exc} for this tensor.") from None
    numel = math.prod(shape)
    positions = _decode_positions(name, layout, shape, parts.pop("index", None))
    count = numel if positions is None else positions.numel()
    codes = None
    if "packing" in record:
        codes = _decode_codes(name, record["packing"], count, parts.pop("codes").numpy())
    values = decoder(codec_meta.pop("name"))(codec_meta, parts, codes, positions, shape)
    if values.numel() != count:
        raise ArtifactError(f"{name}: {values.numel()} values stored, {count} expected.")
    if positions is None:
        return values.to(dtype).reshape(shape)
    out = torch.zeros(numel, dtype=dtype)
    out[positions] = values.to(dtype)
    return out.reshape(shape)
