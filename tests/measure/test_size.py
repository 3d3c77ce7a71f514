"""Tests for modelpress.measure.size: params, nonzeros, bytes on disk, bits per weight."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.errors import ArtifactError, ConfigError
from modelpress.measure import (
    bits_per_weight,
    count_nonzeros,
    count_params,
    directory_bytes,
    state_dict_bytes,
)

N_PARAMS = 4 * 3 + 3 + 3 * 2 + 2  # Linear(4, 3) + Linear(3, 2) = 23


class HalfMask(nn.Module):
    """A pruning-style parametrization: zero the first half of a weight's entries."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        mask = torch.ones(shape).flatten()
        mask[: mask.numel() // 2] = 0
        self.register_buffer("mask", mask.reshape(shape))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.mask


def _ones_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    return model


def _masked_model() -> nn.Sequential:
    model = _ones_model()
    parametrize.register_parametrization(model[0], "weight", HalfMask((3, 4)))
    return model


def test_count_params_plain() -> None:
    assert count_params(_ones_model()) == N_PARAMS


def test_count_params_shared_counted_once() -> None:
    layer = nn.Linear(4, 4)
    assert count_params(nn.Sequential(layer, layer)) == 4 * 4 + 4


def test_count_params_parametrized_counts_effective_tensor_once() -> None:
    assert count_params(_masked_model()) == N_PARAMS


def test_count_nonzeros_applies_mask() -> None:
    assert count_nonzeros(_ones_model()) == N_PARAMS
    assert count_nonzeros(_masked_model()) == N_PARAMS - 6  # half of the (3, 4) weight


def test_count_params_parametrization_that_changes_shape() -> None:
    class Rows(nn.Module):
        def forward(self, X: torch.Tensor) -> torch.Tensor:
            return X[:, :2]  # (3, 4) -> (3, 2)

    module = nn.Linear(4, 3)
    parametrize.register_parametrization(module, "weight", Rows(), unsafe=True)
    assert count_params(module) == 3 * 2 + 3


def test_directory_bytes_sums_files_recursively(tmp_path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 25)
    os.symlink(tmp_path / "a.bin", tmp_path / "link.bin")  # not a regular file: not counted
    assert directory_bytes(tmp_path) == 35
    assert directory_bytes(tmp_path / "sub" / "b.bin") == 25
    assert directory_bytes(str(tmp_path / "sub")) == 25


def test_directory_bytes_missing_path(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ArtifactError, match="Cannot measure '.*nope': no such file"):
        directory_bytes(missing)


def test_state_dict_bytes_grows_by_four_bytes_per_fp32_weight() -> None:
    small, big = nn.Linear(10, 100), nn.Linear(1000, 100)
    delta = state_dict_bytes(big) - state_dict_bytes(small)
    assert abs(delta - 4 * (1000 - 10) * 100) <= 128  # per-record alignment padding only


def test_state_dict_bytes_of_parametrized_model_is_baked() -> None:
    masked, plain = _masked_model(), _ones_model()
    measured = state_dict_bytes(masked)
    assert measured == state_dict_bytes(plain)  # same keys and shapes once baked
    assert measured >= 4 * N_PARAMS
    assert parametrize.is_parametrized(masked[0], "weight")  # the caller's model is untouched


def test_bits_per_weight() -> None:
    assert bits_per_weight(100, 200) == 4.0
    assert bits_per_weight(0, 1) == 0.0


@pytest.mark.parametrize(
    ("total_bytes", "n_weights", "message"),
    [
        (-1, 10, r"The 'total_bytes' parameter of bits_per_weight must be an int >= 0\. Got -1"),
        (10, 0, r"The 'n_weights' parameter of bits_per_weight must be an int >= 1\. Got 0"),
        (10, 2.5, r"The 'n_weights' parameter .* Got 2\.5 instead\."),
    ],
)
def test_bits_per_weight_rejects_bad_input(total_bytes, n_weights, message) -> None:
    with pytest.raises(ConfigError, match=message):
        bits_per_weight(total_bytes, n_weights)
