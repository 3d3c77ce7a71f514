"""``quant.rtn``: weight-only round-to-nearest quantization with min-max ranges.

Each selected weight gets an :class:`AffineFakeQuant` parametrization (see
:mod:`~modelpress.techniques.quantization.affine` for the grid), so the model computes with
exactly the values the artifact stores as ``bits``-bit integers. No data needed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.parametrizations import add_parametrization, effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class GridConfig(TargetedConfig):
    """The affine weight grid every weight quantizer shares: granularity, symmetry, scales."""

    granularity: Literal["tensor", "channel", "group"] = Field(
        "channel", description="One scale per tensor, per output channel, or per group."
    )
    group_size: int | None = Field(
        None, ge=1, description="Inputs per group (setting it implies granularity 'group')."
    )
    symmetric: bool = Field(False, description="Symmetric grid (zero point fixed at 2^(b-1)).")
    scale_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Storage dtype of the scales."
    )

    @model_validator(mode="before")
    @classmethod
    def _group_size_implies_group(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("group_size") and "granularity" not in data:
            return {**data, "granularity": "group"}
        return data

    @model_validator(mode="after")
    def _group_needs_size(self) -> GridConfig:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs 'group_size' (e.g. 128)")
        return self


class WeightQuantConfig(GridConfig):
    """Weight quantization: bits on the shared grid."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding"],
        description="Modules to quantize: exact names, type names or 're:' regexes.",
    )
    bits: int = Field(8, ge=2, le=8, description="Bits per weight.")


def weight_quantizer(
    weight: torch.Tensor, cfg: WeightQuantConfig, **grid: torch.Tensor
) -> AffineFakeQuant:
    """The fake quantizer of ``weight`` on ``cfg``'s grid: min-max, or the fixed ``scale``,
    ``zero_point`` (and AWQ's ``in_scale``) given in ``grid``."""
    return AffineFakeQuant(
        weight,
        cfg.bits,
        symmetric=cfg.symmetric,
        granularity=cfg.granularity,
        group_size=cfg.group_size,
        scale_dtype=cfg.scale_dtype,
        **grid,
    )


@technique("quant.rtn", WeightQuantConfig)
def apply_rtn(model: nn.Module, cfg: WeightQuantConfig, ctx: Context) -> nn.Module:
    """Round weights to the nearest point of a min-max affine grid (weight-only)."""
    selected = select_weighted(model, cfg, owner="quant.rtn", supported=QUANTIZABLE)
    check_unquantized(selected, "quant.rtn")
    for _, module in selected:
        add_parametrization(module, "weight", weight_quantizer(effective_tensor(module), cfg))
    ctx.report("bits", {n: cfg.bits for n, _ in selected})
    return model
