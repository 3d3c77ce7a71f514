"""What each layer becomes in an ONNX export, and its quantizers read as integer tensors.

The exporter never re-quantizes anything: it reads the grid a technique left on the model
(:class:`~modelpress.techniques.quantization.fake_quant.AffineFakeQuant` on ``weight``,
:class:`~modelpress.techniques.quantization.activation.InputQuantizer` on the first input)
and recovers the integer codes with the artifact codec, so the ONNX file holds the same
integers as the artifact and computes ``(q - z) * s`` exactly as the torch model does.

Layer kinds (``mode="quant"``):

* ``int8_dynamic``: Linear/Conv, dynamic 8-bit input, per-channel weight ->
  ``DynamicQuantizeLinear`` + ``MatMulInteger`` (onnxruntime fuses it) / ``ConvInteger``;
* ``qdq_static``: Linear/Conv, static 8-bit input, per-channel weight -> ``QuantizeLinear`` /
  ``DequantizeLinear`` pairs (onnxruntime fuses them into ``QLinearConv`` /
  ``MatMulIntegerToFloat``);
* ``nbits``: Linear, weight only -> ``com.microsoft::MatMulNBits`` (2, 4 or 8-bit containers);
* ``gather_nbits``: Embedding, weight only -> ``com.microsoft::GatherBlockQuantized``;
* ``dq_weight``: Conv, weight only -> int8 weight + ``DequantizeLinear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpress.errors import UnsupportedModuleError
from modelpress.parametrizations import effective_tensor, find_parametrization
from modelpress.techniques.quantization.activation import InputQuantizer
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class WeightCodes:
    """A quantized weight as integers: ``W[r, c] = (codes[r, c] - zero[r, g]) * scale[r, g]
    / in_scale[c]`` with ``g = c // group_size`` (one group per row when ``group_size`` is None).
    """

    codes: torch.Tensor  # (rows, cols) int64 in [0, 2^bits - 1]
    scale: torch.Tensor  # (rows, groups) float32
    zero: torch.Tensor  # (rows, groups) float32; integers unless float_zero
    bits: int
    group_size: int | None
    symmetric: bool
    float_zero: bool
    in_scale: torch.Tensor | None  # (cols,) float32, AWQ; the input is divided by it

    def dequantized(self) -> torch.Tensor:
        """``(rows, cols)`` float weight the codes stand for (with ``in_scale`` divided out)."""
        width = self.group_size or self.codes.shape[1]
        s = self.scale.repeat_interleave(width, dim=1)[:, : self.codes.shape[1]]
        z = self.zero.repeat_interleave(width, dim=1)[:, : self.codes.shape[1]]
        w = (self.codes.float() - z) * s
        return w if self.in_scale is None else w / self.in_scale


def read_weight(module: nn.Module) -> WeightCodes | None:
    """The integer form of ``module.weight``'s fake quantizer, or None if it has none.

    Codes come from the quantizer's artifact codec applied to the effective weight (masks
    and quantizer applied), so they equal the codes the artifact stores.
    """
    fq = find_parametrization(module, "weight", AffineFakeQuant)
    if fq is None:
        return None
    w = effective_tensor(module).float()
    shape = tuple(w.shape)
    encoded = fq.value_codec().encode(w.reshape(-1), None, shape)
    rows = shape[0]
    codes = torch.from_numpy(encoded.codes).reshape(rows, -1)  # (rows, cols)
    layout = fq.layout
    scale = fq.scale.float().reshape(layout.rows, layout.groups_per_row).expand(rows, -1)
    zero = fq.zero_point.float().reshape(layout.rows, layout.groups_per_row).expand(rows, -1)
    in_scale = getattr(fq, "in_scale", None)
    return WeightCodes(
        codes=codes,
        scale=scale.contiguous(),
        zero=zero.contiguous(),
        bits=fq.bits,
        group_size=layout.group_size if layout.granularity == "group" else None,
        symmetric=fq.symmetric,
        float_zero=bool(getattr(fq, "float_zero", False)),
        in_scale=None if in_scale is None else in_scale.float(),
    )


def input_smooth(quantizer: InputQuantizer) -> torch.Tensor | None:
    """The SmoothQuant per-channel divisor of a quantizer's input (None if there is none)."""
    smooth = getattr(quantizer, "smooth", None)
    return None if smooth is None else smooth.detach().float()


def layer_kind(
    name: str,
    module: nn.Module,
    weight: WeightCodes | None,
    quantizer: InputQuantizer | None,
) -> str | None:
    """How ``module`` is exported with ``mode="quant"``: a kind above, or None (float).

    Args:
        name: the module's name, for messages.
        module: the layer.
        weight: :func:`read_weight` of it.
        quantizer: its (enabled) input quantizer, or None.

    Raises:
        UnsupportedModuleError: a quantized layer no ONNX integer form fits (names it).
    """
    if quantizer is None:
        return None if weight is None else _weight_only_kind(name, module, weight)
    if quantizer.bits != 8:
        raise _unsupported(name, f"{quantizer.bits}-bit input quantization (ONNX: 8 bits)")
    if weight is None:
        raise _unsupported(name, "a quantized input with a float weight (quantize it too)")
    _check_integer_grid(name, weight)
    if quantizer.dynamic:
        if isinstance(module, CONVS) and not bool((weight.zero == weight.zero[0, 0]).all()):
            raise _unsupported(name, "a dynamic int8 convolution with per-channel zero points "
                                     "(ConvInteger takes one; use a symmetric weight grid)")  # fmt: skip
        if not isinstance(module, (nn.Linear, *CONVS)):
            raise _unsupported(name, f"dynamic input quantization of a {type(module).__name__}")
        return "int8_dynamic"
    if not isinstance(module, (nn.Linear, *CONVS)):
        raise _unsupported(name, f"activation quantization of a {type(module).__name__}")
    return "qdq_static"


def _weight_only_kind(name: str, module: nn.Module, weight: WeightCodes) -> str:
    if isinstance(module, nn.Linear):
        return "nbits"
    if isinstance(module, nn.Embedding):
        if weight.float_zero:
            raise _unsupported(name, "float zero points on an Embedding")
        return "gather_nbits"
    if isinstance(module, CONVS):
        if weight.float_zero:
            raise _unsupported(name, "float zero points on a convolution")
        if weight.group_size is not None:
            raise _unsupported(name, "a group-wise convolution weight (DequantizeLinear is "
                                     "per channel)")  # fmt: skip
        return "dq_weight"
    raise _unsupported(name, f"a quantized {type(module).__name__} weight")


def _check_integer_grid(name: str, weight: WeightCodes) -> None:
    """Integer activations need a per-channel weight grid with integer zero points."""
    if weight.group_size is not None:
        raise _unsupported(name, "a group-wise weight with integer activations (the integer "
                                 "ops take one scale per output channel)")  # fmt: skip
    if weight.float_zero:
        raise _unsupported(name, "float zero points with integer activations")
    if weight.in_scale is not None:
        raise _unsupported(name, "per-input-column scales (AWQ) with integer activations")


def _unsupported(name: str, what: str) -> UnsupportedModuleError:
    """The error for a layer that has no ONNX integer form (the caller raises it)."""
    return UnsupportedModuleError(
        f"{name}: {what} cannot be exported to ONNX integer ops; change its quantization or "
        "export with mode='fp32'."
    )
