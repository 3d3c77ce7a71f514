"""Elias-gamma codes for arrays of non-negative integers (Elias 1975, "Universal codeword sets
and representations of the integers").

The gamma code of ``v >= 1`` with ``L = floor(log2 v)`` is ``L`` zeros, a one, then the low
``L`` bits of ``v`` — ``2L + 1`` bits, so small values are cheap and no width is fixed in
advance. A value ``x >= 0`` is coded as ``v = x + 1``.

Layout of an array of ``n`` values: first the ``n`` unary prefixes (``L_i`` zeros and a one,
back to back), then the ``n`` mantissas (the low ``L_i`` bits of ``v_i``, most significant
first). The sizes are those of interleaved gamma codes, but splitting prefixes from mantissas
lets both directions run as whole-array numpy operations. Bits are ``0``/``1`` uint8 arrays;
callers pack them into bytes.
"""

from __future__ import annotations

import numpy as np

from modelpress.errors import ArtifactError

__all__ = ["gamma_bits", "gamma_decode", "gamma_encode"]

_MAX_LENGTH = 52  # mantissa bits a value may have (v < 2^53, so float64 sums stay exact)


def _lengths(v: np.ndarray) -> np.ndarray:
    """``floor(log2 v)`` exactly, for int64 ``v >= 1``."""
    length = np.floor(np.log2(v.astype(np.float64))).astype(np.int64)
    length -= (np.int64(1) << length) > v  # float rounding near powers of two
    length += (np.int64(1) << (length + 1)) <= v
    return length


def gamma_bits(values: np.ndarray) -> int:
    """Bits the gamma code of ``values`` takes: ``sum(2 floor(log2(x + 1)) + 1)``."""
    values = np.asarray(values, dtype=np.int64).ravel()
    return int((2 * _lengths(values + 1) + 1).sum())


def gamma_encode(values: np.ndarray) -> np.ndarray:
    """The gamma code of ``values`` (prefixes, then mantissas) as a ``0``/``1`` uint8 array.

    Args:
        values: non-negative integers below ``2^53 - 1``.

    Returns:
        ``(gamma_bits(values),)`` uint8 bits.
    """
    v = np.asarray(values, dtype=np.int64).ravel() + 1
    if v.size and (int(v.min()) < 1 or int(v.max()) >= 1 << (_MAX_LENGTH + 1)):
        raise ValueError(f"gamma codes here take integers in 0..2^{_MAX_LENGTH + 1} - 2")
    length = _lengths(v)
    prefix = np.zeros(int((length + 1).sum()), dtype=np.uint8)
    prefix[np.cumsum(length + 1) - 1] = 1
    starts = np.repeat(np.cumsum(length) - length, length)  # mantissa start per mantissa bit
    within = np.arange(starts.size) - starts
    shift = np.repeat(length, length) - 1 - within  # MSB first
    mantissa = ((np.repeat(v, length) >> shift) & 1).astype(np.uint8)
    return np.concatenate([prefix, mantissa])


def gamma_decode(bits: np.ndarray, start: int, count: int) -> tuple[np.ndarray, int]:
    """Read ``count`` gamma-coded values from ``bits`` starting at bit ``start``.

    Args:
        bits: ``0``/``1`` uint8 array.
        start: the bit where the array's prefixes begin.
        count: how many values to read.

    Returns:
        ``(values, end)``: ``(count,)`` int64 values and the bit just past the mantissas.

    Raises:
        ArtifactError: the bits end before ``count`` values, or a prefix is impossibly long.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), start
    ones = np.flatnonzero(bits[start:])[:count] + start
    if ones.size < count:
        raise ArtifactError(f"gamma-coded table ends after {ones.size} of {count} values")
    length = np.diff(ones, prepend=start - 1) - 1
    if int(length.max()) > _MAX_LENGTH:
        raise ArtifactError(f"gamma-coded table has a {int(length.max())}-bit value (corrupt)")
    body = int(ones[-1]) + 1
    end = body + int(length.sum())
    if end > bits.size:
        raise ArtifactError(f"gamma-coded table needs {end} bits, holds {bits.size}")
    owner = np.repeat(np.arange(count), length)
    within = np.arange(end - body) - np.repeat(np.cumsum(length) - length, length)
    shift = np.repeat(length, length) - 1 - within
    place = bits[body:end] * np.exp2(shift)  # each mantissa bit's value; sums exact in float64
    low = np.bincount(owner, weights=place, minlength=count).astype(np.int64)
    return (np.int64(1) << length) + low - 1, end
