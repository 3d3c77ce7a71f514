"""Wall-clock latency of a forward pass: warm-up, fixed threads, median of N runs."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from modelpress.errors import ConfigError
from modelpress.measure.flops import ExampleInputs, call_model, eval_mode

__all__ = ["LatencyResult", "measure_latency"]


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one forward pass in milliseconds, over ``runs`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    threads: int
    batch_size: int


def _check_int_at_least_one(name: str, value: object) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int (not a bool) ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"The '{name}' parameter of measure_latency must be an int >= 1. Got {value!r} instead."
        )


def _batch_size(example_inputs: ExampleInputs) -> int:
    """Size of dim 0 of the first tensor in ``example_inputs`` (1 for scalars or no tensor)."""
    if isinstance(example_inputs, Tensor):
        candidates = [example_inputs]
    elif isinstance(example_inputs, Mapping):
        candidates = list(example_inputs.values())
    else:
        candidates = list(example_inputs)
    for value in candidates:
        if isinstance(value, Tensor):
            return int(value.shape[0]) if value.dim() > 0 else 1
    return 1


def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int = 1,
) -> LatencyResult:
    """Time ``runs`` forward passes after ``warmup`` untimed ones, with a fixed thread count.

    Each run is timed with ``time.perf_counter_ns``; the result reports the median and the
    10th/90th percentiles (linear interpolation, ``torch.quantile``) in milliseconds. The
    model runs in eval mode under ``torch.inference_mode()``; its mode and
    ``torch.get_num_threads()`` are restored afterwards.

    Args:
        model: The module to time.
        example_inputs: A Tensor, a tuple of tensors or a dict of keyword tensors.
        runs: Timed forward passes, ``>= 1``.
        warmup: Untimed forward passes before timing, ``>= 1``.
        threads: Intra-op threads for the duration (``torch.set_num_threads``), ``>= 1``.

    Returns:
        A ``LatencyResult``.

    Raises:
        ConfigError: If ``runs``, ``warmup`` or ``threads`` is not an int ``>= 1``.
        DataError: If ``example_inputs`` is of an unsupported kind.
    """
    for name, value in (("runs", runs), ("warmup", warmup), ("threads", threads)):
        _check_int_at_least_one(name, value)
    previous_threads = torch.get_num_threads()
    times_ns: list[int] = []
    torch.set_num_threads(threads)
    try:
        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                call_model(model, example_inputs)
            for _ in range(runs):
                start = time.perf_counter_ns()
                call_model(model, example_inputs)
                times_ns.append(time.perf_counter_ns() - start)
    finally:
        torch.set_num_threads(previous_threads)
    times_ms = torch.tensor(times_ns, dtype=torch.float64) / 1e6  # (runs,) ms
    p10, median, p90 = torch.quantile(times_ms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return LatencyResult(
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        runs=runs,
        threads=threads,
        batch_size=_batch_size(example_inputs),
    )
