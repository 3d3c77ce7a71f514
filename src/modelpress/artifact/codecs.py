"""Value codecs: how the kept values of one tensor become payloads, and back.

A codec sees the kept values of a tensor as a 1-D float tensor with their flat positions
(``None`` when every position is kept, in order) and returns either raw payload tensors or
integer ``codes`` of a fixed bit width plus side payloads (scales, codebooks). Integer codes
are packed by the tensor codec (bit-packed, or entropy-coded when the model carries an
``encode.*`` mark; see :mod:`~modelpress.artifact.packing`). Kept
values can include zeros (the ``nm`` layout keeps ``n`` per group even where a group has
fewer nonzeros), so a codec must give back 0.0 for a stored 0.0.

Techniques that store values differently (affine quantization, k-means codebooks) define a
codec next to their maths and register it with :func:`register_codec`; the parametrization
they put on a weight returns an instance from ``value_codec()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from modelpress.errors import ArtifactError


@dataclass
class EncodedValues:
    """A codec's output for one tensor.

    Attributes:
        meta: JSON-ready parameters the decoder needs (bits, group size, dtype, ...).
        payloads: named side tensors (scales, zero points, codebooks, or raw ``values``).
        codes: unsigned integer codes, one per kept value, or None for raw values.
        code_bits: the width of each code in bits.
    """

    meta: dict[str, Any]
    payloads: dict[str, torch.Tensor] = field(default_factory=dict)
    codes: np.ndarray | None = None
    code_bits: int = 0


class ValueCodec(Protocol):
    """Encodes the kept values of a tensor; see the module docstring."""

    name: ClassVar[str]

    def value_bits(self) -> float:
        """Approximate storage bits per kept value (to choose dense vs sparse layout)."""
        ...

    def encode(
        self, values: torch.Tensor, positions: torch.Tensor | None, shape: tuple[int, ...]
    ) -> EncodedValues:
        """Encode ``values`` (1-D) found at flat ``positions`` of a tensor of ``shape``."""
        ...


DecodeFn = Callable[
    [
        dict[str, Any],
        dict[str, torch.Tensor],
        np.ndarray | None,
        torch.Tensor | None,
        tuple[int, ...],
    ],
    torch.Tensor,
]
_DECODERS: dict[str, DecodeFn] = {}


def register_codec(name: str) -> Callable[[type], type]:
    """Register a codec class by ``name``; its static ``decode(meta, payloads, codes,
    positions, shape) -> values`` is used when loading."""

    def register(cls: type) -> type:
        _DECODERS[name] = cls.decode
        return cls

    return register


def decoder(name: str) -> DecodeFn:
    """The decode function of codec ``name``.

    Raises:
        ArtifactError: no codec of that name is known to this modelpress version.
    """
    import modelpress.techniques  # noqa: F401  (codecs register on import)

    try:
        return _DECODERS[name]
    except KeyError:
        raise ArtifactError(
            f"artifact uses value codec {name!r}, unknown to this modelpress version; "
            "upgrade modelpress to load it."
        ) from None


_RAW_DTYPES = {
    str(t).removeprefix("torch."): t
    for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``'float16'``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`.

    Raises:
        ArtifactError: an unknown dtype name.
    """
    try:
        return _RAW_DTYPES[name]
    except KeyError:
        raise ArtifactError(f"artifact names unknown dtype {name!r}.") from None


@register_codec("raw")
@dataclass(frozen=True)
class RawCodec:
    """Values stored as they are, in ``dtype`` (fp32, fp16, bf16, or any int/bool dtype)."""

    dtype: torch.dtype = torch.float32
    name: ClassVar[str] = "raw"

    def value_bits(self) -> float:
        """Bits of one value of ``dtype``."""
        return (
            1.0
            if self.dtype == torch.bool
            else float(torch.empty(0, dtype=self.dtype).element_size() * 8)
        )

    def encode(
        self, values: torch.Tensor, positions: torch.Tensor | None, shape: tuple[int, ...]
    ) -> EncodedValues:
        """Keep the values, cast to ``dtype``."""
        return EncodedValues(
            meta={"dtype": dtype_name(self.dtype)},
            payloads={"values": values.detach().to(self.dtype).contiguous()},
        )

    @staticmethod
    def decode(
        meta: dict[str, Any],
        payloads: dict[str, torch.Tensor],
        codes: np.ndarray | None,
        positions: torch.Tensor | None,
        shape: tuple[int, ...],
    ) -> torch.Tensor:
        """The stored values, in their stored dtype."""
        return payloads["values"]
