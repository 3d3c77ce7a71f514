"""Entropy coding of one stream of integer symbols: statistics, the table, Huffman and ANS.

A stream holds ``n`` non-negative integers below ``2^bits`` (quantized codes, codebook
indices, sparse-index gaps, bitmask bits, N:M group codes). Its *alphabet* is the ``K``
distinct symbols present, ascending; the coders see each symbol's rank in it. The payload is
the table followed by the coded ranks, and the record holds what decoding needs::

    {"kind": "ans", "bits": 5, "count": 23520, "alphabet": 29,
     "table": {"bytes": 37}, "crc32": 1234567890}

* **table** — the alphabet as gaps ``s_i - s_{i-1} - 1`` (``s_{-1} = -1``), then one integer
  per symbol: its count minus one (ANS) or its code length minus one (Huffman); both arrays
  Elias-gamma coded (:mod:`~modelpress.artifact.gamma`), so a dense alphabet costs about a bit
  per symbol and rare symbols' small counts a few bits, and the bits packed least significant
  first and zero-padded to a byte. Integers only, so every platform rebuilds exactly the same
  coder.
* **huffman** — canonical Huffman codes (:mod:`~modelpress.artifact.huffman`), ``H + 1`` bits
  per symbol at most; the record adds ``stream_bits``.
* **ans** — ``constriction``'s stack ANS coder (Duda 2013, "Asymmetric numeral systems";
  32-bit words, 24-bit probabilities) with a categorical model built from the counts;
  within a few hundredths of a bit of the empirical entropy on long streams. The stream is its
  32-bit words, little-endian.
* ``K <= 1`` needs no stream at all (zero entropy: every symbol is the table's one symbol).

``crc32`` (zlib) of the symbols as little-endian uint32 lets decoding prove it rebuilt the
exact stream, beyond the count, alphabet, table-size and end-of-stream checks.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import constriction
import numpy as np

from modelpress.artifact import huffman
from modelpress.artifact.bitpack import packed_nbytes
from modelpress.artifact.gamma import gamma_decode, gamma_encode
from modelpress.errors import ArtifactError

__all__ = [
    "CODERS", "Uncodable", "decode_symbols", "empirical_entropy", "encode_symbols",
    "stream_stats", "symbol_table",
]  # fmt: skip

Coder = Literal["huffman", "ans"]
CODERS: tuple[Coder, ...] = ("huffman", "ans")
MAX_ANS_ALPHABET = 1 << 20  # each symbol needs >= 1/2^24 of the probability mass
_BINCOUNT_LIMIT = 1 << 22  # symbols below this are counted with bincount, others sorted
Record = dict[str, Any]


class Uncodable(Exception):
    """This stream cannot be entropy-coded by this coder (the reason is the message)."""


def symbol_table(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The alphabet of a stream, each symbol's count, and each stream element's rank.

    Args:
        symbols: ``(n,)`` non-negative integers.

    Returns:
        ``(alphabet, counts, ranks)``: the ``K`` distinct symbols ascending (int64), their
        counts (int64), and ``(n,)`` ranks with ``alphabet[ranks] == symbols``.
    """
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size and int(symbols.max()) < _BINCOUNT_LIMIT:
        full = np.bincount(symbols)  # (max + 1,)
        alphabet = np.flatnonzero(full)
        lookup = np.cumsum(full > 0) - 1  # rank of each present symbol
        return alphabet, full[alphabet], lookup[symbols]
    alphabet, ranks, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    return alphabet.astype(np.int64), counts.astype(np.int64), ranks.astype(np.int64)


def empirical_entropy(counts: np.ndarray) -> float:
    """Shannon entropy of the empirical law, ``H = -sum_s p_s log2 p_s`` with ``p_s = c_s / n``.

    Args:
        counts: symbol counts (zeros are ignored).

    Returns:
        Bits per symbol; 0.0 for an empty or single-symbol stream.
    """
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    n = c.sum()
    return float(np.log2(n) - np.sum(c * np.log2(c)) / n) if c.size > 1 else 0.0


def _crc(symbols: np.ndarray) -> int:
    return zlib.crc32(np.asarray(symbols).astype("<u4").tobytes())


def _pack_table(alphabet: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, Record]:
    """Alphabet gaps then per-symbol weights, Elias-gamma coded into bytes."""
    gaps = np.diff(alphabet, prepend=-1) - 1
    bits = np.concatenate([gamma_encode(gaps), gamma_encode(weights)])
    table = np.packbits(bits, bitorder="little")
    return table, {"bytes": int(table.size)}


def _unpack_table(table: np.ndarray, size: int, meta: Record, bits: int) -> tuple[Any, Any]:
    """Inverse of :func:`_pack_table`, checking its size, padding and that symbols fit."""
    nbytes = _field(meta, "bytes")
    if table.size != nbytes:
        raise ArtifactError(f"coding table holds {table.size} bytes, not {nbytes}")
    stream = np.unpackbits(table, bitorder="little")
    gaps, middle = gamma_decode(stream, 0, size)
    weights, end = gamma_decode(stream, middle, size)
    if packed_nbytes(end, 1) != nbytes or stream[end:].any():
        raise ArtifactError(f"coding table of {nbytes} bytes does not end where its "
                            f"{size} symbols do (corrupt)")  # fmt: skip
    alphabet = np.cumsum(gaps + 1) - 1
    if alphabet.size and alphabet[-1] >= 1 << bits:
        raise ArtifactError(f"coding table names symbol {int(alphabet[-1])}, outside {bits} bits")
    return alphabet, weights + 1


def _field(record: Record, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArtifactError(f"entropy record field {key!r} must be an integer >= 0, got {value!r}")
    return value


def _ans_model(counts: np.ndarray) -> Any:
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _ans_encode(ranks: np.ndarray, counts: np.ndarray) -> np.ndarray:
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(ranks.astype(np.int32), _ans_model(counts))
    return coder.get_compressed().astype("<u4").view(np.uint8)


def _ans_decode(stream: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    if stream.size % 4:
        raise ArtifactError(f"ANS stream of {stream.size} bytes is not whole 32-bit words")
    try:
        coder = constriction.stream.stack.AnsCoder(stream.view("<u4").astype(np.uint32))
        ranks = coder.decode(_ans_model(counts), count)
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(f"ANS stream is corrupt ({exc})") from None
    if not coder.is_empty():
        raise ArtifactError(f"ANS stream does not end after its {count} symbols (corrupt)")
    return ranks.astype(np.int64)


def encode_symbols(symbols: np.ndarray, coder: Coder, bits: int) -> tuple[Record, np.ndarray]:
    """Entropy-code a stream of integers below ``2^bits`` with ``coder``.

    Args:
        symbols: ``(n,)`` non-negative integers, each below ``2^bits``.
        coder: ``"huffman"`` (Huffman 1952, canonical codes) or ``"ans"`` (Duda 2013).
        bits: the symbol width the stream's symbols fit in, 1..32 (checked on decode).

    Returns:
        ``(record, payload)``: the JSON-ready record (see the module docstring) and the uint8
        payload, table then stream.

    Raises:
        Uncodable: the coder cannot take this stream (a Huffman code longer than 32 bits,
            an ANS alphabet over 2^20 symbols, or symbols wider than 32 bits).
    """
    if not 1 <= bits <= 32:
        raise Uncodable(f"symbols of {bits} bits are wider than 32")
    alphabet, counts, ranks = symbol_table(symbols)
    record: Record = {"kind": coder, "bits": bits, "count": int(ranks.size),
                      "alphabet": int(alphabet.size)}  # fmt: skip
    extra: Record = {}
    stream = np.zeros(0, dtype=np.uint8)
    if coder == "huffman":
        weights = huffman.code_lengths(counts) if alphabet.size > 1 else np.ones_like(counts)
        if int(weights.max(initial=1)) > huffman.MAX_CODE_BITS:
            raise Uncodable(f"a Huffman code would be {int(weights.max())} bits long (max 32)")
        if alphabet.size > 1:
            stream, nbits = huffman.encode(ranks, weights)
            extra["stream_bits"] = nbits
    else:
        if alphabet.size > MAX_ANS_ALPHABET:
            raise Uncodable(f"{alphabet.size} distinct symbols exceed ANS's {MAX_ANS_ALPHABET}")
        weights = counts
        if alphabet.size > 1:
            stream = _ans_encode(ranks, counts)
    table, record["table"] = _pack_table(alphabet, weights - 1)
    record |= extra
    record["crc32"] = _crc(symbols)
    return record, np.concatenate([table, stream])


def decode_symbols(payload: np.ndarray, record: Record) -> np.ndarray:
    """Decode a stream written by :func:`encode_symbols` and check it is exactly the one coded.

    Args:
        payload: the uint8 payload (table then stream).
        record: its record.

    Returns:
        ``(count,)`` int64 symbols.

    Raises:
        ArtifactError: an unknown coder, a malformed record, a table or stream that is
            corrupt, truncated or too long, or decoded symbols that fail the count, alphabet
            or crc32 checks.
    """
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind not in CODERS:
        raise ArtifactError(f"unknown entropy coder {kind!r}; this modelpress reads {CODERS}")
    count, size, bits = (_field(record, k) for k in ("count", "alphabet", "bits"))
    if not 1 <= bits <= 32:
        raise ArtifactError(f"entropy record symbol width {bits} is outside 1..32")
    table_meta = record.get("table")
    if not isinstance(table_meta, dict) or size > count or (count and not size):
        raise ArtifactError(f"entropy record has a bad table for {count} symbols: {table_meta!r}")
    tbytes = _field(table_meta, "bytes")
    alphabet, weights = _unpack_table(payload[:tbytes], size, table_meta, bits)
    ranks = _decode_ranks(kind, payload[tbytes:], record, weights, count)
    symbols = alphabet[ranks] if size else np.zeros(0, dtype=np.int64)
    if _crc(symbols) != record.get("crc32"):
        raise ArtifactError(f"decoded {kind} stream fails its crc32 check (corrupt)")
    return symbols


def _decode_ranks(
    kind: str, stream: np.ndarray, record: Record, weights: np.ndarray, count: int
) -> np.ndarray:
    """The ranks of a stream of ``count`` symbols over ``weights.size`` symbols."""
    if weights.size <= 1:
        if stream.size or (kind == "ans" and weights.size and int(weights[0]) != count):
            raise ArtifactError(f"a one-symbol stream of {count} does not match its table")
        return np.zeros(count, dtype=np.int64)
    if kind == "ans":
        if int(weights.sum()) != count:
            raise ArtifactError(f"ANS table counts sum to {int(weights.sum())}, not {count}")
        return _ans_decode(stream, weights, count)
    nbits = _field(record, "stream_bits")
    if int(weights.max()) > huffman.MAX_CODE_BITS or not huffman.kraft_sum_is_one(weights):
        raise ArtifactError("Huffman code lengths do not form a complete prefix code")
    if stream.size != packed_nbytes(nbits, 1):
        raise ArtifactError(f"Huffman stream holds {stream.size} bytes, not {nbits} bits")
    if nbits % 8 and int(stream[-1]) & ((1 << (8 - nbits % 8)) - 1):
        raise ArtifactError("Huffman stream has padding bits set (corrupt)")
    return huffman.decode(stream, nbits, weights, count)


def stream_stats(symbols: np.ndarray, table_nbytes: int, stream_nbytes: int, coder: str) -> Record:
    """What a stored stream costs against its information content.

    Args:
        symbols: the stream's symbols.
        table_nbytes: bytes of its coding table (0 when bit-packed).
        stream_nbytes: bytes of the coded (or bit-packed) stream itself.
        coder: ``"huffman"``, ``"ans"`` or ``"bitpack"``.

    Returns:
        ``symbols`` (count), ``alphabet`` (distinct symbols), ``entropy_bits`` (empirical
        entropy ``H``, bits/symbol), ``stream_bits_per_symbol`` (the stream alone),
        ``bits_per_symbol`` (stream + table) and ``coder``.
    """
    alphabet, counts, _ = symbol_table(symbols)
    n = int(np.asarray(symbols).size)
    per = 8 / n if n else 0.0
    return {"symbols": n, "alphabet": int(alphabet.size),
            "entropy_bits": empirical_entropy(counts),
            "stream_bits_per_symbol": stream_nbytes * per,
            "bits_per_symbol": (table_nbytes + stream_nbytes) * per, "coder": coder}  # fmt: skip
