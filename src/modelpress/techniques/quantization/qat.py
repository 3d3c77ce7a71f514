"""``quant.qat``: quantization-aware training — fake quantizers that the next ``train`` trains
through, then stored as real integers.

Weights (``weight_bits``) and optionally each layer's input (``activation_bits``):

* ``method: ste`` — the fixed min-max weight grid of :class:`AffineFakeQuant` (symmetric per
  channel by default), rounding straight-through (Bengio et al. 2013; Jacob et al. 2018).
  Activations: a static :class:`InputQuantizer` whose asymmetric per-tensor range is the
  min-max of the float model's layer inputs over ``calibration_samples`` samples, taken before
  any change and **kept fixed** during training (the weights learn to fit the grid; the
  deterministic choice — for a learned range use ``lsq``).
* ``method: lsq`` — Learned Step Size Quantization (Esser et al. 2020; see
  :mod:`~modelpress.techniques.quantization.lsq`): the step sizes are parameters trained with
  the weights, with the paper's gradient and gradient scale and ``s0 = 2 mean|v| / sqrt(Qp)``.
  Weights signed and symmetric; activations unsigned when every calibration input is
  ``>= 0`` (after a ReLU), else signed (LSQ's rule).

After training the quantizers stay on the model: a weight quantizer's ``value_codec`` is an
:class:`AffineCodec` with the learned scales, so the artifact holds ``weight_bits``-bit codes;
activation scales are stored as they are and the ``input_quant`` edit re-attaches static
input quantizers on load. Keep the first and last layers at higher precision with ``ignore``
if the accuracy at 2-3 bits matters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.context import Context, forward
from modelpress.errors import DataError
from modelpress.measure.flops import eval_mode
from modelpress.parametrizations import add_parametrization, effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.quantization.activation import (
    InputQuantizer,
    check_no_input_quantizer,
    quantize_inputs,
)
from modelpress.techniques.quantization.affine import compute_qparams
from modelpress.techniques.quantization.binary import TRAINABLE
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized
from modelpress.techniques.quantization.lsq import LSQInputQuantizer, LSQWeightFakeQuant
from modelpress.techniques.quantization.rtn import GridConfig
from modelpress.train import Callback, TrainState

OWNER = "quant.qat"
Selected = list[tuple[str, nn.Module]]


class QATConfig(GridConfig):
    """Fake-quantize weights (and layer inputs), train through them next (STE or LSQ)."""

    method: Literal["ste", "lsq"] = Field(
        "lsq", description="Straight-through on fixed grids, or learned step sizes (LSQ)."
    )
    weight_bits: int = Field(4, ge=2, le=8, description="Bits per weight.")
    activation_bits: int | None = Field(
        None, ge=2, le=8, description="Bits per layer input (None: weights only)."
    )
    symmetric: bool = Field(True, description="Symmetric weight grid (ste; lsq always is).")
    calibration_samples: int = Field(
        256, ge=1, description="Samples that set the activation ranges before training."
    )
    batch_size: int = Field(64, ge=1, description="Calibration samples per forward pass.")

    @model_validator(mode="after")
    def _consistent(self) -> QATConfig:
        if self.method == "lsq" and not self.symmetric:
            raise ValueError("lsq learns a symmetric weight grid; drop 'symmetric: false'")
        return self


def activation_stats(
    model: nn.Module, selected: Selected, batches: list[Any]
) -> dict[str, torch.Tensor]:
    """Each selected layer's input statistics ``[min, max, sum|x|, count]`` over ``batches``.

    The model runs in eval mode without gradients and is left as it was.

    Raises:
        DataError: no batches, or an input holding NaN/inf (names the layer).
    """
    stats = {name: torch.tensor([float("inf"), -float("inf"), 0.0, 0.0]) for name, _ in selected}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            s = stats[name]
            s[0], s[1] = min(s[0], x.min()), max(s[1], x.max())
            s[2], s[3] = s[2] + x.abs().sum(), s[3] + x.numel()

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in selected]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    for name, s in stats.items():
        if not bool(torch.isfinite(s).all()):
            raise DataError(
                f"{OWNER}: the inputs of {name} hold NaN/inf (or none were seen) on the "
                "calibration data; check the data and the model."
            )
    return stats


def static_activation_grid(stats: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The STE activation grid: asymmetric min-max over ``[lo, hi]`` holding 0, per tensor.

    ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)`` (as :func:`compute_qparams`).

    Returns:
        ``(scale, zero_point)`` as 0-d float32 tensors.
    """
    scale, zero = compute_qparams(stats[None, :2], bits, symmetric=False, scale_dtype="float32")
    return scale[0], zero[0]


def _weight_quantizer(weight: torch.Tensor, cfg: QATConfig) -> AffineFakeQuant:
    if cfg.method == "lsq":
        return LSQWeightFakeQuant(
            weight,
            cfg.weight_bits,
            granularity=cfg.granularity,
            group_size=cfg.group_size,
            scale_dtype=cfg.scale_dtype,
        )
    return AffineFakeQuant(
        weight,
        cfg.weight_bits,
        symmetric=cfg.symmetric,
        granularity=cfg.granularity,
        group_size=cfg.group_size,
        scale_dtype=cfg.scale_dtype,
    )


def _quantize_activations(
    model: nn.Module, selected: Selected, stats: dict[str, torch.Tensor], cfg: QATConfig
) -> dict[str, InputQuantizer]:
    """Attach the input quantizers (recorded edit) and set their grids from ``stats``."""
    lsq = cfg.method == "lsq"
    bits = cfg.activation_bits or 8
    quantizers = quantize_inputs(
        model,
        [n for n, _ in selected],
        bits=bits,
        dynamic=False,
        quantizer_cls=LSQInputQuantizer if lsq else None,
    )
    for name, q in quantizers.items():
        s = stats[name]
        if isinstance(q, LSQInputQuantizer):
            q.init_step(float(s[2] / s[3]), non_negative=bool(s[0] >= 0))
        else:
            scale, zero = static_activation_grid(s, bits)
            q.scale.copy_(scale)
            q.zero_point.copy_(zero)
    return quantizers


class QATCallback(Callback):
    """Keeps learned step sizes positive after each step; reports activation scales."""

    def __init__(self, trained: list[nn.Module], inputs: dict[str, InputQuantizer], ctx: Context):
        self.trained, self.inputs, self.ctx = trained, inputs, ctx

    def on_step_end(self, state: TrainState) -> None:
        """Project every LSQ step size back into its positive storage range."""
        for q in self.trained:
            q.project_()  # type: ignore[operator]

    def on_train_end(self, state: TrainState) -> None:
        """Report each layer input's final scale and zero point."""
        if self.inputs:
            self.ctx.report(
                "activation_grid",
                {n: (float(q.scale.detach()), int(q.zero_point)) for n, q in self.inputs.items()},
            )


@technique(OWNER, QATConfig, needs=("later_train",))
def apply_qat(model: nn.Module, cfg: QATConfig, ctx: Context) -> nn.Module:
    """Fake-quantize weights (and layer inputs) for training through them (STE or LSQ)."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=TRAINABLE)
    check_unquantized(selected, OWNER)
    stats: dict[str, torch.Tensor] = {}
    if cfg.activation_bits is not None:
        for name, module in selected:
            check_no_input_quantizer(name, module)
        batches = list(ctx.calibration_batches(cfg.calibration_samples, cfg.batch_size))
        stats = activation_stats(model, selected, batches)
    weights = [_weight_quantizer(effective_tensor(m), cfg) for _, m in selected]
    for (_, module), quantizer in zip(selected, weights, strict=True):
        add_parametrization(module, "weight", quantizer)
    inputs = _quantize_activations(model, selected, stats, cfg) if stats else {}
    trained = [q for q in [*weights, *inputs.values()] if hasattr(q, "project_")]
    ctx.callbacks.append(QATCallback(trained, inputs, ctx))
    ctx.report("bits", {n: cfg.weight_bits for n, _ in selected})
    if cfg.activation_bits is not None:
        ctx.report("activation_bits", {n: cfg.activation_bits for n, _ in selected})
    return model
