"""``quant.int8_static``: W8A8 with activation grids calibrated by observers, optionally with
SmoothQuant (Xiao et al. 2023).

Weights: int8, symmetric per output channel (as in ``quant.int8_dynamic``). Inputs of the
selected layers: a fixed per-tensor 8-bit grid (uint8 asymmetric by default, or symmetric,
zero point 128 = int8) chosen by an observer (:mod:`~modelpress.techniques.quantization.
observers`) from the calibration data, stored in each layer's :class:`InputQuantizer`.

Calibration watches the *float* model: every selected layer's input is observed in one pass
over the calibration batches before anything is quantized, so later layers see the inputs the
unquantized model gives them. This is what onnxruntime's and torch.ao's static calibration
do; at 8 bits the upstream rounding barely moves the ranges, and one pass serves all layers.
With ``smoothquant_alpha`` a first pass records ``max |X_j|`` per input channel of every
selected Linear (convolutions are not smoothed); the factors ``s`` are fixed, and the
observers then watch ``X / s``. Nothing in the model changes until every statistic has been
gathered, so bad data (NaN/inf) leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.context import Batch, Context, forward
from modelpress.errors import DataError, UnsupportedModuleError
from modelpress.measure.flops import eval_mode
from modelpress.registry import technique
from modelpress.techniques.quantization.activation import quantize_inputs
from modelpress.techniques.quantization.int8_dynamic import (
    Int8WeightConfig,
    Selected,
    quantize_weights_int8,
    select_for_int8,
)
from modelpress.techniques.quantization.observers import Observer, make_observer
from modelpress.techniques.quantization.smoothquant import (
    ChannelAbsMax,
    smooth_weight,
    smoothing_factors,
    weight_column_absmax,
)

OWNER = "quant.int8_static"
Watch = Callable[[torch.Tensor], None]


class Int8StaticConfig(Int8WeightConfig):
    """W8A8: int8 weights, inputs on a calibrated static 8-bit grid, optional SmoothQuant."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv2d"],
        description="Modules to quantize: exact names, type names or 're:' regexes.",
    )
    observer: Literal["minmax", "moving_average", "percentile", "mse", "kl"] = Field(
        "mse", description="How the activation range is chosen from the calibration data."
    )
    percentile: float = Field(
        99.99, ge=50, le=100, description="Clip percentile of the 'percentile' observer."
    )
    momentum: float = Field(
        0.1, gt=0, le=1, description="Weight of each new batch in the 'moving_average' observer."
    )
    histogram_bins: int = Field(
        2048, ge=256, le=16384, description="Histogram bins per side of zero (percentile/mse/kl)."
    )
    symmetric: bool = Field(
        False, description="Symmetric activation grid (int8, zero point 128) instead of uint8."
    )
    smoothquant_alpha: float | None = Field(
        None, ge=0, le=1, description="SmoothQuant migration strength (e.g. 0.5); null: off."
    )
    n_samples: int = Field(128, ge=1, description="Calibration samples.")
    batch_size: int = Field(32, ge=1, description="Calibration samples per forward pass.")

    @model_validator(mode="after")
    def _options_match_observer(self) -> Int8StaticConfig:
        uses = {
            "percentile": ("percentile",),
            "momentum": ("moving_average",),
            "histogram_bins": ("percentile", "mse", "kl"),
        }
        for option, observers in uses.items():
            if option in self.model_fields_set and self.observer not in observers:
                raise ValueError(
                    f"'{option}' does not apply to observer {self.observer!r} "
                    f"(only to {', '.join(repr(o) for o in observers)})"
                )
        return self

    def make_observer(self) -> Observer:
        """A fresh observer of the configured kind with its option."""
        options: dict[str, Any] = {
            "percentile": {"percentile": self.percentile, "bins": self.histogram_bins},
            "moving_average": {"momentum": self.momentum},
            "mse": {"bins": self.histogram_bins},
            "kl": {"bins": self.histogram_bins},
        }.get(self.observer, {})
        return make_observer(self.observer, **options)


def watch_inputs(
    model: nn.Module, batches: Sequence[Batch], watchers: dict[str, tuple[nn.Module, Watch]],
    *, owner: str,
) -> None:  # fmt: skip
    """Run ``model`` on every batch (eval mode, no gradients) and hand each watched layer's
    first input to its watcher; training flags are restored after.

    Args:
        model: the model.
        batches: input batches (tensors or dicts of keyword tensors).
        watchers: ``name -> (module, fn)``; ``fn(x)`` is called with each input of ``module``.
        owner: the technique name, for messages.

    Raises:
        DataError: no batches, or a watched input holds NaN/inf (names the layer).
        UnsupportedModuleError: a watched layer the data never reaches.
    """
    if not batches:
        raise DataError(f"{owner}: the calibration data yields no batches.")
    hits = dict.fromkeys(watchers, 0)

    def hook_for(name: str, fn: Watch) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not torch.isfinite(x).all():
                raise DataError(
                    f"{name}: the calibration activations reaching it contain NaN or inf, so "
                    f"{owner} cannot calibrate it; check the data and the model."
                )
            fn(x)
            hits[name] += 1

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, fn)) for n, (m, fn) in watchers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, count in hits.items() if not count]
    if missing:
        raise UnsupportedModuleError(
            f"{missing[0]}: not called when the calibration data ran through the model, so "
            f"{owner} has no inputs to calibrate it from; add it to 'ignore'."
        )


def smoothquant_factors(
    model: nn.Module, batches: Sequence[Batch], layers: Selected, alpha: float
) -> dict[str, torch.Tensor]:
    """SmoothQuant's ``s`` for each Linear in ``layers``, from one calibration pass."""
    stats = {name: ChannelAbsMax(module.weight.shape[1]) for name, module in layers}
    watch_inputs(model, batches, {n: (m, stats[n].update) for n, m in layers}, owner=OWNER)
    return {
        name: smoothing_factors(stats[name].absmax, weight_column_absmax(module), alpha)
        for name, module in layers
    }


def calibrate_observers(
    model: nn.Module, batches: Sequence[Batch], layers: Selected, cfg: Int8StaticConfig,
    smooth: dict[str, torch.Tensor],
) -> dict[str, Observer]:  # fmt: skip
    """An observer per layer, fed the layer's inputs (divided by ``smooth[name]`` if any)."""
    observers = {name: cfg.make_observer() for name, _ in layers}

    def watcher(name: str) -> Watch:
        s = smooth.get(name)
        return observers[name].update if s is None else lambda x: observers[name].update(x / s)

    watch_inputs(model, batches, {n: (m, watcher(n)) for n, m in layers}, owner=OWNER)
    return observers


@technique(OWNER, Int8StaticConfig, needs=("calibration",))
def apply_int8_static(model: nn.Module, cfg: Int8StaticConfig, ctx: Context) -> nn.Module:
    """W8A8: int8 weights, inputs on static grids calibrated by an observer (SmoothQuant opt.).

    Raises:
        NoMatchingModulesError: the selectors pick no Linear/ConvNd.
        UnsupportedModuleError: a selected weight or input is already quantized, or a layer
            the calibration data never reaches (nothing is changed).
        DataError: no calibration batches, or NaN/inf in a selected layer's inputs (names the
            layer; nothing is changed).
    """
    selected = select_for_int8(model, cfg, OWNER)
    batches = list(ctx.calibration_batches(cfg.n_samples, cfg.batch_size))
    smooth: dict[str, torch.Tensor] = {}
    if cfg.smoothquant_alpha is not None:
        linears = [(n, m) for n, m in selected if isinstance(m, nn.Linear)]
        if linears:
            smooth = smoothquant_factors(model, batches, linears, cfg.smoothquant_alpha)
    observers = calibrate_observers(model, batches, selected, cfg, smooth)
    grids = {name: obs.qparams(8, cfg.symmetric) for name, obs in observers.items()}
    # every statistic is in: now change the model
    modules = dict(selected)
    for name, factors in smooth.items():
        smooth_weight(modules[name], factors)
    quantize_weights_int8(selected, cfg.weight_granularity, cfg.reduce_range)
    widths = {name: len(factors) for name, factors in smooth.items()}
    quantizers = quantize_inputs(
        model, list(modules), bits=8, dynamic=False, symmetric=cfg.symmetric, smooth=widths
    )
    for name, quantizer in quantizers.items():
        quantizer.scale.copy_(grids[name][0])
        quantizer.zero_point.copy_(grids[name][1])
        if name in smooth:
            quantizer.smooth.copy_(smooth[name])
    ctx.report("bits", {n: 7 if cfg.reduce_range else 8 for n in modules})
    ctx.report("activation_scale", {n: float(g[0]) for n, g in grids.items()})
    return model
