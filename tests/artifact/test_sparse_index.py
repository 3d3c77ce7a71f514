"""Tests for modelpress.artifact.sparse_index: bitmask and escape-coded delta indices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact.bitpack import pack_bits, packed_nbytes
from modelpress.artifact.sparse_index import (
    IndexChoice,
    best_delta_bits,
    choose_index_format,
    decode_bitmask,
    decode_delta,
    decode_index,
    delta_code_count,
    encode_bitmask,
    encode_delta,
    encode_index,
)
from modelpress.errors import ArtifactError


@st.composite
def kept_positions(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """A tensor size and a sorted set of kept positions, from empty to all kept."""
    numel = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["random", "empty", "all", "last", "first"]))
    if kind == "empty":
        return np.array([], dtype=np.int64), numel
    if kind == "all":
        return np.arange(numel), numel
    if kind in ("last", "first"):
        return np.array([numel - 1 if kind == "last" else 0]), numel
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random(numel) < density
    return np.flatnonzero(mask), numel


# --- bitmask ---------------------------------------------------------------------------------


def test_bitmask_exact_layout() -> None:
    buf = encode_bitmask(np.array([0, 2, 3, 9]), numel=10)
    assert buf.tolist() == [0b00001101, 0b00000010]
    assert decode_bitmask(buf, 10).tolist() == [0, 2, 3, 9]
    assert decode_bitmask(buf.tobytes(), 10).dtype == np.int64


def test_bitmask_wrong_length_raises() -> None:
    with pytest.raises(ArtifactError, match="bitmask index holds 1 bytes; 10 elements need 2"):
        decode_bitmask(np.zeros(1, dtype=np.uint8), 10)


def test_bitmask_padding_bit_set_raises() -> None:
    with pytest.raises(ArtifactError, match="marks position 11 >= numel 10"):
        decode_bitmask(np.array([0, 0b00001000], dtype=np.uint8), 10)


# --- delta codes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positions", "bits", "codes"),
    [
        ([0, 1, 2], 2, [1, 1, 1]),
        ([2, 3], 2, [3, 1]),  # gaps 3, 1
        ([3], 2, [0, 1]),  # gap 4 = one escape (3) + 1
        ([6], 2, [0, 0, 1]),  # gap 7 = two escapes + 1
        ([5], 2, [0, 3]),  # gap 6 = one escape + 3 (not two escapes)
        ([0, 20], 4, [1, 0, 5]),  # gaps 1, 20 = 15 + 5
        ([], 3, []),
        ([0], 1, [1]),
        ([2, 3], 1, [0, 0, 1, 1]),  # bits=1 is a plain bitmask of the prefix
    ],
)
def test_encode_delta_escapes(positions: list[int], bits: int, codes: list[int]) -> None:
    got = encode_delta(np.array(positions, dtype=np.int64), bits)
    assert got.tolist() == codes
    assert delta_code_count(np.array(positions, dtype=np.int64), bits) == len(codes)
    assert decode_delta(got, bits).tolist() == positions


def test_decode_delta_ignores_trailing_escapes() -> None:
    assert decode_delta(np.array([2, 0, 1, 0, 0]), 2).tolist() == [1, 5]


def test_decode_delta_rejects_wide_code() -> None:
    with pytest.raises(ArtifactError, match="delta code 4 does not fit in 2 bits"):
        decode_delta(np.array([1, 4]), 2)


@pytest.mark.parametrize("positions", [[3, 3], [5, 2], [-1, 4]])
def test_encode_rejects_bad_positions(positions: list[int]) -> None:
    with pytest.raises(ValueError, match="positions must be"):
        encode_delta(np.array(positions), 4)


def test_encode_index_rejects_position_past_numel() -> None:
    with pytest.raises(ValueError, match="position 10 is out of range for 10 elements"):
        encode_index(np.array([1, 10]), 10, IndexChoice("delta", 4, 0))


def test_best_delta_bits_matches_brute_force() -> None:
    positions = np.array([0, 1, 2, 40, 41, 300, 301, 302, 5000])
    sizes = {b: packed_nbytes(delta_code_count(positions, b), b) for b in range(1, 17)}
    best = min(sizes.values())
    assert best_delta_bits(positions) == (min(b for b, n in sizes.items() if n == best), best)
    assert best_delta_bits(np.array([], dtype=np.int64)) == (1, 0)


# --- format choice and round trips -----------------------------------------------------------


def test_choose_bitmask_for_dense_mask() -> None:
    mask = np.random.default_rng(0).random(4096) < 0.5
    mask[-1] = True  # else 1-bit delta (a bitmask cut after the last kept bit) could be smaller
    positions = np.flatnonzero(mask)
    assert choose_index_format(positions, 4096) == IndexChoice("bitmask", 0, 512)


def test_choose_delta_for_very_sparse_mask() -> None:
    positions = np.arange(0, 100_000, 997)  # ~0.1% kept, evenly spread
    choice = choose_index_format(positions, 100_000)
    assert choice.format == "delta"
    assert choice.nbytes < packed_nbytes(100_000, 1)
    assert choice.bits == 10  # gaps of 997 fit one 10-bit code, no escapes
    assert encode_index(positions, 100_000, choice).size == choice.nbytes


def test_choose_tie_goes_to_bitmask() -> None:
    # numel 8, all kept: bitmask 1 byte; delta at 1 bit is 8 codes = 1 byte too.
    assert choose_index_format(np.arange(8), 8) == IndexChoice("bitmask", 0, 1)


@settings(max_examples=200, deadline=None)
@given(case=kept_positions(), force=st.sampled_from([None, "bitmask", 1, 2, 3, 5, 8, 13, 16, 32]))
def test_index_round_trip(case: tuple[np.ndarray, int], force: str | int | None) -> None:
    positions, numel = case
    if force is None:
        choice = choose_index_format(positions, numel)
        assert choice.nbytes <= packed_nbytes(numel, 1)
    elif force == "bitmask":
        choice = IndexChoice("bitmask", 0, packed_nbytes(numel, 1))
    else:
        choice = IndexChoice("delta", int(force), 0)
    buf = encode_index(positions, numel, choice)
    assert buf.dtype == np.uint8
    if force is None:
        assert buf.size == choice.nbytes
    out = decode_index(buf.tobytes(), numel, choice.format, choice.bits, positions.size)
    assert out.dtype == np.int64
    assert out.tolist() == positions.tolist()


# --- corrupt streams -------------------------------------------------------------------------


def _delta_buf(positions: list[int], bits: int) -> np.ndarray:
    return pack_bits(encode_delta(np.array(positions, dtype=np.int64), bits), bits)


def test_delta_fewer_elements_than_nnz_raises() -> None:
    buf = _delta_buf([1, 5, 9], 4)
    with pytest.raises(ArtifactError, match="delta index stream holds 3 elements but nnz is 4"):
        decode_index(buf, 100, "delta", 4, 4)


def test_delta_truncated_stream_raises() -> None:
    buf = _delta_buf([1, 5, 9, 30], 4)[:-1]  # codes 2,4,4,0,6 lose the 6
    with pytest.raises(ArtifactError, match="holds 3 elements but nnz is 4"):
        decode_index(buf, 100, "delta", 4, 4)


def test_delta_extra_bytes_raise() -> None:
    buf = np.concatenate([_delta_buf([1, 5], 4), np.zeros(1, dtype=np.uint8)])
    with pytest.raises(ArtifactError, match="holds 2 bytes but its 2 codes of 4 bits need 1"):
        decode_index(buf, 100, "delta", 4, 2)


def test_delta_position_past_numel_raises() -> None:
    buf = _delta_buf([1, 5, 12], 4)
    with pytest.raises(ArtifactError, match="decodes to position 12 in a tensor of 10 elements"):
        decode_index(buf, 10, "delta", 4, 3)


def test_bitmask_nnz_mismatch_raises() -> None:
    buf = encode_bitmask(np.array([1, 2]), 16)
    with pytest.raises(ArtifactError, match="bitmask index holds 2 elements but nnz is 3"):
        decode_index(buf, 16, "bitmask", 0, 3)


@pytest.mark.parametrize(
    ("fmt", "bits", "count", "match"),
    [
        ("csr", 4, 1, "unknown sparse index format 'csr'; expected 'bitmask' or 'delta'"),
        ("delta", 0, 1, r"delta index code width must be in 1\.\.32, got 0"),
        ("delta", 40, 1, r"delta index code width must be in 1\.\.32, got 40"),
        ("delta", 4, -1, "sparse index nnz must be an integer >= 0, got -1"),
    ],
)
def test_decode_index_bad_header(fmt: str, bits: int, count: int, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        decode_index(b"\x01", 10, fmt, bits, count)
