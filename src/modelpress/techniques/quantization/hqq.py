"""``quant.hqq``: half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic
Quantization of Large Machine Learning Models"), weight-only and data-free.

Per group, the scale stays the min-max one, ``s = (max W - min W) / (2^b - 1)``, and the
zero point ``z`` becomes a real number fitted to the weights with a sparsity-promoting
``l_p`` loss (``p < 1``), so a few outlying weights do not pull the whole grid:

    min_z  ||W - s (Q_z(W) - z)||_p^p,      Q_z(W) = clamp(round(W / s + z), 0, 2^b - 1).

Half-quadratic splitting adds ``W_e`` (the error) and alternates two closed-form steps, with
``beta`` growing by ``kappa`` each iteration:

    W_e <- shrink_p(W - s (Q_z(W) - z), beta),
           shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)  (generalised soft-threshold)
    z   <- mean_group(Q_z(W) - (W - W_e) / s).

All groups of a layer are solved at once (tensors ``(groups, width)``). The solver starts
from the rounded zero point ``round(-min / s)`` (``round_zero``, as the authors' code does at
4 bits; for a group whose range holds 0 that is exactly RTN's grid), each group keeps the
zero point with the smallest mean absolute error seen (evaluated at its fp16 storage value),
so no group ends worse than its start by that measure, and the loop stops early when the
layer's mean error stops dropping. The zero points are stored as fp16
(:class:`~.fake_quant.AffineFakeQuant` with ``zero_dtype="float16"``).

Because ``z`` is real, 0.0 is not on the grid: a pruned weight would not stay zero, so
weights with a pruning mask are refused. A group whose range lies far from zero (``|z|`` over
``2 (2^b - 1)``, e.g. a constant group) uses the range widened to hold 0 instead, so ``z``
stays small and exact enough in fp16.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.context import Context
from modelpress.errors import UnsupportedModuleError
from modelpress.parametrizations import add_parametrization, effective_tensor, find_parametrization
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.quantization.affine import _DTYPES, make_layout, qmax
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized
from modelpress.techniques.quantization.rtn import QUANTIZABLE, WeightQuantConfig

OWNER = "quant.hqq"


class HQQConfig(WeightQuantConfig):
    """HQQ: min-max scales and real-valued zero points fitted by a half-quadratic solver."""

    bits: int = Field(4, ge=2, le=8, description="Bits per weight.")
    granularity: Literal["tensor", "channel", "group"] = Field(
        "group", description="One scale per tensor, per output channel, or per group."
    )
    group_size: int | None = Field(
        128, ge=1, description="Inputs per group (setting it implies granularity 'group')."
    )
    iterations: int = Field(20, ge=1, le=1000, description="Most half-quadratic iterations.")
    p: float = Field(0.7, gt=0, lt=1, description="Exponent of the l_p error norm (p < 1).")
    beta: float = Field(10.0, gt=0, le=1e6, description="Initial half-quadratic penalty beta.")
    kappa: float = Field(1.01, ge=1, le=10, description="Factor beta grows by per iteration.")
    round_zero: bool = Field(
        True, description="Start from the rounded (RTN) zero point rather than -min / s."
    )

    @model_validator(mode="after")
    def _asymmetric(self) -> HQQConfig:
        if self.symmetric:
            raise ValueError(
                "quant.hqq fits a real-valued zero point per group, so 'symmetric' must be false"
            )
        return self


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-thresholding operator of the ``l_p`` norm (HQQ eq. 6):
    ``sign(x) relu(|x| - |x|^(p-1) / beta)``; 0 stays 0.

    Only ``|x| > beta^(-1 / (2 - p))`` survive the threshold, so the (slow) power is taken of
    those alone.
    """
    mag = x.abs()
    keep = mag > beta ** (-1 / (2 - p))
    out = torch.zeros_like(x)
    kept = mag[keep]
    out[keep] = torch.sign(x[keep]) * torch.relu(kept - kept.pow(p - 1) / beta)
    return out


def hqq_init(
    groups: torch.Tensor, valid: torch.Tensor, bits: int, scale_dtype: str = "float16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale (rounded to ``scale_dtype``) and the unrounded zero point ``-min / s`` of
    each group, over the ``valid`` entries (``(G, width)`` bool; padding excluded).

    Returns:
        ``(scale, zero)``, float32 ``(G,)``.
    """
    dtype = _DTYPES[scale_dtype]
    lo = torch.where(valid, groups, torch.inf).amin(1)
    hi = torch.where(valid, groups, -torch.inf).amax(1)
    far = lo.abs() > 2 * (hi - lo)  # |z| = |lo| / s would exceed 2 (2^b - 1)
    lo = torch.where(far, lo.clamp(max=0), lo)
    hi = torch.where(far, hi.clamp(min=0), hi)
    scale = ((hi - lo) / qmax(bits)).clamp(torch.finfo(dtype).tiny, torch.finfo(dtype).max)
    scale = scale.to(dtype).float()
    return scale, -lo / scale


def _reconstruct(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``Q_z(W)`` and the dequantized ``s (Q_z(W) - z)``, both ``(G, width)``."""
    s, z = scale[:, None], zero[:, None]
    codes = torch.clamp(torch.round(groups / s + z), 0, qmax(bits))
    return codes, (codes - z) * s


def hqq_zero(
    groups: torch.Tensor,
    valid: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    *,
    iterations: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> torch.Tensor:
    """HQQ's zero-point solver, for all groups at once (see the module docstring).

    Args:
        groups: ``(G, width)`` weights; ``valid`` ``(G, width)`` marks real entries.
        scale: ``(G,)`` the fixed scales; ``zero``: ``(G,)`` the starting zero points.
        bits: code width.
        iterations, p, beta, kappa: the solver's iteration budget, ``l_p`` exponent, starting
            penalty and its growth factor.

    Returns:
        ``(G,)`` float32 zero points, rounded to fp16, each the best (smallest mean absolute
        reconstruction error) seen by the solver.
    """
    weight = valid.float()  # (G, width): 0 at padding
    count = weight.sum(1).clamp(min=1)
    scaled = groups / scale[:, None]  # W / s
    best_zero = zero.half().float()
    best_err = torch.full_like(zero, torch.inf)
    last = torch.inf
    for step in range(iterations + 1):  # iterations, not weights: every step is vectorised
        zero = zero.half().float()
        codes, w_r = _reconstruct(groups, scale, zero, bits)
        residual = groups - w_r
        err = (residual.abs() * weight).sum(1) / count  # (G,) mean |W - W_r|
        better = err < best_err
        best_zero, best_err = torch.where(better, zero, best_zero), torch.minimum(err, best_err)
        total = float(err.mean())
        if step == iterations or not total < last:  # the error stopped dropping
            break
        last = total
        w_e = shrink_lp(residual, beta, p)
        # z = mean(Q - (W - W_e) / s) over the group's real entries
        zero = ((codes - scaled + w_e / scale[:, None]) * weight).sum(1) / count
        beta *= kappa
    return best_zero


def hqq_quantizer(weight: torch.Tensor, cfg: HQQConfig) -> AffineFakeQuant:
    """An :class:`AffineFakeQuant` with HQQ's grid for ``weight``: min-max scales and zero
    points from :func:`hqq_zero` (fp16, ``zero_dtype="float16"``).

    Args:
        weight: the weight to quantize, any shape (groups run along ``weight.flatten(1)``).
        cfg: the grid and the solver's parameters.
    """
    layout = make_layout(tuple(weight.shape), cfg.granularity, cfg.group_size)
    groups = layout.to_groups(weight.detach().float())
    valid = layout.to_groups(torch.ones_like(weight, dtype=torch.float32)) > 0
    scale, zero = hqq_init(groups, valid, cfg.bits, cfg.scale_dtype)
    zero = torch.round(zero) if cfg.round_zero else zero
    zero = hqq_zero(
        groups,
        valid,
        scale,
        zero,
        cfg.bits,
        iterations=cfg.iterations,
        p=cfg.p,
        beta=cfg.beta,
        kappa=cfg.kappa,
    )
    return AffineFakeQuant(
        weight,
        cfg.bits,
        symmetric=False,
        granularity=cfg.granularity,
        group_size=layout.group_size,
        scale_dtype=cfg.scale_dtype,
        scale=scale,
        zero_point=zero,
        zero_dtype="float16",
    )


def _check_unpruned(selected: list[tuple[str, nn.Module]]) -> None:
    """Raise before any change if a selected weight carries a pruning mask.

    Raises:
        UnsupportedModuleError: names the first such module.
    """
    for name, module in selected:
        if find_parametrization(module, "weight", Mask) is not None:
            raise UnsupportedModuleError(
                f"{name}: pruned by an earlier stage, and {OWNER}'s real-valued zero points "
                "would make its zeros nonzero; use quant.rtn, quant.gptq or quant.awq there, "
                "or add it to 'ignore'."
            )


@technique(OWNER, HQQConfig)
def apply_hqq(model: nn.Module, cfg: HQQConfig, ctx: Context) -> nn.Module:
    """Quantize weights with min-max scales and HQQ-optimised float zero points (no data)."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=QUANTIZABLE)
    check_unquantized(selected, OWNER)
    _check_unpruned(selected)
    for _, module in selected:
        add_parametrization(module, "weight", hqq_quantizer(effective_tensor(module), cfg))
    ctx.report("bits", {n: cfg.bits for n, _ in selected})
    return model
