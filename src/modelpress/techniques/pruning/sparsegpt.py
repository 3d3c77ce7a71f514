"""``prune.sparsegpt``: one-shot pruning with weight reconstruction (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

For each layer, with ``H = 2/N X X^T`` of its calibration inputs, SparseGPT prunes to
minimise ``||W X - W' X||^2``. ``H`` is dampened to ``H + lambda I`` (``lambda = percdamp *
mean diag H``) and ``U``, the upper Cholesky factor of ``H^-1``, gives the Optimal Brain
Surgeon quantities of the columns still to be processed: ``U_jj^2`` is ``[H_F^-1]_jj`` once
the columns before ``j`` are fixed. Columns are processed in blocks of ``blocksize``:

1. adaptive mask selection: in each block, prune the weights of lowest ``w^2 / U_jj^2``
   (per row; with ``n``/``m``, the ``m - n`` lowest of each group of ``m`` columns, chosen
   when the group is reached);
2. column by column, zero the pruned weights of column ``j`` and spread the error
   ``e = (w_j - w'_j) / U_jj`` over the later columns of the block: ``W_{:, j:} -= e U_{j, j:}``;
3. lazy batch update: the block's errors update all later columns at once,
   ``W_{:, end:} -= E U_{block, end:}``.

Inputs that are always zero (``diag H == 0``) get ``H_jj = 1`` and a zero weight column. The
updated weights are written under any existing parametrizations and the mask is put on as a
parametrization, so the zeros stay zero through fine-tuning; weights an earlier stage pruned
stay pruned.

``sequential`` and ``asymmetric`` choose the inputs as for ``quant.gptq``: with
``asymmetric``, each layer is pruned from ``W* = W + W (C - H)(H + lambda I)^-1`` (see
:func:`modelpress.layerwise.asymmetric_target`), so its pruned output on the pruned model's
inputs tracks the dense model's output on the dense inputs (GPTAQ, Li et al. 2025, applies the
same correction to SparseGPT).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.context import Context
from modelpress.layerwise import (
    Hessian,
    LayerwiseInputsConfig,
    calibrate_layerwise,
    drop_dead_inputs,
    hessian_errors,
    input_width,
    inverse_hessian_factor,
    layer_target,
    set_weight,
)
from modelpress.parametrizations import effective_tensor, find_parametrization
from modelpress.registry import technique
from modelpress.techniques.pruning.calibrated import (
    CalibratedPruningConfig,
    prune_lowest_per_row,
    report_sparsity,
    select_calibrated,
)
from modelpress.techniques.pruning.mask import Mask, set_mask
from modelpress.techniques.pruning.nm import nm_mask


class SparseGPTConfig(CalibratedPruningConfig, LayerwiseInputsConfig):
    """SparseGPT: prune with OBS weight reconstruction from calibration inputs."""

    blocksize: int = Field(128, ge=1, description="Columns pruned per block (lazy updates).")
    percdamp: float = Field(
        0.01, gt=0, le=1, description="Dampening lambda as a fraction of the mean diagonal of H."
    )

    @model_validator(mode="after")
    def _blocks_hold_groups(self) -> SparseGPTConfig:
        if self.m is not None and self.blocksize % self.m:
            raise ValueError(f"'blocksize' ({self.blocksize}) must be a multiple of 'm' ({self.m})")
        return self


def _block_mask(
    block: torch.Tensor, diag: torch.Tensor, prior: torch.Tensor, k: int
) -> torch.Tensor:
    """Unstructured adaptive mask: the ``k`` lowest ``w^2 / U_jj^2`` of each row, and the
    weights pruned before."""
    saliency = (block.square() / diag.square()).masked_fill(prior, -1.0)
    return prune_lowest_per_row(saliency, k) | prior


def _group_mask(
    group: torch.Tensor, diag: torch.Tensor, prior: torch.Tensor, nm: tuple[int, int]
) -> torch.Tensor:
    """N:M mask of one group of ``m`` columns: all but the ``n`` highest ``w^2 / U_jj^2``."""
    saliency = (group.square() / diag.square()).masked_fill(prior, -1.0)
    return ~nm_mask(saliency, *nm) | prior


def _prune_block(
    block: torch.Tensor,
    factor: torch.Tensor,
    pruned: torch.Tensor,
    prior: torch.Tensor,
    nm: tuple[int, int] | None,
) -> torch.Tensor:
    """Prune one block of columns in place with OBS compensation inside the block.

    Args:
        block: ``(rows, b)`` weights, updated in place to the pruned ones.
        factor: ``(b, b)`` the block's part of ``U``.
        pruned: ``(rows, b)`` bool, the mask (filled group by group for N:M), in place.
        prior: ``(rows, b)`` bool, weights pruned before (kept pruned).
        nm: ``(n, m)`` or None.

    Returns:
        ``(rows, b)`` the scaled errors ``E`` for the lazy update of later columns.
    """
    diag = factor.diagonal()
    errors = torch.zeros_like(block)
    for j in range(block.shape[1]):  # the OBS sequence; every step is vectorised over rows
        if nm is not None and j % nm[1] == 0:
            cols = slice(j, j + nm[1])
            pruned[:, cols] = _group_mask(block[:, cols], diag[cols], prior[:, cols], nm)
        kept = block[:, j].masked_fill(pruned[:, j], 0.0)
        errors[:, j] = (block[:, j] - kept) / diag[j]
        block[:, j + 1 :] -= errors[:, j : j + 1] * factor[j : j + 1, j + 1 :]
        block[:, j] = kept
    return errors


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer (see the module docstring).

    Args:
        weight: ``(rows, cols)`` weights.
        hessian: ``(cols, cols)`` ``H = 2/N X X^T`` of the layer's inputs.
        sparsity: fraction of each row to prune (ignored with ``nm``); each row loses exactly
            ``round(sparsity * cols)`` (block ``[a, b)`` takes ``round(s b) - round(s a)``).
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive columns; ``blocksize`` and
            ``cols`` must be multiples of ``m``.
        blocksize: columns per block.
        percdamp: dampening as a fraction of the mean diagonal of ``H``.
        prior: ``(rows, cols)`` bool, weights already pruned; they stay pruned.

    Returns:
        ``(new_weight, keep)``: the float32 updated weights, zero where pruned, and the
        bool keep mask.

    Raises:
        torch.linalg.LinAlgError: the dampened ``H`` is not positive definite.
    """
    w, h = drop_dead_inputs(weight, hessian)  # (rows, cols), (cols, cols)
    factor = inverse_hessian_factor(h, percdamp)  # (cols, cols) upper
    prior = torch.zeros_like(w, dtype=torch.bool) if prior is None else prior
    pruned = prior.clone()
    cols = w.shape[1]
    for a in range(0, cols, blocksize):
        b = min(a + blocksize, cols)
        if nm is None:
            k = round(sparsity * b) - round(sparsity * a)
            pruned[:, a:b] = _block_mask(w[:, a:b], factor[a:b, a:b].diagonal(), prior[:, a:b], k)
        block = w[:, a:b].clone()
        errors = _prune_block(block, factor[a:b, a:b], pruned[:, a:b], prior[:, a:b], nm)
        w[:, a:b] = block
        w[:, b:] -= errors @ factor[a:b, b:]
    return w, ~pruned


def inputs_last_order(shape: torch.Size) -> torch.Tensor:
    """The column permutation taking ``weight.flatten(1)`` of a ``(out, in, *k)`` weight
    from ``(in, *k)`` order to ``(*k, in)`` order, so that ``m`` consecutive columns are ``m``
    consecutive input channels at one kernel position (N:M groups as ``prune.nm`` makes them).
    Identity for a Linear."""
    channels, positions = shape[1], math.prod(shape[2:])
    return torch.arange(channels * positions).reshape(channels, positions).T.flatten()


class SparseGPTPruner:
    """The layer callback: ``H`` in, pruned and reconstructed weights and a mask out."""

    def __init__(self, cfg: SparseGPTConfig) -> None:
        self.cfg = cfg
        self.masks: dict[str, torch.Tensor] = {}

    def stats(self, name: str, module: nn.Module) -> Hessian:
        """A fresh ``H`` over the layer's input columns (and ``C`` when asymmetric)."""
        return Hessian(input_width(module), cross=self.cfg.asymmetric)

    def process(self, name: str, module: nn.Module, stats: Hessian) -> None:
        """Prune and reconstruct the layer's weight, then put the mask on.

        Raises:
            DataError: ``H`` is not positive definite even after dampening.
        """
        cfg = self.cfg
        weight = effective_tensor(module)  # (out, in, *k)
        w2 = layer_target(name, weight, stats, cfg.percdamp)
        order = inputs_last_order(weight.shape)
        existing = find_parametrization(module, "weight", Mask)
        prior = None if existing is None else ~existing.mask.flatten(1)[:, order]
        with hessian_errors(name):
            new, keep = sparsegpt_prune(
                w2[:, order],
                stats.matrix[order][:, order],
                cfg.sparsity,
                nm=cfg.nm,
                blocksize=cfg.blocksize,
                percdamp=cfg.percdamp,
                prior=prior,
            )
        inverse = torch.argsort(order)  # back to (in, *k) column order
        set_weight(module, new[:, inverse].reshape(weight.shape))
        keep = keep[:, inverse].reshape(weight.shape)
        set_mask(module, "weight", keep)
        self.masks[name] = keep


@technique("prune.sparsegpt", SparseGPTConfig, needs=("calibration",))
def apply_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, ctx: Context) -> nn.Module:
    """Prune per row or N:M and reconstruct the rest from calibration inputs (SparseGPT)."""
    selected, batches = select_calibrated(model, cfg, ctx, "prune.sparsegpt")
    pruner = SparseGPTPruner(cfg)
    calibrate_layerwise(model, batches, selected, pruner, owner="prune.sparsegpt",
                        sequential=cfg.sequential, asymmetric=cfg.asymmetric)  # fmt: skip
    report_sparsity(ctx, pruner.masks)
    return model
