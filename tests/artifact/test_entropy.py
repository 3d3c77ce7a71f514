"""Entropy coding of symbol streams: exact round trips, the H + 1 and 2 % bounds, corruption."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.artifact import huffman
from modelpress.artifact.entropy import (
    CODERS,
    Uncodable,
    decode_symbols,
    empirical_entropy,
    encode_symbols,
    stream_stats,
    symbol_table,
)
from modelpress.artifact.gamma import gamma_encode
from modelpress.errors import ArtifactError

RNG = np.random.default_rng(0)
FIB = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181]
STREAMS = {
    "uniform": (RNG.integers(0, 32, 20_000), 5),
    "single": (np.full(5_000, 17), 5),
    "one": (np.array([3]), 2),
    "empty": (np.zeros(0, dtype=np.int64), 4),
    "huge_alphabet": (RNG.integers(0, 1 << 16, 3_000), 16),
    "skewed": ((RNG.random(50_000) < 0.002) * 9, 4),
    "geometric": (RNG.geometric(0.1, 20_000) - 1, 16),
    "fibonacci": (np.repeat(np.arange(len(FIB)), FIB), 5),  # deepest possible Huffman tree
    "wide": (RNG.integers(0, 1 << 32, 500, dtype=np.int64), 32),
}


def bits_of(payload: np.ndarray, record: dict) -> tuple[int, int]:
    """(stream bits, table bits) of a coded payload."""
    table = record["table"]["bytes"]
    return 8 * (payload.size - table), 8 * table


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("case", sorted(STREAMS))
def test_round_trip_is_bit_exact(case: str, coder: str) -> None:
    symbols, bits = STREAMS[case]
    record, payload = encode_symbols(symbols, coder, bits)
    assert payload.dtype == np.uint8
    decoded = decode_symbols(payload, record)
    assert decoded.dtype == np.int64 and np.array_equal(decoded, symbols)
    assert record["count"] == symbols.size and record["alphabet"] == np.unique(symbols).size


@pytest.mark.parametrize("coder", CODERS)
def test_zero_entropy_streams_need_no_stream_at_all(coder: str) -> None:
    record, payload = encode_symbols(np.full(10_000, 6), coder, 3)
    assert bits_of(payload, record)[0] == 0 and payload.size <= 4  # the table alone


@pytest.mark.parametrize(
    "case", ["uniform", "huge_alphabet", "skewed", "geometric", "fibonacci", "wide"]
)
def test_huffman_costs_at_most_entropy_plus_one_bit(case: str) -> None:
    symbols, bits = STREAMS[case]
    record, payload = encode_symbols(symbols, "huffman", bits)
    h = empirical_entropy(symbol_table(symbols)[1])
    stream_bits = record["stream_bits"]
    assert stream_bits <= symbols.size * (h + 1)
    assert stream_bits >= symbols.size * h - 1e-6  # no code beats the entropy
    assert bits_of(payload, record)[0] == 8 * -(-stream_bits // 8)  # whole bytes, no slack


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.integers(0, 32, 100_000),  # uniform, H = 5
        lambda r: r.geometric(0.3, 100_000) - 1,  # H ~ 2.9
        lambda r: (r.random(100_000) < 0.01).astype(int),  # H ~ 0.08: Huffman needs 1 bit
        lambda r: np.minimum(r.zipf(1.5, 100_000), 4_000),  # heavy tail, big alphabet
    ],
)
def test_ans_is_within_two_percent_of_the_entropy_on_long_streams(make) -> None:
    symbols = make(np.random.default_rng(1))
    record, payload = encode_symbols(symbols, "ans", 16)
    h_bits = symbols.size * empirical_entropy(symbol_table(symbols)[1])
    assert bits_of(payload, record)[0] <= 1.02 * h_bits + 64  # + the final 64-bit state


def test_the_table_is_integers_only_and_rebuilds_the_same_coder() -> None:
    symbols = np.array([0, 0, 0, 1, 5, 5, 9])
    record, payload = encode_symbols(symbols, "ans", 4)
    assert record["table"] == {"bytes": 3}
    # alphabet 0,1,5,9 as gaps 0,0,3,3: gamma prefixes 1 1 001 001, mantissas 00 00; then
    # counts-1 = 2,0,1,0: prefixes 01 1 01 1, mantissas 1 0 -- 20 bits, LSB first
    assert payload[:3].tolist() == [0b10010011, 0b01100000, 0b0111]
    json_types = {type(v) for v in (*record.values(), *record["table"].values())}
    assert json_types <= {int, str, dict}


def test_canonical_codes_are_prefix_free_and_ordered() -> None:
    lengths = np.array([3, 1, 3, 2])
    codes, order, _ = huffman.canonical_codes(lengths)
    assert codes.tolist() == [0b110, 0b0, 0b111, 0b10]  # RFC 1951 order: (length, symbol)
    assert order.tolist() == [1, 3, 0, 2]
    assert huffman.kraft_sum_is_one(lengths) and not huffman.kraft_sum_is_one(np.array([2, 2]))


def test_coding_is_deterministic() -> None:
    symbols, bits = STREAMS["geometric"]
    for coder in CODERS:
        (r1, p1), (r2, p2) = (
            encode_symbols(symbols, coder, bits),
            encode_symbols(symbols, coder, bits),
        )
        assert r1 == r2 and p1.tobytes() == p2.tobytes()


def test_uncodable_streams_say_why() -> None:
    with pytest.raises(Uncodable, match="wider than 32"):
        encode_symbols(np.array([1]), "ans", 33)
    many = np.arange((1 << 20) + 1)
    with pytest.raises(Uncodable, match="exceed ANS's"):
        encode_symbols(many, "ans", 21)


def test_stream_stats() -> None:
    stats = stream_stats(np.array([0, 0, 1, 1]), 1, 1, "ans")
    assert stats == {"symbols": 4, "alphabet": 2, "entropy_bits": 1.0,
                     "stream_bits_per_symbol": 2.0, "bits_per_symbol": 4.0,
                     "coder": "ans"}  # fmt: skip
    assert empirical_entropy(np.array([5])) == 0.0 and empirical_entropy(np.array([])) == 0.0


# --- corruption: the decoder's own checks (no sha256 at this level) ---------------------


@pytest.fixture(params=CODERS)
def coded(request) -> tuple[dict, np.ndarray]:
    return encode_symbols(np.random.default_rng(2).geometric(0.2, 5_000) - 1, request.param, 8)


def test_byte_flips_anywhere_are_caught(coded) -> None:
    record, payload = coded
    table = record["table"]["bytes"]
    for where in [*range(table + 2), *range(table + 2, payload.size, 97), payload.size - 1]:
        bad = payload.copy()
        bad[where] ^= 0x5A
        with pytest.raises(ArtifactError):
            decode_symbols(bad, record)


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_truncated_or_padded_streams_are_caught(coded, cut: int) -> None:
    record, payload = coded
    with pytest.raises(ArtifactError):
        decode_symbols(payload[:-cut], record)
    with pytest.raises(ArtifactError):
        decode_symbols(np.concatenate([payload, np.ones(cut, np.uint8)]), record)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "lzma"}, "unknown entropy coder 'lzma'"),
        ({"count": -1}, "'count' must be an integer >= 0"),
        ({"bits": 40}, "symbol width 40 is outside 1..32"),
        ({"bits": 2}, "outside 2 bits"),
        ({"alphabet": 10**9}, "bad table"),
        ({"table": {"bytes": 1}}, "table ends after"),
        ({"crc32": 1}, "crc32"),
    ],
)
def test_bad_records_are_artifact_errors(coded, change: dict, match: str) -> None:
    record, payload = coded
    with pytest.raises(ArtifactError, match=match):
        decode_symbols(payload, {**record, **change})


def test_a_stream_with_more_or_fewer_symbols_is_caught(coded) -> None:
    record, payload = coded
    for count in (record["count"] - 1, record["count"] + 1):
        with pytest.raises(ArtifactError, match="symbols, not|sum to|does not end"):
            decode_symbols(payload, {**record, "count": count})


def test_huffman_lengths_that_are_no_complete_code_are_caught() -> None:
    record, payload = encode_symbols(np.array([0, 1, 2, 2]), "huffman", 2)  # lengths 2, 2, 1
    same_alphabet = gamma_encode(np.zeros(3, dtype=np.int64))  # gaps 0, 0, 0
    every_length_1 = gamma_encode(np.zeros(3, dtype=np.int64))  # 2^-1 * 3 > 1
    table = np.packbits(np.concatenate([same_alphabet, every_length_1]), bitorder="little")
    bad = np.concatenate([table, payload[record["table"]["bytes"] :]])
    with pytest.raises(ArtifactError, match="complete prefix code"):
        decode_symbols(bad, {**record, "table": {"bytes": int(table.size)}})
