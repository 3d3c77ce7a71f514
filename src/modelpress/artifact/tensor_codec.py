"""One tensor to payloads and back: layout (dense or sparse), value codec, packing.

A tensor record in the manifest::

    {"shape": [300, 784], "dtype": "float32",
     "layout": {"format": "delta", "bits": 5, "nnz": 23520},     # or bitmask, or dense
     "codec": {"name": "affine", "bits": 4, ...},                # how kept values are stored
     "packing": {"kind": "bitpack", "bits": 4, "count": 23520},  # integer codes only
     "payloads": {"index": "fc1.weight/index", "codes": "fc1.weight/codes", "scale": ...}}

The layout is chosen per tensor: positions of the nonzeros are stored (bitmask or delta-coded,
whichever is smaller) when that plus the kept values is smaller than storing every value.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from modelpress.artifact.bitpack import pack_bits, packed_nbytes, unpack_bits
from modelpress.artifact.codecs import RawCodec, ValueCodec, decoder, dtype_from_name, dtype_name
from modelpress.artifact.sparse_index import choose_index_format, decode_index, encode_index
from modelpress.errors import ArtifactError

Record = dict[str, Any]


def _sparse_layout(
    name: str, flat: torch.Tensor, codec: ValueCodec
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor] | None:
    """Layout record, index payload and kept positions, if sparse storage is smaller."""
    numel = flat.numel()
    if not numel or flat.dtype == torch.bool:
        return None
    nnz = int(torch.count_nonzero(flat))
    value_bits = codec.value_bits()
    # any index costs at least one bit per kept value: skip the search when that cannot win
    if (numel - nnz) * value_bits <= nnz:
        return None
    pos = torch.nonzero(flat, as_tuple=True)[0]
    choice = choose_index_format(pos.numpy(), numel)
    sparse_bytes = choice.nbytes + math.ceil(nnz * value_bits / 8)
    if sparse_bytes >= math.ceil(numel * value_bits / 8):
        return None
    index = torch.from_numpy(encode_index(pos.numpy(), numel, choice))
    return {"format": choice.format, "bits": choice.bits, "nnz": nnz}, index, pos


def encode_tensor(
    name: str, tensor: torch.Tensor, codec: ValueCodec | None = None
) -> tuple[Record, dict[str, torch.Tensor]]:
    """Encode ``tensor`` (the effective values the model uses) for the artifact.

    Args:
        name: the state-dict key; payload keys are ``name/<part>``.
        tensor: the tensor to store, exactly as the compressed model sees it.
        codec: how kept values are stored; default raw at the tensor's own dtype.

    Returns:
        The manifest record and the payload tensors to write.
    """
    codec = codec or RawCodec(tensor.dtype)
    flat = tensor.detach().reshape(-1)
    record: Record = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    payloads: dict[str, torch.Tensor] = {}
    positions, values, layout = None, flat, {"format": "dense"}
    sparse = _sparse_layout(name, flat, codec)
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
    positions = None
    count = numel
    if layout["format"] != "dense":
        count = int(layout["nnz"])
        idx = decode_index(
            parts.pop("index").numpy(), numel, layout["format"], layout["bits"], count
        )
        positions = torch.from_numpy(idx)
    codes = None
    if "packing" in record:
        packing = record["packing"]
        if int(packing["count"]) != count:
            raise ArtifactError(f"{name}: {packing['count']} codes stored for {count} values.")
        buf = parts.pop("codes").numpy()
        if buf.size != packed_nbytes(count, int(packing["bits"])):
            raise ArtifactError(f"{name}: packed codes have {buf.size} bytes, expected more.")
        codes = unpack_bits(buf, int(packing["bits"]), count)
    values = decoder(codec_meta.pop("name"))(codec_meta, parts, codes, positions, shape)
    if values.numel() != count:
        raise ArtifactError(f"{name}: {values.numel()} values stored, {count} expected.")
    if positions is None:
        return values.to(dtype).reshape(shape)
    out = torch.zeros(numel, dtype=dtype)
    out[positions] = values.to(dtype)
    return out.reshape(shape)
