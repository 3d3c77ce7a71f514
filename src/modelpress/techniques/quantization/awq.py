"""``quant.awq``: activation-aware weight quantization (Lin et al. 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest, and the error of the
weights they multiply matters most. AWQ scales those weights up before quantizing, so they
get a relatively finer grid, and divides the scale back out:

    W_eff = Q(W diag(s)) diag(s)^-1,    s = mean|x|^alpha / sqrt(max(.) min(.)),

with ``mean|x|`` the mean absolute value of each input channel over the calibration tokens
and ``alpha`` picked from the grid ``{0, 1/n, ..., (n-1)/n}`` by the smallest output error
``||X W^T - X W_eff^T||^2 = tr(D H D^T)``, ``D = W - W_eff``, ``H = X^T X`` (the layer's
calibration Hessian, so every token counts, not a subsample). ``alpha = 0`` is plain RTN, so
the chosen grid is never worse than RTN on the calibration data. Optionally (``clip``) each
group's range is then shrunk by the factor ``r`` in ``{1, 1 - 1/n, ...}`` (down to
``1 - max_shrink``) that minimises that group's own output error ``d_g^T H_gg d_g`` (AWQ's
clipping search; cross-group terms of ``H`` are left out, as in the paper).

Differences from the paper: each Linear gets its own ``s``, kept explicit in the quantizer as
``in_scale`` (:class:`~.fake_quant.AffineFakeQuant`) instead of being folded into the
preceding LayerNorm or Linear (which needs the graph, and is shared by q/k/v); the runtime
divides the input by ``in_scale`` before the integer matmul. Linear layers only. Calibration
runs block by block (:mod:`modelpress.layerwise`), so each block sees the already quantized
blocks before it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from modelpress.context import Context
from modelpress.layerwise import Hessian, calibrate_layerwise, check_supported
from modelpress.parametrizations import add_parametrization, effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.quantization.affine import (
    GroupLayout,
    compute_qparams,
    make_layout,
    scale_columns,
)
from modelpress.techniques.quantization.clip_search import grid_weight, output_error, search_clip
from modelpress.techniques.quantization.fake_quant import check_unquantized
from modelpress.techniques.quantization.rtn import WeightQuantConfig, weight_quantizer

OWNER = "quant.awq"
_FLOOR = 1e-4  # mean|x| below this fraction of the largest is raised to it (dead inputs)


class AWQConfig(WeightQuantConfig):
    """AWQ: per-input-channel weight scales searched on activations, then a group-wise grid."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Modules to quantize (Linear only): exact names, type names or 're:' regexes.",
    )
    bits: int = Field(4, ge=2, le=8, description="Bits per weight.")
    granularity: Literal["tensor", "channel", "group"] = Field(
        "group", description="One scale per tensor, per output channel, or per group."
    )
    group_size: int | None = Field(
        128, ge=1, description="Inputs per group (setting it implies granularity 'group')."
    )
    n_samples: int = Field(128, ge=1, description="Calibration samples.")
    batch_size: int = Field(16, ge=1, description="Calibration samples per forward pass.")
    n_grid: int = Field(20, ge=1, le=200, description="Grid points for alpha in [0, 1).")
    clip: bool = Field(True, description="Also search a per-group range shrink (auto-clip).")
    max_shrink: float = Field(
        0.5, ge=0, lt=1, description="Largest fraction the clipping search cuts off a range."
    )


class ActivationStats:
    """``H = 2/N X^T X`` and the mean absolute value of each input column."""

    def __init__(self, columns: int) -> None:
        self.hessian = Hessian(columns)
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)

    def update(self, columns: torch.Tensor) -> None:
        """Add a batch of input rows ``(rows, columns)``."""
        self.hessian.update(columns)
        self.abs_sum += columns.abs().double().sum(0)

    @property
    def abs_mean(self) -> torch.Tensor:
        """``(columns,)`` float32 mean ``|x_j|``."""
        return (self.abs_sum / max(self.hessian.rows, 1)).float()


def awq_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's input-channel scales ``s = m^alpha / sqrt(max(m^alpha) min(m^alpha))``.

    Args:
        abs_mean: ``(cols,)`` mean ``|x_j|``; values below ``1e-4`` of the largest (inputs
            that never fire) are raised to that floor.
        alpha: the exponent, in ``[0, 1)``; 0 gives all ones.

    Returns:
        ``(cols,)`` positive scales, rounded to fp16 (their storage dtype).
    """
    top = abs_mean.max()
    if not top > 0:
        return torch.ones_like(abs_mean)
    s = abs_mean.clamp(min=_FLOOR * float(top)).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.half().float()


def search_scale(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    abs_mean: torch.Tensor,
    layout: GroupLayout,
    cfg: AWQConfig,
) -> tuple[torch.Tensor, float]:
    """AWQ's scale search: the ``alpha`` in ``{0, 1/n, ..., (n-1)/n}`` whose scales give the
    smallest output error ``tr(D H D^T)``.

    Args:
        weight: ``(rows, cols)``; ``hessian``: ``(cols, cols)`` ``H``.
        abs_mean: ``(cols,)`` mean ``|x_j|`` of the inputs.
        layout: the group layout of ``weight``.
        cfg: the grid and ``n_grid``.

    Returns:
        ``(in_scale, alpha)``: the chosen ``(cols,)`` scales and exponent.
    """
    best = (torch.ones_like(abs_mean), 0.0, float("inf"))
    for i in range(cfg.n_grid):  # grid points, not weights: each step is vectorised
        alpha = i / cfg.n_grid
        s = awq_scales(abs_mean, alpha)
        err = output_error(weight - grid_weight(weight, layout, cfg, s), hessian)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1]


class AWQQuantizer:
    """The layer callback: activation statistics in; scaled, clipped grid out."""

    def __init__(self, cfg: AWQConfig) -> None:
        self.cfg = cfg
        self.alphas: dict[str, float] = {}

    def stats(self, name: str, module: nn.Module) -> ActivationStats:
        """Fresh statistics over the layer's input columns."""
        return ActivationStats(module.weight.shape[1])

    def process(self, name: str, module: nn.Module, stats: ActivationStats) -> None:
        """Search ``alpha`` (and the clipping), then put the quantizer with ``in_scale`` on."""
        cfg = self.cfg
        weight = effective_tensor(module).float()  # (out, in), masks applied
        layout = make_layout(tuple(weight.shape), cfg.granularity, cfg.group_size)
        h = stats.hessian.matrix
        in_scale, self.alphas[name] = search_scale(weight, h, stats.abs_mean, layout, cfg)
        ratio = (
            search_clip(weight, h, in_scale, layout, cfg, cfg.n_grid, cfg.max_shrink)
            if cfg.clip
            else None
        )
        scaled = layout.to_groups(scale_columns(weight, in_scale))
        scale, zero = compute_qparams(scaled, cfg.bits, cfg.symmetric, cfg.scale_dtype, ratio)
        quantizer = weight_quantizer(weight, cfg, in_scale=in_scale, scale=scale, zero_point=zero)
        add_parametrization(module, "weight", quantizer)


@technique(OWNER, AWQConfig, needs=("calibration",))
def apply_awq(model: nn.Module, cfg: AWQConfig, ctx: Context) -> nn.Module:
    """Quantize Linear weights with activation-aware per-channel scales (AWQ)."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=(nn.Linear,))
    check_supported(selected, OWNER)
    check_unquantized(selected, OWNER)
    batches = list(ctx.calibration_batches(cfg.n_samples, cfg.batch_size))
    callback = AWQQuantizer(cfg)
    calibrate_layerwise(model, batches, selected, callback, owner=OWNER)
    ctx.report("bits", {n: cfg.bits for n, _ in selected})
    ctx.report("alpha", callback.alphas)
    return model
