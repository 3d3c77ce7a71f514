"""Store which positions of a flattened tensor are kept: a bitmask or delta-coded indices.

Two formats, and :func:`choose_index_format` picks the smaller one per tensor:

* **bitmask** — one bit per element, ``ceil(numel / 8)`` bytes, little bit order.
* **delta** — the relative indices of Han et al. 2016, "Deep Compression" (Sec. 3), with an
  escape code instead of filler zeros. Sorted positions ``p_0 < p_1 < ...`` become gaps
  ``g_i = p_i - p_{i-1}`` with ``p_{-1} = -1`` (so every ``g_i >= 1``). With ``b``-bit codes and
  ``M = 2**b - 1``, code ``0`` means "advance ``M``, no element" and code ``c`` in ``1..M`` means
  "advance ``c``, element here". A gap ``g`` is written as ``e = (g - 1) // M`` escapes followed
  by the code ``g - e * M``. The codes are then bit-packed at ``b`` bits each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from modelpress.artifact.bitpack import (
    MAX_BITS,
    _as_byte_array,
    _check_bits,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from modelpress.errors import ArtifactError

__all__ = [
    "IndexChoice", "best_delta_bits", "choose_index_format", "decode_bitmask", "decode_delta",
    "decode_index", "delta_code_count", "encode_bitmask", "encode_delta", "encode_index",
]  # fmt: skip

IndexFormat = Literal["bitmask", "delta"]
_FORMATS = "'bitmask' or 'delta'"


@dataclass(frozen=True)
class IndexChoice:
    """How one tensor's kept positions are stored."""

    format: IndexFormat  # "bitmask" or "delta"
    bits: int  # delta code width; 0 for the bitmask
    nbytes: int  # size of the encoded index, bytes


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _sorted_positions(positions: np.ndarray, numel: int | None = None) -> np.ndarray:
    """Validate kept positions (strictly increasing, >= 0, < numel) and return them as int64."""
    arr = np.asarray(positions).ravel()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"positions must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr[0] < 0 or np.any(np.diff(arr) <= 0)):
        raise ValueError("positions must be non-negative and strictly increasing")
    if arr.size and numel is not None and arr[-1] >= numel:
        raise ValueError(f"position {int(arr[-1])} is out of range for {numel} elements")
    return arr


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Gaps ``g_i = p_i - p_{i-1}`` with ``p_{-1} = -1``; all >= 1 for valid positions."""
    return np.diff(positions, prepend=-1)


def encode_bitmask(positions: np.ndarray, numel: int) -> np.ndarray:
    """Encode kept positions as a bitmask: bit ``p`` (little bit order) is 1 iff ``p`` is kept.

    Args:
        positions: strictly increasing flat indices in ``0..numel-1``.
        numel: number of elements of the tensor.

    Returns:
        ``uint8`` array of ``ceil(numel / 8)`` bytes; padding bits are 0.

    Raises:
        ValueError: if positions are unsorted, repeated, negative or ``>= numel``.
    """
    pos = _sorted_positions(positions, numel)
    mask = np.zeros(numel, dtype=np.uint8)
    mask[pos] = 1
    return np.packbits(mask, bitorder="little")


def decode_bitmask(buf: np.ndarray | bytes, numel: int) -> np.ndarray:
    """Decode a bitmask written by :func:`encode_bitmask`.

    Args:
        buf: exactly ``ceil(numel / 8)`` bytes.
        numel: number of elements of the tensor.

    Returns:
        Sorted ``int64`` positions of the set bits.

    Raises:
        ArtifactError: if ``buf`` has the wrong length or a padding bit (``>= numel``) is set.
    """
    need = packed_nbytes(numel, 1)
    data = _as_byte_array(buf)
    if data.size != need:
        raise ArtifactError(f"bitmask index holds {data.size} bytes; {numel} elements need {need}")
    positions = np.flatnonzero(np.unpackbits(data, bitorder="little"))
    if positions.size and positions[-1] >= numel:
        raise ArtifactError(f"bitmask index marks position {int(positions[-1])} >= numel {numel}")
    return positions.astype(np.int64)


def encode_delta(positions: np.ndarray, bits: int) -> np.ndarray:
    """Delta-code kept positions with ``bits``-bit codes and escapes (see the module docstring).

    Each gap ``g`` becomes ``e = (g - 1) // M`` zero codes then ``g - e*M``, ``M = 2**bits - 1``.

    Args:
        positions: strictly increasing non-negative flat indices.
        bits: code width, 1..32.

    Returns:
        ``uint32`` code array of length ``delta_code_count(positions, bits)`` (not yet packed).

    Raises:
        ValueError: if positions are unsorted, repeated or negative, or ``bits`` is outside 1..32.
    """
    _check_bits(bits)
    m = (1 << int(bits)) - 1
    gaps = _gaps(_sorted_positions(positions))
    escapes = (gaps - 1) // m
    ends = np.cumsum(escapes + 1) - 1  # index of each element's final (non-zero) code
    codes = np.zeros(int(ends[-1]) + 1 if ends.size else 0, dtype=np.uint32)
    codes[ends] = gaps - escapes * m
    return codes


def decode_delta(codes: np.ndarray, bits: int) -> np.ndarray:
    """Decode delta codes: ``step = where(c == 0, M, c)``, positions ``cumsum(step)[c != 0] - 1``.

    Trailing escape codes (e.g. padding) produce no element and are ignored.

    Args:
        codes: integer codes in ``0..2**bits - 1``.
        bits: code width, 1..32.

    Returns:
        Sorted ``int64`` positions.

    Raises:
        ArtifactError: if a code does not fit in ``bits`` bits.
        ValueError: if ``bits`` is outside 1..32.
    """
    _check_bits(bits)
    m = (1 << int(bits)) - 1
    c = np.asarray(codes).ravel().astype(np.int64)
    if c.size and (c.min() < 0 or c.max() > m):
        bad = int(c.min()) if c.min() < 0 else int(c.max())
        raise ArtifactError(f"delta code {bad} does not fit in {bits} bits")
    steps = np.where(c == 0, m, c)
    return np.cumsum(steps)[c != 0] - 1


def delta_code_count(positions: np.ndarray, bits: int) -> int:
    """Length of the code stream :func:`encode_delta` would produce: ``sum((g_i - 1) // M + 1)``.

    Args:
        positions: strictly increasing non-negative flat indices.
        bits: code width, 1..32.

    Returns:
        Number of codes (escapes included).

    Raises:
        ValueError: if positions are invalid or ``bits`` is outside 1..32.
    """
    _check_bits(bits)
    gaps = _gaps(_sorted_positions(positions))
    return int(np.sum((gaps - 1) // ((1 << int(bits)) - 1) + 1))


def best_delta_bits(positions: np.ndarray, max_bits: int = 16) -> tuple[int, int]:
    """Code width that minimises the packed delta stream, ``packed_nbytes(code_count, b)``.

    Args:
        positions: strictly increasing non-negative flat indices.
        max_bits: largest code width to try, 1..32; widths ``1..max_bits`` are compared.

    Returns:
        ``(bits, nbytes)``; on a tie the narrowest width wins.

    Raises:
        ValueError: if positions are invalid or ``max_bits`` is outside 1..32.
    """
    _check_bits(max_bits)
    gaps = _gaps(_sorted_positions(positions)) - 1  # (n,)
    widths = np.arange(1, int(max_bits) + 1, dtype=np.int64)  # (B,)
    max_codes = (np.int64(1) << widths) - 1  # M per width, (B,)
    top = int(gaps.max()) if gaps.size else 0  # widths with M > top need no escapes
    escapes = [int(np.sum(gaps // m)) if m <= top else 0 for m in max_codes.tolist()]
    counts = gaps.size + np.array(escapes, dtype=np.int64)
    nbytes = (counts * widths + 7) // 8
    best = int(np.argmin(nbytes))
    return int(widths[best]), int(nbytes[best])


def choose_index_format(positions: np.ndarray, numel: int) -> IndexChoice:
    """Pick the smaller of a bitmask (``ceil(numel / 8)`` bytes) and the best delta coding.

    Args:
        positions: strictly increasing flat indices in ``0..numel-1``.
        numel: number of elements of the tensor.

    Returns:
        An :class:`IndexChoice`; ties go to the bitmask.

    Raises:
        ValueError: if positions are unsorted, repeated, negative or ``>= numel``.
    """
    pos = _sorted_positions(positions, numel)
    mask_nbytes = packed_nbytes(numel, 1)
    bits, delta_nbytes = best_delta_bits(pos)
    if delta_nbytes < mask_nbytes:
        return IndexChoice(format="delta", bits=bits, nbytes=delta_nbytes)
    return IndexChoice(format="bitmask", bits=0, nbytes=mask_nbytes)


def encode_index(positions: np.ndarray, numel: int, choice: IndexChoice) -> np.ndarray:
    """Encode kept positions in the format of ``choice``.

    Args:
        positions: strictly increasing flat indices in ``0..numel-1``.
        numel: number of elements of the tensor.
        choice: the format and code width, usually from :func:`choose_index_format`.

    Returns:
        Packed ``uint8`` bytes: the bitmask, or the delta codes bit-packed at ``choice.bits``.

    Raises:
        ValueError: if positions are invalid or ``choice`` names an unknown format or width.
    """
    pos = _sorted_positions(positions, numel)
    if choice.format == "bitmask":
        return encode_bitmask(pos, numel)
    if choice.format == "delta":
        return pack_bits(encode_delta(pos, choice.bits), choice.bits)
    raise ValueError(f"unknown sparse index format {choice.format!r}; expected {_FORMATS}")


def decode_index(
    buf: np.ndarray | bytes, numel: int, fmt: str, bits: int, count: int
) -> np.ndarray:
    """Decode an index written by :func:`encode_index` and check it against ``numel`` and ``count``.

    For the delta format the code stream is cut after the ``count``-th non-zero code; the
    zero codes after it can only be the bit padding of the last byte.

    Args:
        buf: the packed index, exactly as :func:`encode_index` returned it.
        numel: number of elements of the tensor.
        fmt: ``"bitmask"`` or ``"delta"``.
        bits: delta code width (ignored for the bitmask).
        count: number of kept positions (nnz).

    Returns:
        Sorted ``int64`` positions, ``count`` of them.

    Raises:
        ArtifactError: if the format or width is unknown, the stream has the wrong length, holds
            more or fewer than ``count`` elements, or decodes to a position ``>= numel``.
    """
    if not _is_int(count) or count < 0:
        raise ArtifactError(f"sparse index nnz must be an integer >= 0, got {count!r}")
    if fmt == "bitmask":
        positions = decode_bitmask(buf, numel)
        if positions.size != count:
            raise ArtifactError(f"bitmask index holds {positions.size} elements but nnz is {count}")
        return positions
    if fmt != "delta":
        raise ArtifactError(f"unknown sparse index format {fmt!r}; expected {_FORMATS}")
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ArtifactError(f"delta index code width must be in 1..{MAX_BITS}, got {bits!r}")
    return _decode_delta_stream(_as_byte_array(buf), numel, int(bits), int(count))


def _decode_delta_stream(data: np.ndarray, numel: int, bits: int, count: int) -> np.ndarray:
    """Unpack every whole code in ``data``, cut after the ``count``-th element, and check it."""
    codes = unpack_bits(data, bits, data.size * 8 // bits)
    nonzero = np.flatnonzero(codes)
    if nonzero.size != count:
        raise ArtifactError(f"delta index stream holds {nonzero.size} elements but nnz is {count}")
    n_codes = int(nonzero[-1]) + 1 if count else 0
    need = packed_nbytes(n_codes, bits)
    if data.size != need:
        raise ArtifactError(
            f"delta index stream holds {data.size} bytes but its {n_codes} codes of {bits} bits "
            f"need {need}"
        )
    positions = decode_delta(codes[:n_codes], bits)
    if positions.size and positions[-1] >= numel:
        raise ArtifactError(
            f"delta index decodes to position {int(positions[-1])} in a tensor of {numel} elements"
        )
    return positions
