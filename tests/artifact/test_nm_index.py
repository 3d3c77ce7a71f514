"""Tests for modelpress.artifact.nm_index: combinadic codes of N:M groups, detection, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact.bitpack import pack_bits
from modelpress.artifact.nm_index import (
    NMPattern,
    code_bits,
    decode_nm,
    encode_nm,
    find_nm_pattern,
    rank_subsets,
    unrank_subsets,
)
from modelpress.errors import ArtifactError
from modelpress.techniques.pruning.nm import nm_mask

# --- combinadic rank / unrank ----------------------------------------------------------------


def test_two_of_four_codes_are_colex_order() -> None:
    subsets = [[0, 1], [0, 2], [1, 2], [0, 3], [1, 3], [2, 3]]
    assert rank_subsets(np.array(subsets), 4).tolist() == [0, 1, 2, 3, 4, 5]
    assert unrank_subsets(np.arange(6), 2, 4).tolist() == subsets


@pytest.mark.parametrize(
    ("n", "m"), [(1, 2), (1, 4), (2, 4), (3, 4), (3, 8), (4, 8), (7, 8), (5, 16), (8, 16), (2, 64)]
)
def test_rank_is_a_bijection_over_all_subsets(n: int, m: int) -> None:
    subsets = np.array(list(itertools.combinations(range(m), n)))  # (C(m, n), n)
    ranks = rank_subsets(subsets, m)
    assert sorted(ranks.tolist()) == list(range(math.comb(m, n)))
    assert np.array_equal(unrank_subsets(ranks, n, m), subsets)


@pytest.mark.parametrize(("n", "m"), [(6, 64), (7, 64), (60, 64), (16, 32)])
def test_large_groups_round_trip_without_a_subset_table(n: int, m: int) -> None:
    rng = np.random.default_rng(n * m)
    subsets = np.sort(np.argsort(rng.random((500, m)), axis=1)[:, :n], axis=1)
    ends = np.array([np.arange(n), np.arange(m - n, m)])  # the first and the last subset
    subsets = np.concatenate([subsets, ends])
    ranks = rank_subsets(subsets, m)
    assert ranks.max() < math.comb(m, n) and ranks[-2:].tolist() == [0, math.comb(m, n) - 1]
    assert np.array_equal(unrank_subsets(ranks, n, m), subsets)


@pytest.mark.parametrize(
    ("n", "m", "bits"), [(1, 2, 1), (1, 4, 2), (2, 4, 3), (4, 8, 7), (8, 16, 14), (7, 64, 30)]
)
def test_code_bits_is_ceil_log2_of_the_subset_count(n: int, m: int, bits: int) -> None:
    assert code_bits(n, m) == bits == math.ceil(math.log2(math.comb(m, n)))


@pytest.mark.parametrize(
    ("n", "m", "match"),
    [
        (0, 4, r"1 <= n < m <= 64, got n=0, m=4"),
        (4, 4, r"1 <= n < m <= 64, got n=4, m=4"),
        (2, 65, r"1 <= n < m <= 64, got n=2, m=65"),
        (8, 64, r"C\(64, 8\) = 4426165368 codes do not fit in 32 bits"),
        (32, 64, r"C\(64, 32\) = \d+ codes do not fit in 32 bits"),
    ],
)
def test_unsupported_patterns_are_refused(n: int, m: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        code_bits(n, m)


def test_rank_and_unrank_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"strictly increasing in 0\.\.3"):
        rank_subsets(np.array([[1, 1]]), 4)
    with pytest.raises(ValueError, match=r"strictly increasing in 0\.\.3"):
        rank_subsets(np.array([[2, 4]]), 4)
    with pytest.raises(ValueError, match=r"ranks must be in 0\.\.5 for C\(4, 2\)"):
        unrank_subsets(np.array([6]), 2, 4)


# --- detection -------------------------------------------------------------------------------


def pruned(shape: tuple[int, ...], n: int, m: int, seed: int = 0) -> np.ndarray:
    """Nonzero mask of a random weight pruned by prune.nm's own ``nm_mask``."""
    g = torch.Generator().manual_seed(seed)
    return nm_mask(torch.rand(shape, generator=g), n, m).numpy()


@pytest.mark.parametrize("shape", [(16, 32), (8, 16, 3, 3), (4, 16, 5)])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (8, 16)])
def test_pruned_weights_are_found_at_their_own_n_m(shape, n: int, m: int) -> None:
    nonzero = pruned(shape, n, m)
    pattern = find_nm_pattern(nonzero.ravel(), shape, value_bits=32)
    assert pattern == NMPattern(n, m, math.prod(shape) // m)


def test_detection_uses_the_smallest_sufficient_n_and_the_cheapest_m() -> None:
    groups = pruned((8, 16), 4, 8).reshape(-1, 8)  # (16, 8): 4 kept per group
    groups[np.arange(16), groups.argmax(axis=1)] = False  # drop the first kept of each
    # 3:8 (6-bit codes) beats 3:4 (twice the values) and 6:16 (13-bit codes) at fp32
    assert find_nm_pattern(groups.reshape(8, 16), (8, 16), 32) == NMPattern(3, 8, 16)
    lone = np.zeros((8, 16), dtype=bool)
    lone[:, ::4] = True  # 1:4, and so also 1:2, 2:8 and 4:16
    assert find_nm_pattern(lone, (8, 16), 32) == NMPattern(1, 4, 32)


def test_every_group_of_16_missing_one_weight_is_15_of_16() -> None:
    nonzero = np.ones((4, 32), dtype=bool)
    nonzero[:, ::16] = False
    assert find_nm_pattern(nonzero, (4, 32), 32) == NMPattern(15, 16, 8)


@pytest.mark.parametrize(
    ("nonzero", "shape"),
    [
        (np.array([True, False, False, False]), (4,)),  # 1-D
        (np.zeros((4, 8), dtype=bool), (4, 8)),  # nothing kept: no n >= 1 needed
        (np.ones((4, 8), dtype=bool), (4, 8)),  # dense
        (np.eye(6, dtype=bool)[:, :5], (6, 5)),  # 5 inputs: no m divides them
    ],
)
def test_non_nm_tensors_have_no_pattern(nonzero: np.ndarray, shape: tuple[int, ...]) -> None:
    assert find_nm_pattern(nonzero, shape, 32) is None


# --- encode / decode -------------------------------------------------------------------------


def test_exact_codes_and_the_earliest_zeros_fill_short_groups() -> None:
    nonzero = np.array([[1, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 1, 0]], dtype=bool)
    index, positions = encode_nm(nonzero, (2, 8), NMPattern(2, 4, 4))
    # groups {0,2}=1, {3}+{0}={0,3}=3, {}+{0,1}={0,1}=0, {1,2}=2; 3-bit codes, LSB first
    assert index.tolist() == pack_bits(np.array([1, 3, 0, 2]), 3).tolist()
    assert index.size == 2  # 4 groups * 3 bits = 12 bits
    assert positions.tolist() == [0, 2, 4, 7, 8, 9, 13, 14]
    assert decode_nm(index, (2, 8), 2, 4, 3).tolist() == positions.tolist()


def test_conv_groups_run_along_inputs_at_each_kernel_position() -> None:
    nonzero = np.zeros((1, 4, 2), dtype=bool)  # (out, in, k)
    nonzero[0, [0, 1], 0] = True  # kernel position 0 keeps inputs {0, 1}: code 0
    nonzero[0, [2, 3], 1] = True  # kernel position 1 keeps inputs {2, 3}: code 5
    index, positions = encode_nm(nonzero, (1, 4, 2), NMPattern(2, 4, 2))
    assert index.tolist() == [0 | 5 << 3] and positions.tolist() == [0, 2, 5, 7]
    assert decode_nm(index, (1, 4, 2), 2, 4, 3).tolist() == [0, 2, 5, 7]


@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (4, 8, 5), (2, 4, 1, 2, 3)])
def test_pruned_conv_positions_are_exactly_the_nonzeros(shape: tuple[int, ...]) -> None:
    nonzero = pruned(shape, 2, 4)
    pattern = NMPattern(2, 4, nonzero.size // 4)
    index, positions = encode_nm(nonzero, shape, pattern)
    assert positions.tolist() == np.flatnonzero(nonzero).tolist()
    assert decode_nm(index, shape, 2, 4, 3).tolist() == positions.tolist()


@st.composite
def nm_tensors(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, ...], int, int]:
    """A nonzero mask pruned n:m along dim 1 with some extra zeros, its shape, n and m."""
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m - 1))
    kernel = draw(st.lists(st.integers(1, 3), max_size=2))
    shape = (draw(st.integers(1, 4)), m * draw(st.integers(1, 3)), *kernel)
    nonzero = pruned(shape, n, m, seed=draw(st.integers(0, 2**16)))
    holes = np.random.default_rng(draw(st.integers(0, 2**16))).random(shape)
    return nonzero & (holes >= draw(st.floats(0.0, 1.0))), shape, n, m


@settings(max_examples=60, deadline=None)
@given(case=nm_tensors())
def test_round_trip_keeps_every_nonzero_and_n_per_group(case) -> None:
    nonzero, shape, n, m = case
    pattern = NMPattern(n, m, nonzero.size // m)
    index, positions = encode_nm(nonzero.ravel(), shape, pattern)
    assert index.size == pattern.index_nbytes and positions.size == pattern.groups * n
    assert np.all(np.diff(positions) > 0) and set(np.flatnonzero(nonzero)) <= set(positions)
    decoded = decode_nm(index.tobytes(), shape, n, m, pattern.bits)
    assert decoded.dtype == np.int64 and decoded.tolist() == positions.tolist()


def test_encode_rejects_a_group_over_n() -> None:
    with pytest.raises(ValueError, match=r"do not follow 1:4 along dim 1"):
        encode_nm(pruned((4, 8), 2, 4), (4, 8), NMPattern(1, 4, 8))


# --- corrupt records and payloads ------------------------------------------------------------


@pytest.fixture()
def two_of_four() -> np.ndarray:
    return encode_nm(pruned((4, 16), 2, 4), (4, 16), NMPattern(2, 4, 16))[0]  # 6 bytes


@pytest.mark.parametrize(
    ("cut", "match"),
    [(-1, "nm index holds 5 bytes; 16 groups of 3-bit codes need 6"), (1, "holds 7 bytes")],
)
def test_short_or_long_payload(two_of_four: np.ndarray, cut: int, match: str) -> None:
    buf = two_of_four[:cut] if cut < 0 else np.concatenate([two_of_four, np.zeros(cut, np.uint8)])
    with pytest.raises(ArtifactError, match=match):
        decode_nm(buf, (4, 16), 2, 4, 3)


def test_out_of_range_code(two_of_four: np.ndarray) -> None:
    buf = two_of_four.copy()
    buf[0] |= 0b00111000  # group 1's code becomes 7; 2:4 has only 6 subsets
    with pytest.raises(ArtifactError, match=r"code 7 of group 1 is out of range: .*= 6 codes"):
        decode_nm(buf, (4, 16), 2, 4, 3)


@pytest.mark.parametrize(
    ("shape", "n", "m", "bits", "match"),
    [
        ((4, 16), 2, 4, 4, "nm layout 2:4 has 3-bit codes, not 4"),
        ((4, 16), 4, 4, 3, r"nm layout 4:4 is not supported \(N:M needs 1 <= n < m"),
        ((4, 16), 2, 128, 3, "nm layout 2:128 is not supported"),
        ((4, 16), True, 4, 3, "nm layout needs integer n, m, bits; got True, 4, 3"),
        ((4, 16), "2", 4, 3, "needs integer n, m, bits"),
        ((4, 18), 2, 4, 3, r"nm layout 2:4 does not fit shape \[4, 18\] along dim 1"),
        ((64,), 2, 4, 3, r"does not fit shape \[64\]"),
    ],
)
def test_bad_layout_record(two_of_four, shape, n, m, bits, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        decode_nm(two_of_four, shape, n, m, bits)


def test_payload_of_the_wrong_dtype(two_of_four: np.ndarray) -> None:
    with pytest.raises(ArtifactError, match="nm index payload must be uint8 bytes, got int16"):
        decode_nm(two_of_four.astype(np.int16), (4, 16), 2, 4, 3)
