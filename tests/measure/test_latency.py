"""Tests for modelpress.measure.latency (no assertions on speed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from modelpress.errors import ConfigError
from modelpress.measure import LatencyResult, measure_latency


def test_returns_sane_numbers_and_restores_state() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, torch.randn(4, 8), runs=7, warmup=2, threads=1)
    assert isinstance(result, LatencyResult)
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert (result.runs, result.threads, result.batch_size) == (7, 1, 4)
    assert torch.get_num_threads() == threads_before
    assert model.training
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.runs = 3  # type: ignore[misc]


def test_dict_inputs_batch_size() -> None:
    class Kw(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    result = measure_latency(Kw(), {"x": torch.randn(3, 2)}, runs=2, warmup=1)
    assert result.batch_size == 3


@pytest.mark.parametrize("name", ["runs", "warmup", "threads"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_rejects_bad_counts(name: str, value: object) -> None:
    threads_before = torch.get_num_threads()
    with pytest.raises(
        ConfigError,
        match=rf"The '{name}' parameter of measure_latency must be an int >= 1\. "
        rf"Got {value!r} instead\.",
    ):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), **{name: value})
    assert torch.get_num_threads() == threads_before


def test_restores_threads_when_the_model_fails() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    threads_before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(Broken(), torch.randn(1, 2), threads=1)
    assert torch.get_num_threads() == threads_before
