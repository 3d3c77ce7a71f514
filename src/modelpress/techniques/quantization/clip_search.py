"""Output-error-weighted grid search shared by AWQ and GPTQ: the squared output error of a
weight change, ``tr(D H D^T)`` with ``H = 2/N X^T X``, per layer and per quantization group,
and the per-group range shrink (AWQ's auto-clip, Lin et al. 2023) that minimises it.
"""

from __future__ import annotations

import torch

from modelpress.techniques.quantization.affine import (
    GroupLayout,
    compute_qparams,
    fake_quantize,
    scale_columns,
    unscale_columns,
)
from modelpress.techniques.quantization.rtn import WeightQuantConfig

__all__ = ["grid_weight", "group_errors", "output_error", "search_clip"]


def grid_weight(
    weight: torch.Tensor,
    layout: GroupLayout,
    cfg: WeightQuantConfig,
    in_scale: torch.Tensor | None = None,
    clip_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` with the min-max grid of ``W diag(s)``: what an
    :class:`AffineFakeQuant` with the same grid computes.

    Args:
        weight: ``(rows, cols)``.
        layout: the group layout of ``weight``.
        cfg: the grid (``bits``, ``symmetric``, ``scale_dtype``).
        in_scale: ``(cols,)`` AWQ scales ``s``, or None for plain RTN.
        clip_ratio: ``(num_groups,)`` range factors (see :func:`compute_qparams`), or None.

    Returns:
        The effective (dequantized, unscaled) weight, ``(rows, cols)``.
    """
    w = weight if in_scale is None else scale_columns(weight, in_scale)
    scale, zero = compute_qparams(
        layout.to_groups(w), cfg.bits, cfg.symmetric, cfg.scale_dtype, clip_ratio
    )
    q = fake_quantize(w, layout, scale, zero, cfg.bits)
    return q if in_scale is None else unscale_columns(q, in_scale)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)``: the squared output error ``||X D^T||^2`` (times ``H``'s ``2/N``).

    Args:
        delta: ``(rows, cols)`` weight change ``D``.
        hessian: ``(cols, cols)`` ``H = 2/N X^T X``.
    """
    return float(((delta @ hessian) * delta).sum())


def group_errors(delta: torch.Tensor, hessian: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``d_g^T H_gg d_g`` for every group ``g`` of ``layout``: the output error each group's
    weights cause on their own (``H_gg`` the diagonal block of its input columns).

    Args:
        delta: ``(rows, cols)`` weight change.
        hessian: ``(cols, cols)`` ``H``.
        layout: the group layout of ``delta`` (per tensor: one group, the whole error).

    Returns:
        ``(num_groups,)`` float32.
    """
    if layout.granularity == "tensor":
        return torch.tensor([output_error(delta, hessian)])
    gpr, width = layout.groups_per_row, layout.width
    pad = gpr * width - hessian.shape[0]
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad))
    blocks = h.reshape(gpr, width, gpr, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    d = layout.to_groups(delta).reshape(-1, gpr, width)  # (rows, gpr, width)
    return torch.einsum("rgi,gij,rgj->rg", d, blocks, d).reshape(-1)


def search_clip(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    in_scale: torch.Tensor,
    layout: GroupLayout,
    cfg: WeightQuantConfig,
    n_grid: int,
    max_shrink: float,
) -> torch.Tensor:
    """AWQ's clipping search: per group, the range factor ``r = 1 - i/n`` (``i/n <=
    max_shrink``) with the smallest group output error ``d_g^T H_gg d_g``.

    Args:
        weight: ``(rows, cols)``; ``hessian``: ``(cols, cols)`` ``H``.
        in_scale: ``(cols,)`` the scales chosen by :func:`search_scale`.
        layout: the group layout of ``weight``.
        cfg: the grid, ``n_grid`` and ``max_shrink``.

    Returns:
        ``(num_groups,)`` factors in ``(0, 1]`` (1 where no shrink helps).
    """
    ratios = [1 - i / n_grid for i in range(n_grid) if i / n_grid <= max_shrink]
    errors = []
    for r in ratios:  # shrink factors, not weights: each step is vectorised over groups
        clip = torch.full((layout.num_groups,), r)
        delta = weight - grid_weight(weight, layout, cfg, in_scale, clip)
        errors.append(group_errors(delta, hessian, layout))
    best = torch.stack(errors).argmin(0)  # (num_groups,) index into ratios
    return torch.tensor(ratios)[best]
