"""Canonical Huffman coding of a symbol stream, vectorised (Huffman 1952; DEFLATE's codes).

Code lengths come from ``constriction``'s Huffman tree (optimal for the symbol counts, so the
stream takes at most ``H + 1`` bits per symbol, H the empirical entropy). Only the lengths are
stored: the code words are the *canonical* ones of RFC 1951 §3.2.2. With symbols sorted by
``(length, symbol)`` and ``L`` the longest length, the left-aligned code word of the i-th is

    v_i = sum_{j < i} 2^(L - l_j),          code_i = v_i >> (L - l_i),

so ``v`` is an exclusive prefix sum (Kraft's inequality makes every ``v_i < 2^L``). Code words
are written most significant bit first, one after another, into a big-endian bit stream.

Decoding needs no loop over symbols. For every bit position ``p`` the ``L``-bit window starting
there names the code that would start at ``p`` (``searchsorted`` over ``v``), hence the next
code's start ``J[p] = p + l``. The code starts are the orbit ``0, J[0], J[J[0]], ...``, found by
pointer doubling: with ``A_k`` the first ``2^k`` starts and ``J_k = J`` applied ``2^k`` times,
``A_{k+1} = A_k ++ J_k[A_k]`` and ``J_{k+1} = J_k[J_k]`` — ``log2(n)`` vectorised gathers.
"""

from __future__ import annotations

import constriction
import numpy as np

from modelpress.errors import ArtifactError

__all__ = ["MAX_CODE_BITS", "canonical_codes", "code_lengths", "decode", "encode"]

MAX_CODE_BITS = 32  # longer codes (only for ~5.7M+ symbols of a Fibonacci-like law) are refused
_CHUNK = 1 << 18  # symbols (encode) or bit positions (decode) handled at once
_LOOKUP_BITS = 16  # codes up to this long are decoded through a 2^L-entry table


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of each symbol, from ``constriction``'s Huffman tree.

    Huffman (1952), "A method for the construction of minimum-redundancy codes": the lengths
    minimise ``sum_s counts_s * l_s`` over prefix codes. The tree is built once; each length
    is read by encoding that one symbol (a loop over the alphabet, not the stream).

    Args:
        counts: ``(K,)`` positive integer counts, ``K >= 2``.

    Returns:
        ``(K,)`` int64 lengths, each ``>= 1``, with ``sum 2^-l == 1``.
    """
    tree = constriction.symbol.huffman.EncoderHuffmanTree(counts.astype(np.float64))
    lengths = np.empty(counts.size, dtype=np.int64)
    for rank in range(counts.size):  # over the alphabet
        coder = constriction.symbol.QueueEncoder()
        coder.encode_symbol(rank, tree)
        lengths[rank] = coder.get_compressed_and_bitrate()[1]
    return lengths


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical code words (RFC 1951 §3.2.2) for code ``lengths``, in three views.

    Args:
        lengths: ``(K,)`` code lengths in ``1..MAX_CODE_BITS``.

    Returns:
        ``(codes, order, starts)``: ``codes[s]`` the code word of symbol ``s`` (uint64);
        ``order`` the symbols sorted by ``(length, symbol)``; ``starts`` the left-aligned
        words ``v_i`` of ``order`` (uint64, ascending), ``v_i = sum_{j<i} 2^(L - l_j)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    top = int(lengths.max())
    spans = np.left_shift(np.uint64(1), (top - lengths[order]).astype(np.uint64))
    starts = np.concatenate([[np.uint64(0)], np.cumsum(spans, dtype=np.uint64)[:-1]])
    codes = np.empty(lengths.size, dtype=np.uint64)
    codes[order] = starts >> (top - lengths[order]).astype(np.uint64)
    return codes, order, starts


def kraft_sum_is_one(lengths: np.ndarray) -> bool:
    """Whether ``sum 2^-l_s == 1`` exactly (a complete prefix code), in integer arithmetic."""
    lengths = np.asarray(lengths, dtype=np.int64)
    top = int(lengths.max())
    return int(np.sum(np.left_shift(np.int64(1), top - lengths))) == 1 << top


def encode(ranks: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Concatenate the canonical code words of ``ranks`` into a big-endian bit stream.

    Args:
        ranks: ``(n,)`` symbols in ``0..K-1``.
        lengths: ``(K,)`` code lengths (from :func:`code_lengths`).

    Returns:
        ``(stream, nbits)``: ``ceil(nbits / 8)`` uint8 bytes (zero padding bits), and the
        number of information bits ``sum l[ranks]``.
    """
    codes, _, _ = canonical_codes(lengths)
    width = 8 * _word_bytes(int(lengths.max()))  # bits of the word each code is left-aligned in
    parts = []
    for lo in range(0, ranks.size, _CHUNK):  # over chunks of 2^18 symbols
        r = ranks[lo : lo + _CHUNK]
        ln = lengths[r]  # (m,)
        aligned = codes[r] << (width - ln).astype(np.uint64)  # code in the word's top bits
        rows = np.unpackbits(
            aligned.astype(f">u{width // 8}").view(np.uint8).reshape(r.size, -1), axis=1
        )  # (m, width) bits, most significant first
        parts.append(rows[np.arange(width) < ln[:, None]])  # row-major: codes back to back
    bits = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return np.packbits(bits), int(bits.size)


def _word_bytes(top: int) -> int:
    """Bytes of the smallest unsigned word holding ``top`` bits (1, 2, 4 or 8)."""
    return 1 if top <= 8 else 2 if top <= 16 else 4 if top <= 32 else 8


def _big_endian_words(stream: np.ndarray) -> np.ndarray:
    """``w[b]`` = the 8 bytes from byte ``b`` on as a big-endian uint64 (zeros past the end)."""
    padded = np.concatenate([stream, np.zeros(8, dtype=np.uint8)]).astype(np.uint64)
    words = np.zeros(stream.size + 1, dtype=np.uint64)
    for k in range(8):  # over the 8 bytes of a word
        words |= padded[k : k + words.size] << np.uint64(56 - 8 * k)
    return words


def _windows(words: np.ndarray, pos: np.ndarray, top: int) -> np.ndarray:
    """The ``top`` stream bits starting at each bit position ``pos``, as integers."""
    shifted = words[pos >> 3] << (pos & 7).astype(np.uint64)
    return shifted >> np.uint64(64 - top)


def _next_starts(words: np.ndarray, nbits: int, lengths_sorted, starts, top: int) -> np.ndarray:
    """``J[p]``: where the next code starts if one starts at ``p``; ``J[nbits]`` (the end) and
    every overrun lead to ``nbits + 1``, which leads to itself."""
    # lengths are non-decreasing along ``starts``: a window's length is that of its band
    first = np.flatnonzero(np.diff(lengths_sorted, prepend=-1))  # first code of each length
    bounds, band_lengths = starts[first], lengths_sorted[first]  # (distinct lengths,)
    lookup = None
    if top <= _LOOKUP_BITS:  # code length of every possible window, in one table
        every = np.arange(1 << top, dtype=np.uint64)
        lookup = band_lengths[np.searchsorted(bounds, every, side="right") - 1]
    lengths = np.empty(words.size * 8, dtype=np.int64)
    step = _CHUNK // 8
    for lo in range(0, words.size, step):  # over chunks of 2^15 bytes
        block = words[lo : lo + step]
        windows = np.empty((block.size, 8), dtype=np.uint64)  # (bytes, bit within byte)
        for k in range(8):  # the window at bit k of each byte
            windows[:, k] = (block << np.uint64(k)) >> np.uint64(64 - top)
        flat = windows.reshape(-1)
        if lookup is not None:
            lengths[8 * lo : 8 * lo + flat.size] = lookup[flat]
        else:
            band = np.searchsorted(bounds, flat, side="right") - 1
            lengths[8 * lo : 8 * lo + flat.size] = band_lengths[band]
    jump = np.arange(nbits + 2, dtype=np.int64)
    jump[:nbits] += lengths[:nbits]
    jump[nbits:] = nbits + 1
    jump[jump > nbits] = nbits + 1
    return jump


def decode(stream: np.ndarray, nbits: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """Read ``count`` symbols back from a stream written by :func:`encode`.

    Args:
        stream: the uint8 bytes, exactly ``ceil(nbits / 8)`` of them.
        nbits: the information bits in the stream.
        lengths: ``(K,)`` code lengths of a complete prefix code (``sum 2^-l == 1``).
        count: how many symbols the stream holds.

    Returns:
        ``(count,)`` int64 symbols in ``0..K-1``.

    Raises:
        ArtifactError: the stream is not exactly ``count`` code words long.
    """
    _, order, starts = canonical_codes(lengths)
    top = int(lengths.max())
    lengths_sorted = lengths[order]
    words = _big_endian_words(stream)
    jump = _next_starts(words, nbits, lengths_sorted, starts, top)
    path = np.zeros(1, dtype=np.int64)  # the first 2^k code starts
    while path.size < count + 1:  # log2(count) doublings
        path = np.concatenate([path, np.take(jump, path)])
        jump = np.take(jump, jump)
    path = path[: count + 1]
    ended = np.flatnonzero(path[:count] >= nbits)
    if ended.size or path[count] != nbits:
        held = int(ended[0]) if ended.size else f"more than {count}"
        raise ArtifactError(f"Huffman stream of {nbits} bits holds {held} symbols, not {count}")
    which = np.searchsorted(starts, _windows(words, path[:count], top), side="right") - 1
    return order[which].astype(np.int64)
