"""``quant.mixed``: a bit width per layer, chosen to minimise output error under a byte budget.

1. Every selected layer gets one min-max grid per candidate bit width (the grid of
   ``quant.rtn``: granularity, group size, symmetry, scale dtype), and its cost at each width
   is measured by encoding the quantized weight as the artifact does (:mod:`.budget`).
2. The budget (``budget_bytes``, or the fp32 model bytes over ``ratio``) minus the bytes of
   everything else in the artifact is what the selected layers may take; if even the lowest
   width of every layer exceeds it, a ConfigError says the smallest reachable size.
3. Sensitivity (:mod:`.sensitivity`): the model's output error with only that layer quantized,
   for each layer and width, on calibration batches.
4. The exact multiple-choice knapsack (:mod:`.solver`) picks one width per layer minimising
   the summed sensitivities within the budget (ZeroQ, Cai et al. 2020).
5. Each layer is quantized at its width: rounded to nearest (``rtn``, the grid of step 1), or
   with GPTQ's error compensation (``gptq``, the engine of ``quant.gptq``; Embedding layers,
   whose one-hot inputs make GPTQ's Hessian diagonal so GPTQ reduces to rounding, are rounded).
   Both store exactly the codes priced in step 1 (GPTQ at the dense-layout price, an upper
   bound whatever weights it zeroes), so the artifact's payload never exceeds the budget.

The result records ``bits`` per layer, the ``sensitivity`` table, each layer's ``bytes``, the
``budget_bytes`` and the predicted ``payload_bytes`` of the whole model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field, model_validator
from torch import nn

from modelpress.context import Context
from modelpress.errors import ConfigError, DataError
from modelpress.layerwise import LAYERWISE, Hessian, calibrate_layerwise, check_supported
from modelpress.parametrizations import add_parametrization, effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized
from modelpress.techniques.quantization.gptq import GPTQConfig, GPTQQuantizer
from modelpress.techniques.quantization.mixed.budget import (
    dense_bytes,
    encoded_bytes,
    fp32_bytes,
    other_bytes,
)
from modelpress.techniques.quantization.mixed.sensitivity import sensitivity_table
from modelpress.techniques.quantization.mixed.solver import solve_allocation
from modelpress.techniques.quantization.rtn import QUANTIZABLE, GridConfig

OWNER = "quant.mixed"
Selected = list[tuple[str, nn.Module]]


def _widths(value: list[int]) -> list[int]:
    if not value:
        raise ValueError("give at least one width")
    bad = [b for b in value if not 2 <= b <= 8]
    if bad:
        raise ValueError(f"each width must be in [2, 8]; got {bad[0]}")
    if len(set(value)) != len(value):
        raise ValueError("a width is repeated")
    return value


# bit widths: a non-empty list of distinct ints in [2, 8]
Widths = Annotated[list[int], AfterValidator(_widths)]


class MixedConfig(GridConfig):
    """Mixed precision: per-layer bit widths under a byte budget, from per-layer sensitivity."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding"],
        description="Modules to quantize: exact names, type names or 're:' regexes.",
    )
    candidate_bits: Widths = Field(
        default_factory=lambda: [2, 3, 4, 8],
        description="Bit widths each layer may get (distinct, each in [2, 8]).",
    )
    budget_bytes: int | None = Field(
        None, ge=1, description="Artifact payload bytes of the whole model (or give ratio)."
    )
    ratio: float | None = Field(
        None, gt=1, le=32, description="Budget = fp32 model bytes / ratio (or give budget_bytes)."
    )
    metric: Literal["mse", "kl"] = Field(
        "mse", description="Sensitivity: relative output MSE, or KL of softmax (classifiers)."
    )
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="Quantize the chosen widths by rounding, or with GPTQ."
    )
    n_samples: int = Field(128, ge=1, description="Calibration samples (sensitivity and GPTQ).")
    batch_size: int = Field(32, ge=1, description="Calibration samples per forward pass.")

    @model_validator(mode="after")
    def _consistent(self) -> MixedConfig:
        if (self.budget_bytes is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'budget_bytes' and 'ratio'")
        return self


def _grid(weight: torch.Tensor, bits: int, cfg: MixedConfig) -> AffineFakeQuant:
    return AffineFakeQuant(
        weight,
        bits,
        symmetric=cfg.symmetric,
        granularity=cfg.granularity,
        group_size=cfg.group_size,
        scale_dtype=cfg.scale_dtype,
    )


def price_layers(
    selected: Selected, grids: list[list[AffineFakeQuant]], dense: list[bool]
) -> np.ndarray:
    """``(L, K)`` payload bytes of each layer's weight quantized on each grid.

    Args:
        selected: ``(name, module)`` of the layers.
        grids: ``grids[l][k]``, layer ``l``'s quantizer at candidate ``k``.
        dense: per layer, price the dense layout (an upper bound for any weights on the
            grid, for GPTQ) instead of encoding exactly these rounded weights.
    """
    costs = np.zeros((len(selected), len(grids[0])), dtype=np.int64)
    for i, (name, module) in enumerate(selected):
        weight = effective_tensor(module)
        for k, fq in enumerate(grids[i]):
            with torch.no_grad():
                q = fq(weight)
            codec = fq.value_codec()
            costs[i, k] = dense_bytes(q, codec) if dense[i] else encoded_bytes(name, q, codec)
    return costs


def split_budget(
    model: nn.Module, selected: Selected, costs: np.ndarray, cfg: MixedConfig
) -> tuple[int, int]:
    """The model's payload budget, and the bytes of everything but the selected weights.

    Raises:
        ConfigError: the lowest width of every layer already exceeds the budget (names the
            smallest reachable payload).
    """
    total = cfg.budget_bytes if cfg.budget_bytes is not None else int(fp32_bytes(model) / cfg.ratio)
    fixed = other_bytes(model, {f"{name}.weight" for name, _ in selected})
    smallest = fixed + int(costs.min(1).sum())
    if smallest > total:
        how = "budget_bytes" if cfg.ratio is None else f"ratio {cfg.ratio:g}"
        raise ConfigError(
            f"{OWNER}: the budget of {total:,} bytes ({how}) is below the smallest reachable "
            f"payload, {smallest:,} bytes (every selected layer at its lowest width, "
            f"{fixed:,} for the rest); raise the budget or quantize more layers."
        )
    return total, fixed


class _PerLayerGPTQ:
    """The layer-wise callback of ``quant.gptq`` with a bit width per layer."""

    def __init__(self, configs: dict[str, GPTQConfig]) -> None:
        self.quantizers = {name: GPTQQuantizer(c) for name, c in configs.items()}

    def stats(self, name: str, module: nn.Module) -> Hessian:
        return self.quantizers[name].stats(name, module)

    def process(self, name: str, module: nn.Module, stats: Hessian) -> None:
        self.quantizers[name].process(name, module, stats)


def quantize_layers(
    model: nn.Module,
    selected: Selected,
    grids: list[AffineFakeQuant],
    by_gptq: list[bool],
    cfg: MixedConfig,
    batches: list[Any],
) -> None:
    """Put each layer's chosen grid on it; layers marked ``by_gptq`` first get GPTQ weights.

    Args:
        model: the model the layers belong to (GPTQ runs it block by block).
        selected: ``(name, module)`` of the layers.
        grids: the chosen quantizer of each layer (its bit width).
        by_gptq: per layer, quantize with GPTQ (which builds the same grid) instead of rounding.
        cfg: the stage config (grid and calibration settings).
        batches: calibration batches for GPTQ.
    """
    grid = cfg.model_dump(include={"granularity", "group_size", "symmetric", "scale_dtype"})
    size = {"n_samples": cfg.n_samples, "batch_size": cfg.batch_size}
    configs = {
        name: GPTQConfig(bits=fq.bits, **grid, **size)
        for (name, _), fq, g in zip(selected, grids, by_gptq, strict=True)
        if g
    }
    if configs:
        layered = [(n, m) for n, m in selected if n in configs]
        calibrate_layerwise(model, batches, layered, _PerLayerGPTQ(configs), owner=OWNER)
    for (_, module), fq, g in zip(selected, grids, by_gptq, strict=True):
        if not g:
            add_parametrization(module, "weight", fq)


@technique(OWNER, MixedConfig, needs=("calibration",))
def apply_mixed(model: nn.Module, cfg: MixedConfig, ctx: Context) -> nn.Module:
    """Choose bits per layer by sensitivity under a byte budget (exact knapsack), then quantize."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=QUANTIZABLE)
    check_unquantized(selected, OWNER)
    by_gptq = [cfg.method == "gptq" and isinstance(m, LAYERWISE) for _, m in selected]
    if any(by_gptq):
        check_supported([s for s, g in zip(selected, by_gptq, strict=True) if g], OWNER)
    grids = [[_grid(effective_tensor(m), b, cfg) for b in cfg.candidate_bits] for _, m in selected]
    costs = price_layers(selected, grids, dense=by_gptq)
    total, fixed = split_budget(model, selected, costs, cfg)
    batches = list(ctx.calibration_batches(cfg.n_samples, cfg.batch_size))
    if not batches:
        raise DataError(f"{OWNER}: the calibration data yields no batches.")

    def quantized(i: int, k: int) -> torch.Tensor:
        return grids[i][k](effective_tensor(selected[i][1])).detach()

    table = sensitivity_table(
        model, batches, selected, quantized, len(cfg.candidate_bits), cfg.metric
    )
    alloc = solve_allocation(table.numpy(), costs, total - fixed)
    chosen = [grids[i][k] for i, k in enumerate(alloc.choice)]
    quantize_layers(model, selected, chosen, by_gptq, cfg, batches)
    names = [name for name, _ in selected]
    ctx.report("bits", {n: fq.bits for n, fq in zip(names, chosen, strict=True)})
    ctx.report("sensitivity", sensitivity_report(names, cfg.candidate_bits, table))
    ctx.report("bytes", {n: int(c[k]) for n, c, k in zip(names, costs, alloc.choice, strict=True)})
    ctx.report("budget_bytes", total)
    ctx.report("payload_bytes", fixed + alloc.cost)  # an upper bound for GPTQ layers
    return model


def sensitivity_report(
    names: list[str], candidate_bits: list[int], table: torch.Tensor
) -> dict[str, dict[str, float]]:
    """The sensitivity table as JSON-ready ``{layer: {"bits": error}}`` (6 significant digits)."""
    return {
        name: {str(b): float(f"{float(v):.6g}") for b, v in zip(candidate_bits, row, strict=True)}
        for name, row in zip(names, table, strict=True)
    }
