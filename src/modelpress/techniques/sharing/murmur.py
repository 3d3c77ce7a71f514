"""MurmurHash3 (x86, 32-bit) over 32-bit words, vectorised in exact int64 torch arithmetic.

``share.hash`` needs a hash of ``(seed, layer, row, column)`` that gives the same bucket on
every run, machine and torch version, so it cannot use Python's ``hash`` or a torch RNG.
This is Austin Appleby's MurmurHash3_x86_32 (public domain, SMHasher) of the little-endian
bytes of the given 32-bit words, written from its published description:

    for each word k:  k *= c1; k = rotl(k, 15); k *= c2; h ^= k; h = rotl(h, 13); h = 5 h + n
    h ^= length in bytes; then fmix32: h ^= h >> 16; h *= m1; h ^= h >> 13; h *= m2; h ^= h >> 16

with every operation modulo 2^32. Torch has no unsigned 32-bit multiply, so values are held
in int64 in ``[0, 2^32)`` and each product is formed from 16-bit halves (every partial
product stays below 2^50): no step overflows int64, so the result is exact and identical on
every platform. Tests check the published SMHasher test vectors.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
_N = 0xE6546B64


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in ``[0, 2^32)`` and a constant ``c`` in the same range.

    ``x c = (x_hi c_lo + x_lo c_hi) 2^16 + x_lo c_lo (mod 2^32)`` with 16-bit halves, so no
    intermediate exceeds 2^50.
    """
    x_lo, x_hi = x & 0xFFFF, x >> 16
    c_lo, c_hi = c & 0xFFFF, c >> 16
    cross = ((x_hi * c_lo + x_lo * c_hi) & 0xFFFF) << 16
    return (cross + x_lo * c_lo) & MASK32


def rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    """Rotate the 32-bit values ``x`` left by ``r`` bits (``0 < r < 32``)."""
    return ((x << r) & MASK32) | (x >> (32 - r))


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: ``h ^= h>>16; h *= m1; h ^= h>>13; h *= m2; h ^= h>>16``."""
    h = h ^ (h >> 16)
    h = mul32(h, _M1)
    h = h ^ (h >> 13)
    h = mul32(h, _M2)
    return h ^ (h >> 16)


def murmur3_32(words: torch.Tensor, seed: int) -> torch.Tensor:
    """MurmurHash3_x86_32 of the little-endian bytes of each row of 32-bit ``words``.

    Args:
        words: int64 ``(..., n)`` with values in ``[0, 2^32)``; each row is one key of
            ``4 n`` bytes (``n`` may be 0: the empty key).
        seed: the hash seed, in ``[0, 2^32)``.

    Returns:
        int64 ``(...)`` hashes in ``[0, 2^32)``, equal to the reference C implementation's.

    Raises:
        ValueError: ``seed`` or a word is outside ``[0, 2^32)`` (a programming error; callers
            check user input first).
    """
    if not 0 <= seed <= MASK32:
        raise ValueError(f"murmur3_32: seed {seed} is not a 32-bit unsigned value")
    words = words.to(torch.int64)
    if words.numel() and (int(words.min()) < 0 or int(words.max()) > MASK32):
        raise ValueError("murmur3_32: words must lie in [0, 2^32)")
    h = torch.full(words.shape[:-1], seed, dtype=torch.int64)
    for i in range(words.shape[-1]):  # a loop over the few words of a key, not over keys
        k = mul32(words[..., i], _C1)
        k = mul32(rotl32(k, 15), _C2)
        h = rotl32(h ^ k, 13)
        h = (h * 5 + _N) & MASK32
    return fmix32(h ^ (4 * words.shape[-1]))
