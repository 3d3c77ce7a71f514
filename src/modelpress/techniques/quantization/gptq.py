"""``quant.gptq``: weight quantization with second-order error compensation (Frantar et al.
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Per layer, with ``H = 2/N X X^T`` of its calibration inputs (:mod:`modelpress.layerwise`,
block by block) and ``U`` the upper Cholesky factor of ``(H + lambda I)^-1``, the columns are
quantized one at a time; the error of column ``j``, scaled by ``1 / U_jj``, is pushed onto the
not yet quantized columns along row ``j`` of ``U`` (the OBS update), within blocks of
``blocksize`` columns and lazily for the columns after the block. With groups, each group's
scale and zero point are fitted when the walk reaches it, from its weights as the errors before
it left them ("dynamic groups"; ``static_groups`` fixes them from the original weight instead).
``act_order`` visits the columns by decreasing ``H_jj``; with dynamic groups it keeps each group
together (groups by their largest ``H_jj``, then the columns inside), so groups stay contiguous
and the artifact stores the codes exactly as ``quant.rtn`` does. ``clip`` picks each range by the
output-error search of :mod:`~modelpress.techniques.quantization.clip_search`. Weights an earlier
stage pruned stay zero: their error is compensated like any other's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from modelpress.context import Context
from modelpress.layerwise import (
    LAYERWISE,
    Hessian,
    LayerwiseInputsConfig,
    calibrate_layerwise,
    check_supported,
    drop_dead_inputs,
    hessian_errors,
    input_width,
    inverse_hessian_factor,
    layer_target,
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
from modelpress.techniques.quantization.fake_quant import check_unquantized
from modelpress.techniques.quantization.rtn import WeightQuantConfig, weight_quantizer

OWNER = "quant.gptq"


class GPTQConfig(WeightQuantConfig, LayerwiseInputsConfig):
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
    clip: bool = Field(
        False,
        description="Before the walk, shrink each group's range to the factor with the smallest "
        "output error d^T H d (AWQ's auto-clip search) instead of min-max.",
    )
    static_groups: bool = Field(
        False,
        description="Fix every group's grid from the original weight before the walk, instead "
        "of fitting it when the walk reaches the group (act-order then visits all columns by "
        "H_jj rather than whole groups by their largest H_jj).",
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


@dataclass(frozen=True)
class GroupFit:
    """Dynamic groups: a group's scale and zero point fitted when the walk reaches it, from its
    weights *after* the errors of the columns before it were pushed onto them, so compensated
    weights are not clamped by a range they outgrew (the reference GPTQ's default).

    ``width`` is the group size along the columns; ``cfg`` gives the grid and the clip search.
    """

    width: int
    cfg: GPTQConfig

    def __call__(self, values: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(rows,)`` scale and zero point of ``values`` ``(rows, n)``, the group's current
        weights; ``hessian`` ``(n, n)`` is its block of ``H`` (for the clip search)."""
        cfg, ratio = self.cfg, None
        if cfg.clip:
            layout = make_layout(tuple(values.shape), "channel", None)
            ratio = search_clip(values, hessian, None, layout, cfg, cfg.n_grid, cfg.max_shrink)
        return compute_qparams(values, cfg.bits, cfg.symmetric, cfg.scale_dtype, ratio)


def walk_order(diag: torch.Tensor, width: int, act_order: bool) -> tuple[torch.Tensor, list[int]]:
    """The order GPTQ visits the columns in, as runs that stay together.

    Args:
        diag: ``(cols,)`` ``H_jj``.
        width: columns per run (a quantization group; 1 for single columns).
        act_order: runs by decreasing largest ``H_jj``, columns inside a run by decreasing
            ``H_jj``. With ``width`` 1 this is GPTQ's act-order; with groups it keeps every
            group contiguous, so its grid can be fitted when the walk reaches it.

    Returns:
        ``(order, lengths)``: the column permutation and the length of each run in it.
    """
    cols = len(diag)
    runs = [torch.arange(a, min(a + width, cols)) for a in range(0, cols, width)]
    if act_order:
        runs = [r[torch.argsort(diag[r], descending=True, stable=True)] for r in runs]
        peak = torch.stack([diag[r].max() for r in runs])
        runs = [runs[i] for i in torch.argsort(peak, descending=True, stable=True).tolist()]
    return torch.cat(runs), [len(r) for r in runs]


def pack_blocks(lengths: list[int], blocksize: int) -> list[tuple[int, int]]:
    """Consecutive runs packed into blocks of at most ``blocksize`` columns (a longer run is a
    block of its own): ``(start, stop)`` column ranges of the walk."""
    bounds, a, b = [], 0, 0
    for n in lengths:
        if b > a and b + n - a > blocksize:
            bounds.append((a, b))
            a = b
        b += n
    return [*bounds, (a, b)]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    grid: tuple[torch.Tensor, torch.Tensor] | GroupFit,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    pruned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one layer: the quantized (dequantized, on-grid) weights and their grid.

    Args:
        weight: ``(rows, cols)``.
        hessian: ``(cols, cols)`` ``H = 2/N X X^T``.
        bits: code width.
        grid: the ``(rows, cols)`` scale and zero point of every weight, fixed before the walk
            (see :func:`column_grid`), or a :class:`GroupFit` that fits each group when the
            walk reaches it.
        blocksize: columns per block.
        percdamp: dampening as a fraction of the mean diagonal of ``H``.
        act_order: visit columns by decreasing ``H_jj`` (dynamic groups: groups by their
            largest ``H_jj``, then the columns inside; see :func:`walk_order`).
        pruned: ``(rows, cols)`` bool, weights that must stay zero.

    Returns:
        ``(weight, scale, zero)``, each ``(rows, cols)``.

    Raises:
        torch.linalg.LinAlgError: the dampened ``H`` is not positive definite.
    """
    w, h = drop_dead_inputs(weight, hessian)
    keep = torch.ones_like(w, dtype=torch.bool) if pruned is None else ~pruned
    fit = grid if isinstance(grid, GroupFit) else None
    order, lengths = walk_order(h.diagonal(), 1 if fit is None else fit.width, act_order)
    w, h, keep = w[:, order], h[order][:, order], keep[:, order]
    if fit is None:
        scale, zero = grid[0][:, order].clone(), grid[1][:, order].clone()
    else:
        scale, zero = torch.empty_like(w), torch.empty_like(w)
    starts = dict(zip(torch.tensor([0, *lengths]).cumsum(0).tolist(), lengths, strict=False))
    factor = inverse_hessian_factor(h, percdamp)  # (cols, cols) upper
    out = torch.zeros_like(w)
    for a, b in pack_blocks(lengths, blocksize):
        block, errors = w[:, a:b].clone(), torch.zeros(w.shape[0], b - a)
        for j in range(b - a):  # every step is vectorised over rows
            p = a + j
            if fit is not None and p in starts:  # a group begins: fit its grid now
                n = starts[p]
                s, z = fit(block[:, j : j + n] * keep[:, p : p + n], h[p : p + n, p : p + n])
                scale[:, p : p + n], zero[:, p : p + n] = s[:, None], z[:, None]
            col, s, z = block[:, j], scale[:, p], zero[:, p]
            q = (torch.clamp(torch.round(col / s) + z, 0, qmax(bits)) - z) * s
            q = q * keep[:, p]
            out[:, p] = q
            errors[:, j] = (col - q) / factor[p, p]
            block[:, j:] -= errors[:, j : j + 1] * factor[p : p + 1, a:b][:, j:]
        w[:, b:] -= errors @ factor[a:b, b:]
    back = torch.argsort(order)
    return out[:, back], scale[:, back], zero[:, back]


class GPTQQuantizer:
    """The layer callback: ``H`` in; GPTQ-quantized weights and their fake quantizer out."""

    def __init__(self, cfg: GPTQConfig) -> None:
        self.cfg = cfg

    def stats(self, name: str, module: nn.Module) -> Hessian:
        """A fresh ``H`` over the layer's input columns."""
        return Hessian(input_width(module), cross=self.cfg.asymmetric)

    def grid(
        self, weight: torch.Tensor, hessian: torch.Tensor, layout: GroupLayout
    ) -> tuple[torch.Tensor, torch.Tensor] | GroupFit:
        """The walk's grid: a :class:`GroupFit` for dynamic groups, else every weight's scale
        and zero point from the original ``weight`` ``(rows, cols)`` (min-max, or the clip
        search's ranges)."""
        cfg = self.cfg
        if layout.granularity == "group" and not cfg.static_groups:
            return GroupFit(layout.width, cfg)
        ratio = None
        if cfg.clip:
            ratio = search_clip(weight, hessian, None, layout, cfg, cfg.n_grid, cfg.max_shrink)
        groups = layout.to_groups(weight)
        scale, zero = compute_qparams(groups, cfg.bits, cfg.symmetric, cfg.scale_dtype, ratio)
        return column_grid(layout, scale, zero)

    def process(self, name: str, module: nn.Module, stats: Hessian) -> None:
        """Quantize the weight with GPTQ, put the quantizer with the walk's grid on.

        Raises:
            DataError: ``H`` is not positive definite even after dampening.
        """
        cfg = self.cfg
        weight = effective_tensor(module)
        w2 = layer_target(name, weight, stats, cfg.percdamp)
        layout = make_layout(tuple(w2.shape), cfg.granularity, cfg.group_size)
        mask = find_parametrization(module, "weight", Mask)
        pruned = None if mask is None else ~mask.mask.flatten(1)
        with hessian_errors(name):
            new, scale, zero = gptq_quantize(
                w2,
                stats.matrix,
                cfg.bits,
                self.grid(w2, stats.matrix, layout),
                blocksize=cfg.blocksize,
                percdamp=cfg.percdamp,
                act_order=cfg.act_order,
                pruned=pruned,
            )
        first = slice(None, None, layout.width)  # one column per group
        quantizer = weight_quantizer(
            weight,
            cfg,
            scale=scale[: layout.rows, first].reshape(-1),
            zero_point=zero[: layout.rows, first].reshape(-1),
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
        model,
        batches,
        selected,
        GPTQQuantizer(cfg),
        owner=OWNER,
        sequential=cfg.sequential,
        asymmetric=cfg.asymmetric,
    )
    ctx.report("bits", {n: cfg.bits for n, _ in selected})
    return model
