"""Activation quantization: a fake quantizer on a layer's input, attached as a submodule.

An :class:`InputQuantizer` lives at ``<layer>.input_quantizer`` and a forward pre-hook passes
the layer's first positional input through it, so the layer computes on
``(clamp(round(x / s) + z, 0, 2^b - 1) - z) * s`` — the arithmetic of ONNX ``QuantizeLinear``
then ``DequantizeLinear`` (round half to even, saturate). State-dict keys of the layer itself
do not change; the quantizer adds ``<layer>.input_quantizer.scale`` and ``.zero_point``.

* ``dynamic``: ``s`` and ``z`` come from each input's own range at run time, as onnxruntime's
  ``DynamicQuantizeLinear`` computes them (uint8, asymmetric, per tensor, range holding 0).
* static: ``s`` and ``z`` are buffers fixed by calibration (an observer fills them).

Attaching is a structural edit (``input_quant``), so :func:`modelpress.load` re-attaches the
quantizers before the state dict (with the calibrated scales) is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.edits import edit_op, record_edit
from modelpress.errors import UnsupportedModuleError
from modelpress.techniques.quantization.affine import _RoundSTE, qmax

ATTR = "input_quantizer"


class InputQuantizer(nn.Module):
    """Fake-quantizes a tensor to ``bits``-bit codes on a per-tensor affine grid.

    Args:
        bits: code width (codes ``0 .. 2^bits - 1``).
        dynamic: take the grid from each input's min/max at run time.
        symmetric: static grids only: zero point fixed at ``2^(bits-1)``.

    ``smooth`` (None unless :meth:`add_smoothing` was called) is a per-input-channel buffer
    ``(channels,)``: SmoothQuant's ``s`` (Xiao et al. 2023); the input becomes ``x / s`` over
    its last axis before quantizing, while ``enabled`` is False too (the layer's weight holds
    the matching ``W diag(s)``, so the division is part of the layer, not of the rounding).
    """

    def __init__(self, bits: int = 8, *, dynamic: bool, symmetric: bool = False) -> None:
        super().__init__()
        self.bits, self.dynamic, self.symmetric = bits, dynamic, symmetric
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.full((), float(1 << (bits - 1))))
        self.enabled = True  # False while an observer calibrates the layer's inputs
        self.register_buffer("smooth", None)

    def add_smoothing(self, channels: int) -> None:
        """Create the ``smooth`` buffer, ``(channels,)`` ones, to be filled by calibration."""
        self.smooth = torch.ones(channels)

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid used for ``x``: stored (static), or from ``x``'s own range (dynamic)."""
        if not self.dynamic:
            return self.scale, self.zero_point
        x = x.detach()
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        scale = ((hi - lo) / qmax(self.bits)).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax(self.bits))
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (divided by ``smooth``) on the grid; gradients pass straight through the
        rounding (STE)."""
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)  # (..., channels) / (channels,)
        if not self.enabled:
            return x
        scale, zero = self.qparams(x)
        codes = torch.clamp(_RoundSTE.apply(x / scale) + zero, 0, qmax(self.bits))
        return ((codes - zero) * scale).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else ("symmetric" if self.symmetric else "static")
        smooth = "" if self.smooth is None else f", smooth={len(self.smooth)}"
        return f"bits={self.bits}, {kind}{smooth}"


def _quantize_first_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the first positional input through ``module.input_quantizer``."""
    return (getattr(module, ATTR)(args[0]), *args[1:])


def input_quantizer(module: nn.Module) -> InputQuantizer | None:
    """The quantizer attached to ``module``'s input, or None."""
    q = getattr(module, ATTR, None)
    return q if isinstance(q, InputQuantizer) else None


def check_no_input_quantizer(name: str, module: nn.Module) -> None:
    """Raise if ``module``'s input is already quantized.

    Raises:
        UnsupportedModuleError: names the module.
    """
    if input_quantizer(module) is not None:
        raise UnsupportedModuleError(
            f"{name}: its input is already quantized by an earlier stage; quantize a layer's "
            "activations once (add it to 'ignore')."
        )


def attach_input_quantizer(name: str, module: nn.Module, quantizer: InputQuantizer) -> None:
    """Put ``quantizer`` on ``module``'s first input (not recorded; see :func:`quantize_inputs`).

    Raises:
        UnsupportedModuleError: ``module`` already has an input quantizer.
    """
    check_no_input_quantizer(name, module)
    module.add_module(ATTR, quantizer)
    module.register_forward_pre_hook(_quantize_first_input)


def quantize_inputs(
    model: nn.Module,
    names: list[str],
    *,
    bits: int,
    dynamic: bool,
    symmetric: bool = False,
    quantizer_cls: type[InputQuantizer] | None = None,
    smooth: dict[str, int] | None = None,
) -> dict[str, InputQuantizer]:
    """Attach a fresh :class:`InputQuantizer` to each named module and record the edit.

    Every module is checked before any is changed. ``quantizer_cls`` builds a subclass
    instead (e.g. LSQ's trained-scale quantizer); the edit replays as a plain one, whose
    ``scale`` and ``zero_point`` then come from the state dict. ``smooth`` maps module names
    to their input channels: those quantizers get a ``smooth`` buffer (ones until set).

    Returns:
        The quantizers by module name (static ones still hold the placeholder grid ``s = 1``
        until an observer sets ``scale`` and ``zero_point``).

    Raises:
        UnsupportedModuleError: a module's input is already quantized (nothing is changed).
    """
    modules = dict(model.named_modules())
    for name in names:
        check_no_input_quantizer(name, modules[name])
    out = {}
    for name in names:
        out[name] = (quantizer_cls or InputQuantizer)(bits, dynamic=dynamic, symmetric=symmetric)
        attach_input_quantizer(name, modules[name], out[name])
        if smooth and name in smooth:
            out[name].add_smoothing(smooth[name])
    extra = {"smooth": dict(smooth)} if smooth else {}  # recorded only when used
    record_edit(model, "input_quant", modules=names, bits=bits, dynamic=dynamic,
                symmetric=symmetric, **extra)  # fmt: skip
    return out


@edit_op("input_quant")
def _replay_input_quant(model: nn.Module, edit: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    for name in edit["modules"]:
        quantizer = InputQuantizer(edit["bits"], dynamic=edit["dynamic"],
                                   symmetric=edit["symmetric"])  # fmt: skip
        attach_input_quantizer(name, modules[name], quantizer)
        if name in edit.get("smooth", {}):
            quantizer.add_smoothing(int(edit["smooth"][name]))
