"""``architecture.separable``: k×k convolutions → depthwise k×k + pointwise 1×1 (MobileNet).

Howard et al. 2017 ("MobileNets") factor a standard convolution into a depthwise convolution
(one k×k filter per input channel) and a pointwise 1×1 convolution that mixes channels. With a
depth ``multiplier`` m the depthwise conv has ``C_in · m`` outputs (m filters per input
channel), and the pair computes

    y_o = sum_i sum_j P[o, i·m + j] · (D[i·m + j] ⋆ x_i),

i.e. the standard conv with kernel ``W_hat[o, i] = sum_j P[o, i·m + j] · D[i·m + j]``: for each
input channel ``i`` the ``(C_out, k·k)`` slice ``W[:, i]`` is replaced by a rank-m matrix. The
best such matrix (Eckart–Young) is the truncated SVD ``W[:, i] ≈ U_m S_m V_m^T``, so the pair is
initialised with depthwise filters ``D = V_m^T`` and pointwise weights ``P = U_m S_m``, computed
for all input channels at once by a batched SVD. At ``m = min(C_out, k·k)`` the pair computes
exactly the original convolution; below it, the relative fit error
``||W - W_hat||_F / ||W||_F`` is reported per layer, and the student is meant to be trained
afterwards (``distill.kd`` + ``train``).

Params: ``C_out·C_in·k²`` → ``C_in·m·k² + C_out·C_in·m``; a layer where that is not smaller is
left as it is and reported, as are grouped/depthwise and 1×1 convolutions.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.edits import edit_op, record_edit
from modelpress.errors import UnsupportedModuleError
from modelpress.registry import technique
from modelpress.targeting import select_weighted

OWNER = "architecture.separable"


class SeparableConfig(TargetedConfig):
    """Replace k×k Conv2d by a depthwise k×k + pointwise 1×1 pair fitted by low-rank SVD."""

    targets: list[str] = Field(
        default_factory=lambda: ["Conv2d"],
        description="Modules to act on: exact names, type names (Conv2d) or 're:' regexes.",
    )
    multiplier: int = Field(
        1, ge=1, le=64, description="Depthwise filters per input channel (rank of the fit)."
    )


class DepthwiseSeparable(nn.Module):
    """``pointwise(depthwise(x))``: a depthwise k×k conv (groups ``C_in``) and a 1×1 conv."""

    def __init__(self, conv: nn.Conv2d, multiplier: int) -> None:
        super().__init__()
        c_in, c_out = conv.in_channels, conv.out_channels
        self.depthwise = nn.Conv2d(
            c_in, c_in * multiplier, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=c_in, bias=False, padding_mode=conv.padding_mode,
        )  # fmt: skip
        self.pointwise = nn.Conv2d(c_in * multiplier, c_out, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H', W')``, as the replaced conv."""
        return self.pointwise(self.depthwise(x))  # (B, C_in·m, H', W') → (B, C_out, H', W')


def separable_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise and pointwise weights of the rank-``multiplier`` fit of a conv kernel.

    For every input channel i, ``W[:, i]`` ``(C_out, kh·kw)`` = ``U S V^T`` (batched SVD over i);
    the depthwise filters are the first m rows of ``V^T``, the pointwise weights ``U_m S_m``
    (Howard et al. 2017 structure; Eckart–Young best rank-m fit). Components past
    ``min(C_out, kh·kw)`` are zero.

    Args:
        weight: the kernel ``(C_out, C_in, kh, kw)``.
        multiplier: m, filters per input channel.

    Returns:
        ``depthwise (C_in·m, 1, kh, kw)`` and ``pointwise (C_out, C_in·m, 1, 1)``, in the
        kernel's dtype.
    """
    c_out, c_in, kh, kw = weight.shape
    per_input = weight.detach().double().permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)
    u, s, vh = torch.linalg.svd(per_input, full_matrices=False)  # (C_in, C_out, q), (C_in, q), ...
    r = min(multiplier, s.shape[1])
    depth = torch.zeros(c_in, multiplier, kh * kw, dtype=torch.float64)
    point = torch.zeros(c_in, c_out, multiplier, dtype=torch.float64)
    depth[:, :r] = vh[:, :r]  # (C_in, r, kh·kw)
    point[:, :, :r] = u[:, :, :r] * s[:, None, :r]  # (C_in, C_out, r)
    depthwise = depth.reshape(c_in * multiplier, 1, kh, kw)
    pointwise = point.permute(1, 0, 2).reshape(c_out, c_in * multiplier, 1, 1)
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype)


def fit_error(weight: torch.Tensor, multiplier: int) -> float:
    """Relative error ``||W - W_hat||_F / ||W||_F`` of the rank-``multiplier`` fit, from the
    discarded singular values: ``sqrt(sum_{j>m} s_j^2 / sum_j s_j^2)`` over all input channels."""
    c_out, c_in, kh, kw = weight.shape
    per_input = weight.detach().double().permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)
    energy = torch.linalg.svdvals(per_input).square()  # (C_in, q)
    total = float(energy.sum())
    return (float(energy[:, multiplier:].sum()) / total) ** 0.5 if total > 0 else 0.0


def separable_pair(conv: nn.Conv2d, multiplier: int) -> DepthwiseSeparable:
    """The depthwise-separable pair fitted to ``conv`` (its bias moves to the pointwise conv).

    Args:
        conv: a Conv2d with ``groups == 1``.
        multiplier: depthwise filters per input channel; at ``min(C_out, kh·kw)`` the pair
            computes the same function as ``conv``.

    Returns:
        The pair, on the conv's device, weights from :func:`separable_factors`.
    """
    pair = DepthwiseSeparable(conv, multiplier)
    depthwise, pointwise = separable_factors(conv.weight, multiplier)
    with torch.no_grad():
        pair.depthwise.weight.copy_(depthwise)
        pair.pointwise.weight.copy_(pointwise)
        if conv.bias is not None:
            pair.pointwise.bias.copy_(conv.bias)
    return pair.to(conv.weight.device)


def separable_cost(
    c_in: int, c_out: int, kernel: tuple[int, int], multiplier: int
) -> tuple[int, int]:
    """Weights (= MACs per output pixel) of the standard conv and of the pair, without bias:
    ``C_out·C_in·kh·kw`` and ``C_in·m·kh·kw + C_out·C_in·m``."""
    taps = kernel[0] * kernel[1]
    return c_out * c_in * taps, c_in * multiplier * taps + c_out * c_in * multiplier


def skip_reason(conv: nn.Conv2d, multiplier: int) -> str | None:
    """Why ``conv`` is left as it is (grouped, 1×1, or the pair would not be smaller)."""
    if conv.groups != 1:
        return f"groups={conv.groups} (already grouped/depthwise)"
    if conv.kernel_size[0] * conv.kernel_size[1] == 1:
        return "1x1 kernel (already pointwise)"
    before, after = separable_cost(conv.in_channels, conv.out_channels, conv.kernel_size,
                                   multiplier)  # fmt: skip
    if after >= before:
        return f"the pair would have {after} weights, not fewer than {before}"
    return None


def _output_pixels(model: nn.Module, names: list[str], ctx: Context) -> dict[str, int]:
    """Output pixels per sample of each conv on the example inputs ({} without inputs)."""
    if ctx.example_inputs is None:
        return {}
    from modelpress.techniques.architecture.blocks import probe_shapes

    shapes = probe_shapes(model, names, ctx.example_inputs)
    return {n: y[-1] * y[-2] for n, (_, y) in shapes.items()}


def _layer_report(name: str, conv: nn.Conv2d, m: int, pixels: int | None) -> dict[str, Any]:
    before, after = separable_cost(conv.in_channels, conv.out_channels, conv.kernel_size, m)
    bias = conv.out_channels if conv.bias is not None else 0
    rec: dict[str, Any] = {"params_before": before + bias, "params_after": after + bias,
                           "fit_error": round(fit_error(conv.weight, m), 6)}  # fmt: skip
    if pixels is not None:
        rec |= {"flops_before": 2 * before * pixels, "flops_after": 2 * after * pixels}
    return rec


@technique(OWNER, SeparableConfig)
def apply_separable(model: nn.Module, cfg: SeparableConfig, ctx: Context) -> nn.Module:
    """Replace k×k Conv2d by depthwise-separable pairs fitted by SVD (MobileNet).

    Each replaced conv becomes :class:`DepthwiseSeparable` initialised by
    :func:`separable_factors` (Howard et al. 2017; truncated SVD of every ``W[:, i]``).

    Args:
        model: the model, changed in place.
        cfg: ``multiplier`` and ``targets``/``ignore``.
        ctx: example inputs, for the FLOPs of each layer (omitted without them).

    Returns:
        The model. The stage record holds per layer ``params_before``/``params_after``,
        ``flops_before``/``flops_after`` (per sample) and ``fit_error``
        ``||W - W_hat||_F / ||W||_F``; and ``skipped``: the convs left alone and why.

    Raises:
        NoMatchingModulesError: the selection holds no Conv2d.
        UnsupportedModuleError: a selected conv is masked/quantized, a selected leaf is not a
            Conv2d, or no selected conv can be replaced.
    """
    picked = select_weighted(model, cfg, owner=OWNER, supported=(nn.Conv2d,))
    for name, conv in picked:
        if parametrize.is_parametrized(conv):
            raise UnsupportedModuleError(f"{name}: carries a mask or quantizer; run {OWNER} "
                                         "before techniques that mask or quantize weights.")  # fmt: skip
    skipped = {n: why for n, c in picked if (why := skip_reason(c, cfg.multiplier))}
    chosen = [(n, c) for n, c in picked if n not in skipped]
    if not chosen:
        first = next(iter(skipped.items()))
        raise UnsupportedModuleError(f"{OWNER}: no selected conv can be replaced; e.g. "
                                     f"{first[0]}: {first[1]}.")  # fmt: skip
    pixels = _output_pixels(model, [n for n, _ in chosen], ctx)
    layers = {n: _layer_report(n, c, cfg.multiplier, pixels.get(n)) for n, c in chosen}
    for name, conv in chosen:
        model.set_submodule(name, separable_pair(conv, cfg.multiplier))
    record_edit(model, "separable", layers={n: cfg.multiplier for n, _ in chosen})
    ctx.report("layers", layers)
    if skipped:
        ctx.report("skipped", skipped)
    return model


@edit_op("separable")
def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    for name, multiplier in edit["layers"].items():
        conv = model.get_submodule(name)
        model.set_submodule(name, DepthwiseSeparable(conv, int(multiplier)))
