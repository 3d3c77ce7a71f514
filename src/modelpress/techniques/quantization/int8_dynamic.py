"""``quant.int8_dynamic``: int8 weights and dynamically quantized uint8 activations.

What ``torch.ao.quantization.quantize_dynamic`` and onnxruntime's ``quantize_dynamic`` do:
each selected layer's weight is quantized once to int8 (symmetric, per output channel by
default: :class:`AffineFakeQuant` with 8 bits, codes ``q`` with ``int8 = q - 128``), and its
input is quantized at run time to uint8 on a per-tensor grid taken from that input's own
range, with the arithmetic of ONNX ``DynamicQuantizeLinear`` (:class:`InputQuantizer` with
``dynamic=True``). No calibration data. The runtime export turns this into
``DynamicQuantizeLinear`` + ``MatMulInteger``/``ConvInteger``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.parametrizations import add_parametrization, effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.quantization.activation import check_no_input_quantizer, quantize_inputs
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized

OWNER = "quant.int8_dynamic"
ACTIVATION_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Selected = list[tuple[str, nn.Module]]


class Int8WeightConfig(TargetedConfig):
    """The int8 weight grid of quant.int8_dynamic and quant.int8_static."""

    weight_granularity: Literal["channel", "tensor"] = Field(
        "channel", description="One weight scale per output channel, or one per tensor."
    )
    reduce_range: bool = Field(
        False,
        description="7-bit weights (|q - z| <= 64), so int8 kernels of CPUs without VNNI "
        "cannot saturate and onnxruntime runs its fast int8-weight path.",
    )


class Int8DynamicConfig(Int8WeightConfig):
    """int8 weights, activations quantized per tensor at run time."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="Modules to quantize: exact names, type names or 're:' regexes.",
    )


def int8_weight_quantizer(
    module: nn.Module, granularity: str, reduce_range: bool = False
) -> AffineFakeQuant:
    """A symmetric 8-bit (7-bit with ``reduce_range``) weight fake quantizer for ``module``'s
    weight as it is now (float32 scales, as ONNX ``DequantizeLinear`` takes them).

    ``reduce_range`` is onnxruntime's and torch.ao's name for it: x86 int8 kernels multiply
    uint8 activations by int8 weights with ``vpmaddubsw``, whose pairwise int16 sums saturate
    unless weights fit in 7 bits (CPUs with VNNI do not have the problem).
    """
    return AffineFakeQuant(
        effective_tensor(module),
        7 if reduce_range else 8,
        symmetric=True,
        granularity=granularity,  # type: ignore[arg-type]
        group_size=None,
        scale_dtype="float32",
    )


def select_for_int8(model: nn.Module, cfg: TargetedConfig, owner: str) -> Selected:
    """The selected layers, after checking (before any change) that neither their weight nor
    their input is already quantized.

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: an unsupported layer type, or one already quantized.
    """
    selected = select_weighted(model, cfg, owner=owner, supported=ACTIVATION_QUANTIZABLE)
    check_unquantized(selected, owner)
    for name, module in selected:
        check_no_input_quantizer(name, module)
    return selected


def quantize_weights_int8(selected: Selected, granularity: str, reduce_range: bool) -> None:
    """Put an :func:`int8_weight_quantizer` on every selected weight."""
    for _, module in selected:
        quantizer = int8_weight_quantizer(module, granularity, reduce_range)
        add_parametrization(module, "weight", quantizer)


@technique(OWNER, Int8DynamicConfig)
def apply_int8_dynamic(model: nn.Module, cfg: Int8DynamicConfig, ctx: Context) -> nn.Module:
    """int8 weights per channel, inputs quantized to uint8 at run time (no data needed).

    Raises:
        NoMatchingModulesError: the selectors pick no Linear/ConvNd.
        UnsupportedModuleError: a selected weight or input is already quantized (nothing is
            changed).
    """
    selected = select_for_int8(model, cfg, OWNER)
    quantize_weights_int8(selected, cfg.weight_granularity, cfg.reduce_range)
    quantize_inputs(model, [n for n, _ in selected], bits=8, dynamic=True)
    ctx.report("bits", {n: 7 if cfg.reduce_range else 8 for n, _ in selected})
    return model
