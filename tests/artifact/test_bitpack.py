"""Tests for modelpress.artifact.bitpack: exact byte layout, round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact import bitpack
from modelpress.artifact.bitpack import bits_needed, pack_bits, packed_nbytes, unpack_bits
from modelpress.errors import ArtifactError


def _reference_pack(values: list[int], bits: int) -> bytes:
    """Bit-by-bit reference: value i at stream bits [i*bits, (i+1)*bits), LSB first."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    return stream.to_bytes(packed_nbytes(len(values), bits), "little")


@pytest.mark.parametrize(
    ("values", "bits", "expected"),
    [
        ([1, 2, 3], 2, [0b00111001]),
        ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, [0b10001101, 0b00000001]),
        ([0xA, 0x5, 0xF], 4, [0x5A, 0x0F]),
        ([5, 2, 7], 3, [0b11010101, 0b00000001]),
        ([0x1FF], 9, [0xFF, 0x01]),
        ([0x1234], 16, [0x34, 0x12]),
        ([0x12345678], 32, [0x78, 0x56, 0x34, 0x12]),
        ([0xABC, 0x123], 12, [0xBC, 0x3A, 0x12]),
        ([], 5, []),
    ],
)
def test_pack_bits_exact_layout(values: list[int], bits: int, expected: list[int]) -> None:
    packed = pack_bits(np.array(values, dtype=np.int64), bits)
    assert packed.dtype == np.uint8
    assert packed.tolist() == expected
    assert unpack_bits(packed, bits, len(values)).tolist() == values


@settings(max_examples=200, deadline=None)
@given(data=st.data(), bits=st.integers(1, 32), n=st.integers(0, 70))
def test_round_trip_matches_reference(data: st.DataObject, bits: int, n: int) -> None:
    top = (1 << bits) - 1
    value = st.one_of(st.just(0), st.just(top), st.integers(0, top))
    values = data.draw(st.lists(value, min_size=n, max_size=n))
    arr = np.array(values, dtype=np.uint64)
    packed = pack_bits(arr, bits)
    assert packed.tobytes() == _reference_pack(values, bits)
    out = unpack_bits(packed.tobytes(), bits, n)
    assert out.dtype == np.int64
    assert out.tolist() == values


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_pack_accepts_any_integer_dtype(dtype: type) -> None:
    values = np.array([0, 3, 7, 1], dtype=dtype)
    assert pack_bits(values, 3).tolist() == list(_reference_pack([0, 3, 7, 1], 3))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 11, 16, 24, 31, 32])
def test_chunked_general_path_round_trips(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    monkeypatch.setattr(bitpack, "_CHUNK_VALUES", 16)  # force many chunks, incl. a partial one
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=101, dtype=np.uint64)
    packed = pack_bits(values, bits)
    assert packed.tobytes() == _reference_pack(values.tolist(), bits)
    assert unpack_bits(packed, bits, values.size).tolist() == values.tolist()


@pytest.mark.parametrize(("bad", "bits"), [(4, 2), (-1, 8), (1 << 32, 32), (2, 1)])
def test_pack_rejects_out_of_range_values(bad: int, bits: int) -> None:
    top = (1 << bits) - 1
    with pytest.raises(ValueError, match=rf"value {bad}, outside 0\.\.{top} .*{bits} bits"):
        pack_bits(np.array([0, bad], dtype=np.int64), bits)


@pytest.mark.parametrize("bits", [0, 33, -1])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be an integer in 1..32"):
        pack_bits(np.zeros(3, dtype=np.int64), bits)
    with pytest.raises(ValueError, match="bits must be an integer in 1..32"):
        unpack_bits(b"\x00", bits, 1)


def test_pack_rejects_float_values() -> None:
    with pytest.raises(ValueError, match="integer values"):
        pack_bits(np.array([1.0, 2.0]), 4)


@pytest.mark.parametrize(
    ("bits", "count", "nbytes"), [(3, 8, 2), (12, 3, 4), (32, 2, 7), (1, 17, 2)]
)
def test_unpack_truncated_stream_raises(bits: int, count: int, nbytes: int) -> None:
    need = packed_nbytes(count, bits)
    msg = rf"packed stream holds {nbytes} bytes but {count} values of {bits} bits need {need} bytes"
    with pytest.raises(ArtifactError, match=msg):
        unpack_bits(np.zeros(nbytes, dtype=np.uint8), bits, count)


def test_unpack_ignores_trailing_bytes() -> None:
    assert unpack_bits(b"\x39\xff\xff", 2, 3).tolist() == [1, 2, 3]


def test_unpack_rejects_non_byte_arrays() -> None:
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_bits(np.zeros(2, dtype=np.int32), 8, 1)


@pytest.mark.parametrize(("count", "bits", "nbytes"), [(0, 7, 0), (1, 1, 1), (8, 1, 1), (3, 3, 2)])
def test_packed_nbytes(count: int, bits: int, nbytes: int) -> None:
    assert packed_nbytes(count, bits) == nbytes


@pytest.mark.parametrize(
    ("max_value", "bits"), [(0, 1), (1, 1), (2, 2), (255, 8), (256, 9), ((1 << 32) - 1, 32)]
)
def test_bits_needed(max_value: int, bits: int) -> None:
    assert bits_needed(max_value) == bits


def test_bits_needed_rejects_negative() -> None:
    with pytest.raises(ValueError, match="max_value must be >= 0"):
        bits_needed(-1)
