"""Elias-gamma coding of integer arrays (the entropy coders' tables)."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.artifact.gamma import gamma_bits, gamma_decode, gamma_encode
from modelpress.errors import ArtifactError


def test_codes_match_the_definition() -> None:
    # 0..3 are v = 1..4: prefixes 1 | 01 | 01 | 001, then mantissas - | 0 | 1 | 00
    assert gamma_encode(np.array([0, 1, 2, 3])).tolist() == [1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0]
    assert gamma_bits(np.array([0, 1, 2, 3])) == 12


@pytest.mark.parametrize(
    "values",
    [
        np.zeros(0, dtype=np.int64),
        np.zeros(7, dtype=np.int64),
        np.array([2**k - 1 for k in range(1, 53)] + [2**k for k in range(52)]),  # powers of two
        np.random.default_rng(0).geometric(0.01, 20_000),
        np.random.default_rng(1).integers(0, 2**52, 1_000),
    ],
)
def test_round_trip_from_any_offset(values: np.ndarray) -> None:
    bits = gamma_encode(values)
    assert bits.size == gamma_bits(values)
    framed = np.concatenate([np.ones(5, np.uint8), bits, np.ones(3, np.uint8)])
    decoded, end = gamma_decode(framed, 5, values.size)
    assert decoded.tolist() == values.tolist() and end == 5 + bits.size


def test_values_it_cannot_code_are_refused() -> None:
    with pytest.raises(ValueError, match="gamma codes"):
        gamma_encode(np.array([-1]))
    with pytest.raises(ValueError, match="gamma codes"):
        gamma_encode(np.array([2**53]))


def test_truncated_or_overlong_bits_are_artifact_errors() -> None:
    bits = gamma_encode(np.array([5, 900, 3]))
    with pytest.raises(ArtifactError, match="ends after 2 of 3"):
        gamma_decode(bits[: np.flatnonzero(bits)[1] + 1], 0, 3)
    with pytest.raises(ArtifactError, match="needs"):
        gamma_decode(bits[:-1], 0, 3)
    with pytest.raises(ArtifactError, match="53-bit value"):
        gamma_decode(np.concatenate([np.zeros(53, np.uint8), np.ones(60, np.uint8)]), 0, 1)
