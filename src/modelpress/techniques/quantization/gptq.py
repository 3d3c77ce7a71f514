"""``quant.gptq``: weight quantization with second-order error compensation (Frantar et al.
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Per layer, with ``H = 2/N X X^T`` of its calibration inputs (:mod:`modelpress.layerwise`,
block by block) and ``U`` the upper Cholesky factor of ``(H + lambda I)^-1``, the columns are
quantized one at a time; the error of column ``j``, scaled by ``1 / U_jj``, is pushed onto the
not yet quantized columns along row ``j`` of ``U`` (the OBS update), within blocks of
``blocksize`` columns and lazily for the columns after the block. ``act_order`` visits the
columns by decreasing ``H_jj``. The grid (scale and zero point of every group) is fixed from
the original weight before the walk ("static groups"), so act-order and groups combine and the
artifact stores the codes exactly as ``quant.rtn`` does. Weights an earlier stage pruned stay
zero: their error is compensated like any other's.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from modelpress.context import Context
from modelpress.layerwise import (
    LAYERWISE,
    Hessian,
    calibrate_layerwise,
    check_supported,
    drop_dead_inputs,
    hessian_errors,
    input_width,
    inverse_hessian_factor,
    set_weight,
)
from modelpress.parametrizations import add_parametrization, effective_tensor, find_parametrization
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.quantization.affine import (
    GroupLayout,
    compute_qparams,
    make_layout,
    qmax,
)
from modelpress.techniques.quantization.clip_search import search_clip
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized
from modelpress.techniques.quantization.rtn import WeightQuantConfig

OWNER = "quant.gptq"


class GPTQConfig(WeightQuantConfig):
    """GPTQ: quantize column by column, compensating each error with the inverse Hessian."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d"],
        description="Modules to quantize: exact names, type names or 're:' regexes.",
    )
    n_samples: int = Field(128, ge=1, description="Calibration samples.")
    batch_size: int = Field(16, ge=1, description="Calibration samples per forward pass.")
    blocksize: int = Field(128, ge=1, description="Columns per block (lazy batch updates).")
    percdamp: float = Field(
        0.01, gt=0, le=1, description="Dampening lambda as a fraction of the mean diagonal of H."
    )
    act_order: bool = Field(False, description="Quantize columns by decreasing H_jj.")
    sequential: bool = Field(
        False,
        description="Inside each block, collect a layer's Hessian after the layers before it "
        "are quantized (one calibration pass per layer; GPTQ's 'true sequential').",
    )
    clip: bool = Field(
        False,
        description="Before the walk, shrink each group's range to the factor with the smallest "
        "output error d^T H d (AWQ's auto-clip search) instead of min-max.",
    )
    n_grid: int = Field(20, ge=1, le=200, description="Shrink factors tried by the clip search.")
    max_shrink: float = Field(
        0.5, ge=0, lt=1, description="Largest fraction the clip search cuts off a range."
    )


def column_grid(
    layout: GroupLayout, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight, as ``(rows, cols)`` of ``weight.flatten(1)``."""

    def spread(per_group: torch.Tensor) -> torch.Tensor:
        full = layout.from_groups(per_group[:, None].expand(-1, layout.width))
        return full.reshape(layout.shape[0], -1)

    return spread(scale), spread(zero)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ on one layer: the quantized (dequantized, on-grid) weights.

    Args:
        weight: ``(rows, cols)``.
        hessian: ``(cols, cols)`` ``H = 2/N X X^T``.
        scale, zero: ``(rows, cols)`` the grid of each weight (see :func:`column_grid`).
        bits: code width.
        blocksize: columns per block.
        percdamp: dampening as a fraction of the mean diagonal of ``H``.
        act_order: visit columns by decreasing ``H_jj``.
        pruned: ``(rows, cols)`` bool, weights that must stay zero.

    Raises:
        torch.linalg.LinAlgError: the dampened ``H`` is not positive definite.
    """
    w, h = drop_dead_inputs(weight, hessian)
    keep = torch.ones_like(w, dtype=torch.bool) if pruned is None else ~pruned
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(len(h))
    w, h, keep = w[:, order], h[order][:, order], keep[:, order]
    scale, zero = scale[:, order], zero[:, order]
    factor = inverse_hessian_factor(h, percdamp)  # (cols, cols) upper
    out = torch.zeros_like(w)
    cols = w.shape[1]
    for a in range(0, cols, blocksize):
        b = min(a + blocksize, cols)
        block, errors = w[:, a:b].clone(), torch.zeros(w.shape[0], b - a)
        for j in range(b - a):  # every step is vectorised over rows
            col, s, z = block[:, j], scale[:, a + j], zero[:, a + j]
            q = (torch.clamp(torch.round(col / s) + z, 0, qmax(bits)) - z) * s
            q = q * keep[:, a + j]
            out[:, a + j] = q
            errors[:, j] = (col - q) / factor[a + j, a + j]
            block[:, j:] -= errors[:, j : j + 1] * factor[a + j : a + j + 1, a:b][:, j:]
        w[:, b:] -= errors @ factor[a:b, b:]
    return out[:, torch.argsort(order)]


class GPTQQuantizer:
    """The layer callback: ``H`` in; GPTQ-quantized weights and their fake quantizer out."""

    def __init__(self, cfg: GPTQConfig) -> None:
        self.cfg = cfg

    def stats(self, name: str, module: nn.Module) -> Hessian:
        """A fresh ``H`` over the layer's input columns."""
        return Hessian(input_width(module))

    def process(self, name: str, module: nn.Module, stats: Hessian) -> None:
        """Fix the grid from the weight, quantize it with GPTQ, put the quantizer on.

        Raises:
            DataError: ``H`` is not positive definite even after dampening.
        """
        cfg = self.cfg
        weight = effective_tensor(module)
        grid: dict[str, torch.Tensor] = {}
        if cfg.clip:  # the grid of the searched ranges; min-max otherwise
            w2 = weight.detach().float().flatten(1)
            layout = make_layout(tuple(w2.shape), cfg.granularity, cfg.group_size)
            ratio = search_clip(w2, stats.matrix, None, layout, cfg, cfg.n_grid, cfg.max_shrink)
            groups = layout.to_groups(w2)
            scale, zero = compute_qparams(groups, cfg.bits, cfg.symmetric, cfg.scale_dtype, ratio)
            grid = {"scale": scale, "zero_point": zero}
        quantizer = AffineFakeQuant(
            weight,
            cfg.bits,
            symmetric=cfg.symmetric,
            granularity=cfg.granularity,
            group_size=cfg.group_size,
            scale_dtype=cfg.scale_dtype,
            **grid,
        )
        scale, zero = column_grid(quantizer.layout, quantizer.scale, quantizer.zero_point)
        mask = find_parametrization(module, "weight", Mask)
        pruned = None if mask is None else ~mask.mask.flatten(1)
        with hessian_errors(name):
            new = gptq_quantize(
                weight.flatten(1),
                stats.matrix,
                scale,
                zero,
                cfg.bits,
                blocksize=cfg.blocksize,
                percdamp=cfg.percdamp,
                act_order=cfg.act_order,
                pruned=pruned,
            )
        set_weight(module, new.reshape(weight.shape))
        add_parametrization(module, "weight", quantizer)


@technique(OWNER, GPTQConfig, needs=("calibration",))
def apply_gptq(model: nn.Module, cfg: GPTQConfig, ctx: Context) -> nn.Module:
    """Quantize weights column by column with Hessian error compensation (GPTQ)."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=LAYERWISE)
    check_supported(selected, OWNER)
    check_unquantized(selected, OWNER)
    batches = list(ctx.calibration_batches(cfg.n_samples, cfg.batch_size))
    calibrate_layerwise(
        model, batches, selected, GPTQQuantizer(cfg), owner=OWNER, sequential=cfg.sequential
    )
    ctx.report("bits", {n: cfg.bits for n, _ in selected})
    return model
