"""8-bit layers as ONNX integer patterns: QDQ (static inputs), dynamic int8, weight DQ.

Every pattern computes in torch exactly what the fake-quantized layer computes, and emits in
ONNX the nodes onnxruntime recognises:

* static input: ``QuantizeLinear -> DequantizeLinear`` on the input and ``DequantizeLinear``
  on the uint8 weight (per output channel), then ``MatMul``/``Conv``. onnxruntime's QDQ
  fusions turn these into ``QLinearConv`` / ``MatMulIntegerToFloat`` / ``QLinearMatMul``.
* dynamic input (what ``onnxruntime.quantization.quantize_dynamic`` emits):
  ``DynamicQuantizeLinear(x) -> (x_q, s_x, z_x)``; ``MatMulInteger(x_q, W_q, z_x, z_w)``;
  ``Cast`` to float; ``Mul`` by ``s_x * s_w``; onnxruntime fuses it into
  ``DynamicQuantizeMatMul``.
* weight only (convolutions): ``DequantizeLinear`` of the uint8 weight, then ``Conv``.

Weights are stored as **uint8** codes with their own zero points, the grid's own integers:
on x86 CPUs without VNNI onnxruntime's int8-weight (``u8s8``) kernels add pairs of products
in saturating 16-bit registers, which is measurably wrong for full-range 8-bit weights
(a 2.8% relative error on a 384x1536 layer); ``u8u8`` is exact there and everywhere else.
Weights of at most 7 bits around their zero point go as int8 (see :func:`integer_weight`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import UnsupportedModuleError
from modelpress.runtime.layers import WeightCodes, input_smooth
from modelpress.techniques.quantization.activation import InputQuantizer

UINT8, FLOAT = 2, 1  # ONNX TensorProto element types


def fake_quant_uint8(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, 255) - z) * s``: ONNX ``QuantizeLinear`` then
    ``DequantizeLinear`` (round half to even, saturate)."""
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``DynamicQuantizeLinear``'s grid: ``s = (max(x, 0) - min(x, 0)) / 255``,
    ``z = clamp(round(-min(x, 0) / s), 0, 255)`` (``s = 1`` for an all-zero ``x``)."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), 0, 255)


class _QDQ(torch.autograd.Function):
    """Static input fake quantization; ``QuantizeLinear -> DequantizeLinear`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, x, scale, zero):  # type: ignore[override]
        return fake_quant_uint8(x, scale, zero.float())

    @staticmethod
    def symbolic(g, x, scale, zero):  # type: ignore[no-untyped-def]
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale, zero)


class _DynamicQDQ(torch.autograd.Function):
    """Dynamic input fake quantization; ``DynamicQuantizeLinear -> DequantizeLinear``."""

    @staticmethod
    def forward(ctx: Any, x):  # type: ignore[override]
        return fake_quant_uint8(x, *dynamic_qparams(x))

    @staticmethod
    def symbolic(g, x):  # type: ignore[no-untyped-def]
        q, scale, zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        return g.op("DequantizeLinear", q, scale, zero)


class _Dequantize(torch.autograd.Function):
    """``(q - z) * s`` along ``axis``; ``DequantizeLinear(axis)`` of a constant in ONNX."""

    @staticmethod
    def forward(ctx: Any, q, scale, zero, axis: int):  # type: ignore[override]
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.float() - zero.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero, axis: int):  # type: ignore[no-untyped-def]
        return g.op("DequantizeLinear", q, scale, zero, axis_i=axis)


class _DynamicMatMul(torch.autograd.Function):
    """``dynfq(x) @ dequant(W)`` with ``W`` ``(K, N)``; the ``quantize_dynamic`` pattern."""

    @staticmethod
    def forward(ctx: Any, x, wq, w_scale, w_zero):  # type: ignore[override]
        w = (wq.float() - w_zero.float()) * w_scale  # (K, N)
        return fake_quant_uint8(x, *dynamic_qparams(x)) @ w

    @staticmethod
    def symbolic(g, x, wq, w_scale, w_zero):  # type: ignore[no-untyped-def]
        xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        scale = g.op("Mul", x_scale, w_scale)
        acc = g.op("MatMulInteger", xq, wq, x_zero, w_zero)
        return g.op("Mul", g.op("Cast", acc, to_i=FLOAT), scale)


class _DynamicConv(torch.autograd.Function):
    """``conv(dynfq(x), (W_q - z_w) * s_w)`` with one weight zero point; in ONNX
    ``DynamicQuantizeLinear`` + ``ConvInteger`` + the scales (``quantize_dynamic``'s pattern).
    """

    @staticmethod
    def forward(ctx: Any, x, wq, w_scale, w_zero, conv: dict[str, Any]):  # type: ignore[override]
        shape = (-1,) + (1,) * (wq.dim() - 1)
        w = (wq.float() - w_zero.float()) * w_scale.reshape(shape)
        return conv["fn"](fake_quant_uint8(x, *dynamic_qparams(x)), w, None, **conv["kwargs"])

    @staticmethod
    def symbolic(g, x, wq, w_scale, w_zero, conv: dict[str, Any]):  # type: ignore[no-untyped-def]
        xq, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("ConvInteger", xq, wq, x_zero, w_zero, **conv["onnx"])
        y = g.op("Mul", g.op("Cast", acc, to_i=FLOAT), x_scale)
        return g.op("Mul", y, w_scale)  # w_scale: (1, C, 1, ...)


def integer_weight(
    weight: WeightCodes, *, allow_int8: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)``: codes ``(rows, cols)`` and zero points ``(rows,)`` in uint8,
    scales float32 ``(rows,)``, for a per-channel (or per-tensor) grid of at most 8 bits.

    When every ``q - z`` lies in ``[-64, 63]`` (symmetric grids of 7 bits or fewer) and
    ``allow_int8``, the weight is stored as int8 ``q - z`` with zero point 0 instead: then no
    pair of uint8 x int8 products can saturate a 16-bit lane, so onnxruntime's faster
    ``u8s8`` kernels are exact too.
    """
    scale = weight.scale[:, 0].float().contiguous()
    centred = weight.codes - weight.zero[:, :1].long()  # (rows, cols)
    if allow_int8 and int(centred.min()) >= -64 and int(centred.max()) <= 63:
        return centred.to(torch.int8), scale, torch.zeros_like(scale, dtype=torch.int8)
    return weight.codes.to(torch.uint8), scale, weight.zero[:, 0].to(torch.uint8).contiguous()


class QuantizedInput(nn.Module):
    """An :class:`InputQuantizer` as ONNX nodes (``x / smooth`` first, if it has one)."""

    def __init__(self, quantizer: InputQuantizer) -> None:
        super().__init__()
        self.dynamic = quantizer.dynamic
        self.register_buffer("scale", quantizer.scale.detach().float().clone())
        self.register_buffer("zero", quantizer.zero_point.detach().to(torch.uint8).clone())
        self.register_buffer("smooth", input_smooth(quantizer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input on its 8-bit grid, in float."""
        if self.smooth is not None:
            x = x / self.smooth
        return _DynamicQDQ.apply(x) if self.dynamic else _QDQ.apply(x, self.scale, self.zero)


class DynamicInt8Layer(nn.Module):
    """A Linear or convolution with dynamic 8-bit inputs: ``DynamicQuantizeLinear`` +
    ``MatMulInteger`` / ``ConvInteger`` (a convolution's weight zero points must be equal)."""

    def __init__(
        self, name: str, layer: nn.Module, weight: WeightCodes, quantizer: InputQuantizer
    ) -> None:
        super().__init__()
        self.conv = None if isinstance(layer, nn.Linear) else conv_args(name, layer)
        # ConvInteger runs uint8 weights only
        codes, scale, zero = integer_weight(weight, allow_int8=self.conv is None)
        if self.conv is None:
            self.register_buffer("wq", codes.T.contiguous())  # (K, N)
            self.register_buffer("w_scale", scale)
            self.register_buffer("w_zero", zero)
        else:
            self.register_buffer("wq", codes.reshape(layer.weight.shape))  # (out, in, *k)
            spatial = (1,) * (layer.weight.dim() - 2)
            self.register_buffer("w_scale", scale.reshape(1, -1, *spatial))  # (1, C, 1, ...)
            self.register_buffer("w_zero", zero[0].clone())  # one zero point
        self.register_buffer("smooth", input_smooth(quantizer))
        self.register_buffer("bias", _bias(layer, self.conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dynfq(x / smooth)`` through the integer matmul / conv, plus bias."""
        if self.smooth is not None:
            x = x / self.smooth
        if self.conv is None:
            y = _DynamicMatMul.apply(x, self.wq, self.w_scale, self.w_zero)
        else:
            y = _DynamicConv.apply(x, self.wq, self.w_scale, self.w_zero, self.conv)
        return y if self.bias is None else y + self.bias


class QDQLayer(nn.Module):
    """A Linear or convolution with a uint8 weight (``DequantizeLinear``) and, when given a
    static quantizer, a ``QuantizeLinear -> DequantizeLinear`` input."""

    def __init__(
        self,
        name: str,
        layer: nn.Module,
        weight: WeightCodes,
        quantizer: InputQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.conv = None if isinstance(layer, nn.Linear) else conv_args(name, layer)
        codes, scale, zero = integer_weight(weight)
        codes = codes.reshape(layer.weight.shape)  # (out, in, *kernel) or (N, K)
        self.register_buffer("wq", codes if self.conv else codes.T.contiguous())
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", zero)
        self.register_buffer("in_scale", _kernel_in_scale(weight, layer.weight.shape))
        self.input = None if quantizer is None else QuantizedInput(quantizer)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on the quantized input with the dequantized weight."""
        if self.input is not None:
            x = self.input(x)
        w = _Dequantize.apply(self.wq, self.w_scale, self.w_zero, 0 if self.conv else 1)
        if self.in_scale is not None:
            w = w / self.in_scale
        if self.conv is None:
            y = x @ w
            return y if self.bias is None else y + self.bias
        return self.conv["fn"](x, w, self.bias, **self.conv["kwargs"])


def conv_args(name: str, conv: nn.Module) -> dict[str, Any]:
    """A convolution's functional form (``fn``, ``kwargs``) and its ONNX attributes.

    Raises:
        UnsupportedModuleError: a padding mode other than zeros.
    """
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise UnsupportedModuleError(
            f"{name}: padding_mode {conv.padding_mode!r} cannot be exported with a quantized "
            "weight; use padding_mode 'zeros'."
        )
    fns = ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d))
    fn = next(f for cls, f in fns if isinstance(conv, cls))
    kernel, dilation = conv.kernel_size, conv.dilation
    if conv.padding == "same":  # torch puts the odd pixel at the end, as SAME_UPPER does
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        begin = [t // 2 for t in total]
        pads = begin + [t - b for t, b in zip(total, begin, strict=True)]
    elif conv.padding == "valid":
        pads = [0] * (2 * len(kernel))
    else:
        pads = list(conv.padding) * 2
    onnx = {"strides_i": list(conv.stride), "pads_i": pads, "dilations_i": list(dilation),
            "group_i": conv.groups, "kernel_shape_i": list(kernel)}  # fmt: skip
    kwargs = {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "groups")}
    return {"fn": fn, "kwargs": kwargs, "onnx": onnx}


def _bias(layer: nn.Module, conv: dict[str, Any] | None) -> torch.Tensor | None:
    """A copy of the layer's bias, shaped ``(1, C, 1, ...)`` to add to a conv output."""
    if layer.bias is None:
        return None
    bias = layer.bias.detach().clone()
    return bias if conv is None else bias.reshape(1, -1, *(1,) * (layer.weight.dim() - 2))


def _kernel_in_scale(weight: WeightCodes, shape: torch.Size) -> torch.Tensor | None:
    """AWQ's per-input-column scales shaped to divide the exported weight: ``(K, 1)`` for a
    Linear's ``(K, N)``, ``(in, *kernel)`` for a convolution's kernel; None if there are none."""
    if weight.in_scale is None:
        return None
    return weight.in_scale.reshape(-1, 1) if len(shape) == 2 else weight.in_scale.reshape(shape[1:])
