"""Pack non-negative integers of a fixed bit width into a little-endian bit stream.

Layout: value ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant bit
first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. The stream is zero-padded to a
whole number of bytes, so ``n`` values take ``ceil(n * bits / 8)`` bytes. For ``bits`` in
``{8, 16, 32}`` this is exactly the plain little-endian ``uint8/16/32`` byte layout.
"""

from __future__ import annotations

import numpy as np

from modelpress.errors import ArtifactError

__all__ = ["bits_needed", "pack_bits", "packed_nbytes", "unpack_bits"]

MAX_BITS = 32
# Values per chunk on the general path; a multiple of 8, so every chunk starts on a byte.
_CHUNK_VALUES = 1 << 20
_BYTE_ALIGNED = {8: "<u1", 16: "<u2", 32: "<u4"}
_SUB_BYTE = (1, 2, 4)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def _word_dtype(bits: int) -> str:
    """Smallest little-endian unsigned dtype that holds a ``bits``-wide value."""
    return "<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4"


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed to pack ``count`` values of ``bits`` bits each.

    Args:
        count: number of values (>= 0).
        bits: width of each value, 1..32.

    Returns:
        ``ceil(count * bits / 8)``.

    Raises:
        ValueError: if ``count`` is negative or ``bits`` is outside 1..32.
    """
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (int(count) * int(bits) + 7) // 8


def bits_needed(max_value: int) -> int:
    """Smallest bit width that can hold every integer in ``0..max_value``.

    Args:
        max_value: the largest value to represent (>= 0).

    Returns:
        ``max(1, max_value.bit_length())`` — so 0 and 1 need 1 bit, 255 needs 8, 256 needs 9.

    Raises:
        ValueError: if ``max_value`` is negative.
    """
    max_value = int(max_value)
    if max_value < 0:
        raise ValueError(f"max_value must be >= 0, got {max_value}")
    return max(1, max_value.bit_length())


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers into a little-endian bit stream of ``bits`` bits per value.

    Args:
        values: integers of any integer dtype and shape (flattened in C order), each in
            ``0..2**bits - 1``.
        bits: width of each value, 1..32.

    Returns:
        1-D ``uint8`` array of ``packed_nbytes(values.size, bits)`` bytes; value ``i`` is stored
        in stream bits ``[i*bits, (i+1)*bits)``, least significant bit first; padding bits are 0.

    Raises:
        ValueError: if ``bits`` is outside 1..32, ``values`` is not an integer array, or a value
            is negative or larger than ``2**bits - 1``.
    """
    _check_bits(bits)
    bits = int(bits)
    arr = np.asarray(values).ravel()
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pack_bits needs integer values, got dtype {arr.dtype}")
    max_value = (1 << bits) - 1
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > max_value:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"pack_bits got value {bad}, outside 0..{max_value} (the range of {bits} bits)"
            )
    words = arr.astype(_word_dtype(bits))  # safe: range checked above
    if bits in _BYTE_ALIGNED:
        return words.view(np.uint8).copy()
    if bits in _SUB_BYTE:
        return _pack_sub_byte(words, bits)
    return _pack_general(words, bits)


def _pack_sub_byte(words: np.ndarray, bits: int) -> np.ndarray:
    """Pack 1/2/4-bit values: ``8 // bits`` values per byte, value j of a byte shifted by j*bits."""
    per_byte = 8 // bits
    padded = np.zeros(-(-words.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: words.size] = words
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def _pack_general(words: np.ndarray, bits: int) -> np.ndarray:
    """Pack any width by expanding each value to a ``bits``-wide row of bits, chunk by chunk."""
    width = words.dtype.itemsize
    out = np.empty(packed_nbytes(words.size, bits), dtype=np.uint8)
    for start in range(0, words.size, _CHUNK_VALUES):
        chunk = words[start : start + _CHUNK_VALUES]
        raw = chunk.view(np.uint8).reshape(-1, width)  # (m, width) little-endian bytes
        bit_rows = np.unpackbits(raw, axis=1, bitorder="little")[:, :bits]  # (m, bits)
        packed = np.packbits(bit_rows.ravel(), bitorder="little")
        byte_start = start * bits // 8  # exact: start is a multiple of 8
        out[byte_start : byte_start + packed.size] = packed
    return out


def _as_byte_array(buf: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return np.frombuffer(buf, dtype=np.uint8)
    arr = np.asarray(buf)
    if arr.dtype != np.uint8:
        raise ValueError(f"packed stream must be uint8 bytes, got dtype {arr.dtype}")
    return arr.ravel()


def unpack_bits(buf: np.ndarray | bytes, bits: int, count: int) -> np.ndarray:
    """Read ``count`` values of ``bits`` bits back from a stream written by :func:`pack_bits`.

    Args:
        buf: the packed stream (``uint8`` array or bytes-like); bytes past the first
            ``packed_nbytes(count, bits)`` are ignored.
        bits: width of each value, 1..32.
        count: number of values to read (>= 0).

    Returns:
        1-D ``int64`` array of ``count`` values.

    Raises:
        ArtifactError: if ``buf`` holds fewer than ``packed_nbytes(count, bits)`` bytes.
        ValueError: if ``bits`` is outside 1..32, ``count`` is negative, or ``buf`` is an array
            of a dtype other than ``uint8``.
    """
    need = packed_nbytes(count, bits)
    bits, count = int(bits), int(count)
    data = _as_byte_array(buf)
    if data.size < need:
        raise ArtifactError(
            f"packed stream holds {data.size} bytes but {count} values of {bits} bits "
            f"need {need} bytes"
        )
    data = data[:need]
    if bits in _BYTE_ALIGNED:
        return np.frombuffer(data.tobytes(), dtype=_BYTE_ALIGNED[bits]).astype(np.int64)
    if bits in _SUB_BYTE:
        shifts = (np.arange(8 // bits, dtype=np.uint8) * bits).astype(np.uint8)
        fields = (data[:, None] >> shifts) & np.uint8((1 << bits) - 1)  # (bytes, per_byte)
        return fields.ravel()[:count].astype(np.int64)
    return _unpack_general(data, bits, count)


def _unpack_general(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_general`: bit rows padded to a whole word, then packed per row."""
    dtype = _word_dtype(bits)
    width = np.dtype(dtype).itemsize
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK_VALUES):
        m = min(_CHUNK_VALUES, count - start)
        byte_start = start * bits // 8
        chunk = data[byte_start : byte_start + packed_nbytes(m, bits)]
        stream = np.unpackbits(chunk, count=m * bits, bitorder="little")
        rows = np.zeros((m, width * 8), dtype=np.uint8)  # (m, word bits)
        rows[:, :bits] = stream.reshape(m, bits)
        words = np.packbits(rows, axis=1, bitorder="little").view(dtype).ravel()
        out[start : start + m] = words
    return out
