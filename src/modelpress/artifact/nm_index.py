"""Store the kept positions of an N:M-sparse tensor as one combinadic code per group.

An N:M tensor keeps at most ``n`` of every ``m`` consecutive weights along the input
dimension (dim 1; for a convolution ``(out, in, *k)`` the groups run along ``in`` at each
kernel position, as ``prune.nm`` makes them). The tensor is viewed as ``(groups, m)`` with
the input dimension moved last, ``(out, *k, in) -> (out * prod(k) * in / m, m)``, and each
group's kept set — an ``n``-subset ``c_0 < c_1 < ... < c_{n-1}`` of ``range(m)`` — is stored
as its rank in the combinatorial number system (Knuth, TAOCP 7.2.1.3, "combinadic")::

    rank = C(c_0, 1) + C(c_1, 2) + ... + C(c_{n-1}, n)          in 0 .. C(m, n) - 1

which orders the subsets co-lexicographically (for 2:4: {0,1}=0, {0,2}=1, {1,2}=2, {0,3}=3,
{1,3}=4, {2,3}=5). The codes, group by group in the order above, are bit-packed at
``ceil(log2 C(m, n))`` bits each (2:4 -> 3 bits per 4 weights, 4:8 -> 7 per 8, 1:4 -> 2 per
4). Every group stores exactly ``n`` positions, so a tensor keeps ``groups * n`` values and
needs no count: a group with fewer nonzeros also keeps its earliest zero positions.

Ranking and unranking use a ``(m, n + 1)`` table of binomials, never a table of subsets, so
memory is ``O(m * n)`` whatever ``C(m, n)`` is. Bounds: ``m <= 64`` keeps every binomial in
int64, and ``C(m, n) <= 2**32`` keeps a code within bitpack's 32 bits; anything else is
not stored as N:M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpress.artifact.bitpack import MAX_BITS, bits_needed, pack_bits, packed_nbytes, unpack_bits
from modelpress.errors import ArtifactError

__all__ = [
    "CANDIDATE_GROUP_SIZES", "MAX_GROUP_SIZE", "NMPattern", "code_bits", "decode_nm", "encode_nm",
    "find_nm_pattern", "rank_subsets", "unrank_subsets",
]  # fmt: skip

CANDIDATE_GROUP_SIZES = (2, 4, 8, 16)  # the m tried when looking for an N:M pattern
MAX_GROUP_SIZE = 64  # C(c, k) for every c < 64 fits int64 (the largest, C(63, 31), is < 2**60)


def _check_nm(n: int, m: int) -> None:
    """Raise ValueError unless ``1 <= n < m <= 64`` and ``C(m, n) <= 2**32``."""
    if not 1 <= n < m <= MAX_GROUP_SIZE:
        raise ValueError(f"N:M needs 1 <= n < m <= {MAX_GROUP_SIZE}, got n={n}, m={m}")
    if math.comb(m, n) > 1 << MAX_BITS:
        raise ValueError(f"C({m}, {n}) = {math.comb(m, n)} codes do not fit in {MAX_BITS} bits")


def code_bits(n: int, m: int) -> int:
    """Width of one group's code, ``ceil(log2 C(m, n))``.

    Raises:
        ValueError: unless ``1 <= n < m <= 64`` and ``C(m, n) <= 2**32``.
    """
    _check_nm(n, m)
    return bits_needed(math.comb(m, n) - 1)


def _binomials(n: int, m: int) -> np.ndarray:
    """``table[c, k] = C(c, k)`` for ``c`` in ``0..m-1`` and ``k`` in ``0..n``; (m, n + 1) int64."""
    return np.array([[math.comb(c, k) for k in range(n + 1)] for c in range(m)], dtype=np.int64)


def rank_subsets(cols: np.ndarray, m: int) -> np.ndarray:
    """Combinadic rank of each row's subset: ``sum_i C(c_i, i + 1)``.

    Args:
        cols: ``(groups, n)`` integers, each row strictly increasing in ``0..m-1``.
        m: the size of the set the subsets are drawn from.

    Returns:
        ``(groups,)`` int64 ranks in ``0..C(m, n) - 1``.

    Raises:
        ValueError: if ``(n, m)`` is out of bounds or a row is not increasing in ``0..m-1``.
    """
    cols = np.asarray(cols, dtype=np.int64)
    n = cols.shape[1]
    _check_nm(n, m)
    if cols.size and (cols.min() < 0 or cols.max() >= m or np.any(np.diff(cols, axis=1) <= 0)):
        raise ValueError(f"each row must be strictly increasing in 0..{m - 1}")
    return _binomials(n, m)[cols, np.arange(1, n + 1)].sum(axis=1)  # (groups,)


def unrank_subsets(ranks: np.ndarray, n: int, m: int) -> np.ndarray:
    """Inverse of :func:`rank_subsets`, greedily from the largest element down.

    For ``i = n-1 .. 0``: ``c_i`` is the largest ``c`` with ``C(c, i + 1) <= r``, then
    ``r -= C(c_i, i + 1)``. One vectorised step per element of the subset, over all groups.

    Args:
        ranks: ``(groups,)`` integers in ``0..C(m, n) - 1``.
        n: subset size; m: the size of the set.

    Returns:
        ``(groups, n)`` int64, each row strictly increasing in ``0..m-1``.

    Raises:
        ValueError: if ``(n, m)`` is out of bounds or a rank is outside ``0..C(m, n) - 1``.
    """
    _check_nm(n, m)
    rest = np.asarray(ranks, dtype=np.int64).ravel().copy()
    if rest.size and (rest.min() < 0 or rest.max() >= math.comb(m, n)):
        raise ValueError(f"ranks must be in 0..{math.comb(m, n) - 1} for C({m}, {n})")
    table = _binomials(n, m)
    cols = np.empty((rest.size, n), dtype=np.int64)
    for i in range(n - 1, -1, -1):  # a loop over the n elements of a subset, not over weights
        column = table[:, i + 1]  # C(c, i + 1) for c = 0..m-1, non-decreasing in c
        cols[:, i] = np.searchsorted(column, rest, side="right") - 1
        rest -= column[cols[:, i]]
    return cols


@dataclass(frozen=True)
class NMPattern:
    """A tensor's N:M pattern: at most ``n`` kept in each of ``groups`` groups of ``m``."""

    n: int
    m: int
    groups: int

    @property
    def bits(self) -> int:
        """Code width per group, ``ceil(log2 C(m, n))``."""
        return code_bits(self.n, self.m)

    @property
    def index_nbytes(self) -> int:
        """Bytes of the packed codes, ``ceil(groups * bits / 8)``."""
        return packed_nbytes(self.groups, self.bits)

    def nbytes(self, value_bits: float) -> int:
        """Index plus the ``groups * n`` kept values at ``value_bits`` each, in bytes."""
        return self.index_nbytes + math.ceil(self.groups * self.n * value_bits / 8)


def _to_groups(arr: np.ndarray, m: int) -> np.ndarray:
    """``(out, in, *k)`` -> ``(out * prod(k) * in / m, m)``: groups of ``m`` along ``in``."""
    return np.moveaxis(arr, 1, -1).reshape(-1, m)


def _from_groups(groups: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_to_groups` for a tensor of ``shape``."""
    moved_shape = (shape[0], *shape[2:], shape[1])  # (out, *k, in)
    return np.moveaxis(groups.reshape(moved_shape), -1, 1)


def find_nm_pattern(
    nonzero: np.ndarray, shape: tuple[int, ...], value_bits: float
) -> NMPattern | None:
    """The cheapest N:M pattern the nonzeros follow along dim 1, if any.

    For each ``m`` in :data:`CANDIDATE_GROUP_SIZES` dividing ``shape[1]``, ``n`` is the largest
    nonzero count of a group; the pattern qualifies when ``1 <= n < m`` (and ``C(m, n)`` fits
    32 bits). Among those, the smallest :meth:`NMPattern.nbytes` wins (on a tie, smaller ``m``).

    Args:
        nonzero: boolean mask of the nonzeros, ``shape`` or flattened.
        shape: the tensor's shape; fewer than 2 dims never qualifies.
        value_bits: storage bits per kept value, to weigh index against values.

    Returns:
        The pattern, or None when no candidate qualifies.
    """
    if len(shape) < 2 or not nonzero.size:
        return None
    moved = np.ascontiguousarray(np.moveaxis(nonzero.reshape(shape), 1, -1))  # (out, *k, in)
    best = None
    for m in CANDIDATE_GROUP_SIZES:
        if shape[1] % m:
            continue
        n = int(moved.reshape(-1, m).sum(axis=1).max())
        if not 1 <= n < m or math.comb(m, n) > 1 << MAX_BITS:
            continue
        pattern = NMPattern(n, m, nonzero.size // m)
        if best is None or pattern.nbytes(value_bits) < best.nbytes(value_bits):
            best = pattern
    return best


def _fill_groups(kept: np.ndarray, n: int) -> np.ndarray:
    """Each row of ``kept`` ``(groups, m)`` topped up to ``n`` True with its earliest False."""
    missing = n - kept.sum(axis=1)  # (groups,)
    zero_rank = np.cumsum(~kept, axis=1)  # 1-based rank of each False within its row
    return kept | (~kept & (zero_rank <= missing[:, None]))


def encode_nm(
    nonzero: np.ndarray, shape: tuple[int, ...], pattern: NMPattern
) -> tuple[np.ndarray, np.ndarray]:
    """Combinadic codes of every group's kept set, bit-packed, and the kept flat positions.

    Args:
        nonzero: boolean mask of the nonzeros, ``shape`` or flattened.
        shape: the tensor's shape, at least 2 dims, ``shape[1]`` divisible by ``pattern.m``.
        pattern: from :func:`find_nm_pattern`.

    Returns:
        ``(index, positions)``: ``pattern.index_nbytes`` bytes of codes, and the
        ``groups * n`` kept flat positions, sorted ascending (nonzeros, plus the earliest
        zeros of groups holding fewer than ``n``).

    Raises:
        ValueError: if a group holds more than ``n`` nonzeros or the shape does not fit.
    """
    n, m = pattern.n, pattern.m
    groups = _to_groups(nonzero.reshape(shape), m)  # (groups, m)
    if groups.shape[0] != pattern.groups or groups.sum(axis=1).max(initial=0) > n:
        raise ValueError(f"the nonzeros of a {shape} tensor do not follow {n}:{m} along dim 1")
    kept = _fill_groups(groups, n)
    codes = rank_subsets(np.nonzero(kept)[1].reshape(-1, n), m)  # nonzero() is row-major
    positions = np.flatnonzero(_from_groups(kept, shape))
    return pack_bits(codes, pattern.bits), positions


def _check_record(shape: tuple[int, ...], n: Any, m: Any, bits: Any) -> NMPattern:
    """The pattern an nm layout record describes, or ArtifactError if it cannot be one."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m, bits)):
        raise ArtifactError(f"nm layout needs integer n, m, bits; got {n!r}, {m!r}, {bits!r}")
    try:
        expected = code_bits(n, m)
    except ValueError as exc:
        raise ArtifactError(f"nm layout {n}:{m} is not supported ({exc})") from None
    if bits != expected:
        raise ArtifactError(f"nm layout {n}:{m} has {expected}-bit codes, not {bits}")
    if len(shape) < 2 or shape[1] % m:
        raise ArtifactError(f"nm layout {n}:{m} does not fit shape {list(shape)} along dim 1")
    return NMPattern(n, m, math.prod(shape) // m)


def _as_bytes(buf: np.ndarray | bytes) -> np.ndarray:
    """The payload as a flat uint8 array, or ArtifactError for another dtype."""
    data = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else np.asarray(buf)
    if data.dtype != np.uint8:
        raise ArtifactError(f"nm index payload must be uint8 bytes, got {data.dtype}")
    return data.ravel()


def decode_nm(
    buf: np.ndarray | bytes, shape: tuple[int, ...], n: Any, m: Any, bits: Any
) -> np.ndarray:
    """Kept flat positions of an nm index written by :func:`encode_nm`.

    Args:
        buf: the packed codes, exactly ``ceil(groups * bits / 8)`` bytes.
        shape: the tensor's shape.
        n, m, bits: the layout record's fields (from JSON), checked here.

    Returns:
        The ``groups * n`` kept flat positions, sorted ascending, int64.

    Raises:
        ArtifactError: if the record is invalid for ``shape``, the payload has the wrong
            length, or a code is ``>= C(m, n)``.
    """
    pattern = _check_record(shape, n, m, bits)
    data = _as_bytes(buf)
    if data.size != pattern.index_nbytes:
        raise ArtifactError(
            f"nm index holds {data.size} bytes; {pattern.groups} groups of {pattern.bits}-bit "
            f"codes need {pattern.index_nbytes}"
        )
    codes = unpack_bits(data, pattern.bits, pattern.groups)
    bad = np.flatnonzero(codes >= math.comb(pattern.m, pattern.n))
    if bad.size:
        raise ArtifactError(
            f"nm index code {int(codes[bad[0]])} of group {int(bad[0])} is out of range: "
            f"{pattern.n}:{pattern.m} has C({pattern.m}, {pattern.n}) = "
            f"{math.comb(pattern.m, pattern.n)} codes"
        )
    cols = unrank_subsets(codes, pattern.n, pattern.m)  # (groups, n)
    kept = np.zeros((pattern.groups, pattern.m), dtype=bool)
    np.put_along_axis(kept, cols, True, axis=1)
    return np.flatnonzero(_from_groups(kept, shape)).astype(np.int64)
