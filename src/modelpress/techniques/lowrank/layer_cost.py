"""What a factorized layer costs against the layer it replaces: FLOPs and measured latency.

A factorization that halves the multiply-adds can still be slower on a CPU runtime (two or
three small GEMMs or convolutions instead of one large one, each with its own dispatch and
memory pass), so every ``lowrank.*`` technique times both on the layer's real input shape
and warns about the layers that got slower, instead of implying a speedup.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from modelpress.measure.flops import count_flops
from modelpress.measure.latency import measure_latency
from modelpress.techniques.architecture.blocks import probe_shapes


@dataclass(frozen=True)
class LayerCost:
    """One layer before and after factorization, on one input of its recorded shape.

    Attributes:
        flops_before: FLOPs of the original layer (``torch.utils.flop_counter``; 2 per MAC).
        flops_after: FLOPs of the replacement.
        ms_before: median eager latency of the original layer in milliseconds (1 thread).
        ms_after: the same for the replacement.
    """

    flops_before: int
    flops_after: int
    ms_before: float
    ms_after: float

    @property
    def speedup(self) -> float:
        """``ms_before / ms_after`` (above 1: the replacement is faster)."""
        return self.ms_before / self.ms_after if self.ms_after > 0 else float("inf")

    def as_record(self) -> dict[str, Any]:
        """JSON-ready record for a stage report, with the speedup rounded."""
        return {**asdict(self), "speedup": round(self.speedup, 3)}


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """The fit error ``||W − Ŵ||_F / ||W||_F`` of a factorized weight (0 for an all-zero ``W``
    reproduced exactly)."""
    w = weight.detach().double()
    norm = float(torch.linalg.vector_norm(w))
    diff = float(torch.linalg.vector_norm(w - approx.detach().double()))
    return diff / norm if norm > 0 else diff


def layer_input_shapes(
    model: nn.Module, names: Sequence[str], example_inputs: Any
) -> dict[str, tuple[int, ...]]:
    """Input shape of each named layer on one forward pass of ``example_inputs``.

    Returns:
        ``{name: input_shape}`` for every named layer that ran ({} without example inputs).
    """
    if example_inputs is None:
        return {}
    return {n: x for n, (x, _) in probe_shapes(model, names, example_inputs).items()}


def compare_layer(
    original: nn.Module,
    replacement: nn.Module,
    input_shape: tuple[int, ...],
    *,
    input_dtype: torch.dtype = torch.float32,
    runs: int = 20,
    seed: int = 0,
) -> LayerCost:
    """FLOPs and median 1-thread eager latency of ``original`` and ``replacement``.

    Both run on the same seeded input of ``input_shape`` (random normal for float inputs,
    random indices below ``num_embeddings`` for an Embedding); latency is
    :func:`~modelpress.measure.latency.measure_latency`, interleaved as two alternating
    halves so a load change on the machine hits both layers alike.

    Args:
        original: the layer as it was.
        replacement: the factorized module that computes (approximately) the same function.
        input_shape: the shape the layer sees in the model.
        input_dtype: float dtype of the input (ignored for embeddings).
        runs: timed calls per layer (split over two rounds).
        seed: seed of the input.
    """
    gen = torch.Generator().manual_seed(seed)
    if isinstance(original, nn.Embedding):
        x = torch.randint(0, original.num_embeddings, input_shape, generator=gen)
    else:
        x = torch.randn(input_shape, generator=gen, dtype=input_dtype)
    half = max(1, runs // 2)
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(2):
        for key, module in (("before", original), ("after", replacement)):
            times[key].append(measure_latency(module, x, runs=half, warmup=2).median_ms)
    return LayerCost(
        flops_before=count_flops(original, x),
        flops_after=count_flops(replacement, x),
        ms_before=float(sum(times["before"]) / 2),
        ms_after=float(sum(times["after"]) / 2),
    )


def warn_slower(owner: str, costs: dict[str, LayerCost]) -> list[str]:
    """Warn (``RuntimeWarning``) about the layers whose replacement measured slower.

    Returns:
        The names of those layers, for the stage report.
    """
    slower = [n for n, c in costs.items() if c.ms_after > c.ms_before]
    if slower:
        detail = ", ".join(f"{n} ({costs[n].speedup:.2f}x)" for n in slower[:5])
        more = f" and {len(slower) - 5} more" if len(slower) > 5 else ""
        warnings.warn(
            f"{owner}: the factorized layer is slower than the original on this runtime for "
            f"{detail}{more}; fewer FLOPs do not mean less time here — raise the rank or leave "
            "these layers out (ignore: [...]).",
            RuntimeWarning,
            stacklevel=2,
        )
    return slower


def compare_layers(
    owner: str,
    originals: dict[str, nn.Module],
    replacements: dict[str, nn.Module],
    shapes: dict[str, tuple[int, ...]],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """FLOPs and 1-thread latency of each replaced layer against its original, on its input
    shape from the example inputs (:func:`~.layer_cost.compare_layer`), and a
    ``RuntimeWarning`` naming the layers that measured slower (:func:`~.layer_cost.warn_slower`).

    Returns:
        ``{name: LayerCost.as_record()}`` for the layers with a known input shape, and the
        names of the slower ones.
    """
    costs = {
        name: compare_layer(originals[name], replacement, shapes[name])
        for name, replacement in replacements.items()
        if name in shapes
    }
    slower = warn_slower(owner, costs)
    return {n: c.as_record() for n, c in costs.items()}, slower
