"""Bytes as the artifact stores them: per tensor, per (layer, bit width), and the fp32 size.

Nothing here is a formula of its own: a layer's cost at ``b`` bits is the payload bytes
:func:`~modelpress.artifact.tensor_codec.encode_tensor` writes for its quantized weight
(bit-packed codes, scales and zero points, and a sparse index if that is smaller), and the
rest of the model counts at the bytes :func:`~modelpress.artifact.save.encode_model` writes for
it now.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from modelpress.artifact.bitpack import packed_nbytes
from modelpress.artifact.codecs import ValueCodec
from modelpress.artifact.save import encode_model
from modelpress.artifact.tensor_codec import encode_tensor
from modelpress.parametrizations import effective_state_dict


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a payload tensor in the safetensors file."""
    return t.numel() * t.element_size()


def encoded_bytes(name: str, tensor: torch.Tensor, codec: ValueCodec | None = None) -> int:
    """Payload bytes the artifact writes for ``tensor`` with ``codec`` (raw if None)."""
    _, payloads = encode_tensor(name, tensor, codec)
    return sum(nbytes(t) for t in payloads.values())


def dense_bytes(tensor: torch.Tensor, codec: ValueCodec) -> int:
    """Payload bytes of ``tensor`` with ``codec`` in the dense layout (every value stored).

    The artifact picks a sparse layout only when it is smaller, so this bounds what any
    tensor on the same grid costs, whichever of its values end up zero.
    """
    enc = codec.encode(tensor.reshape(-1), None, tuple(tensor.shape))
    codes = 0 if enc.codes is None else packed_nbytes(enc.codes.size, enc.code_bits)
    return codes + sum(nbytes(t) for t in enc.payloads.values())


def other_bytes(model: nn.Module, weights: Collection[str]) -> int:
    """Payload bytes of everything in the model's artifact except the tensors ``weights``.

    A tensor stored as an alias of one of ``weights`` (a tied weight) counts at its own raw
    size: once its partner is quantized, the two no longer share values.
    """
    records, payloads = encode_model(model)
    state = effective_state_dict(model)
    total = 0
    for name, record in records.items():
        if name in weights:
            continue
        if record.get("alias_of") in weights:
            total += encoded_bytes(name, state[name])
        else:
            total += sum(nbytes(payloads[key]) for key in record.get("payloads", {}).values())
    return total


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors stored densely, floating ones at 4 bytes per value (tied
    tensors once): the size a ``ratio`` divides."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0
    for tensor in effective_state_dict(model).values():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return total
