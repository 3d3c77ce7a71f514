"""``export_onnx``: a compressed model as an ONNX file onnxruntime runs fast.

Modes:

* ``"quant"`` (default): every quantized layer becomes ONNX integer ops (see
  :mod:`modelpress.runtime.layers` for which), everything else is fp32 with masks and other
  parametrizations baked in.
* ``"fp32"``: every parametrization baked into float weights (pruned, shrunk, factorized or
  fake-quantized models alike); input quantizers become ``QuantizeLinear/DequantizeLinear``
  pairs so the outputs stay those of the torch model.
* ``"fp16"``: ``"fp32"`` cast to half precision (float inputs and outputs are fp16).

How: every layer that needs custom nodes is first swapped, in a baked copy of the model, for
a small module whose ``torch.autograd.Function`` computes the same result in torch and has a
``symbolic`` that emits the ONNX nodes; then the TorchScript exporter (``dynamo=False``:
``onnxscript`` is not a dependency) traces the copy. Layer names, shapes and the rest of the
graph come from the real model. The input model is never changed.

Early-exit models (``early_exit.branches``) are exported as their cascade: the backbone is cut
at each enabled exit and the exit tests become ``If`` branches, so the ONNX file stops at the
first confident exit per sample as the torch model does
(:mod:`modelpress.runtime.cascade`).
"""

from __future__ import annotations

import inspect
import itertools
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.parametrizations import baked_copy
from modelpress.runtime.cascade import PieceExporter, cascade_model
from modelpress.runtime.layers import WeightCodes, layer_kind, read_weight
from modelpress.runtime.nbits import NBitsEmbedding, NBitsLinear
from modelpress.runtime.qdq import DynamicInt8Layer, QDQLayer, QuantizedInput
from modelpress.techniques.early_exit.model import EarlyExitModel
from modelpress.techniques.quantization.activation import ATTR, InputQuantizer, input_quantizer

MODES = ("quant", "fp32", "fp16")
OPSET = 17  # LayerNormalization is one op from 17; onnxruntime 1.18+ runs it
CONTRIB = "com.microsoft"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: Path
    mode: str
    bytes: int  # size of the .onnx file
    input_names: list[str]
    output_names: list[str]
    layers: dict[str, str] = field(default_factory=dict)  # quantized layer -> export kind


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any],
    path: str | Path,
    *,
    mode: str = "quant",
    opset: int = OPSET,
    dynamic: bool = True,
) -> ExportResult:
    """Export ``model`` to an ONNX file at ``path`` (written atomically).

    Args:
        model: the (compressed) model; it is copied, never changed.
        example_inputs: one batch, called as ``model(x)``, ``model(*xs)`` or ``model(**kw)``
            (Hugging Face encoders: ``{"input_ids": ..., "attention_mask": ...}``). Its keys,
            or the names of ``model.forward``'s parameters, become the ONNX input names.
        path: the ``.onnx`` file to write.
        mode: ``"quant"``, ``"fp32"`` or ``"fp16"`` (see the module docstring).
        opset: ONNX opset of the default domain, 17..20.
        dynamic: make the batch axis (and the sequence axis of integer token inputs) dynamic.
            An early-exit model's batch axis is always dynamic: samples leave it.

    Returns:
        An :class:`ExportResult` (file size, input/output names, kind of each quantized layer).

    Raises:
        ConfigError: an unknown ``mode`` or ``opset`` out of range.
        DataError: ``example_inputs`` is not tensors, or the model returns non-tensors.
        UnsupportedModuleError: a layer cannot be exported in ``mode`` (names the layer), or
            an early-exit model cannot be cut at its exits; raised before anything is written.
    """
    if mode not in MODES:
        raise ConfigError(f"The 'mode' parameter of export_onnx must be one of {MODES}. "
                          f"Got {mode!r} instead.")  # fmt: skip
    if isinstance(opset, bool) or not isinstance(opset, int) or not 17 <= opset <= 20:
        raise ConfigError(f"The 'opset' parameter of export_onnx must be an int in [17, 20]. "
                          f"Got {opset!r} instead.")  # fmt: skip
    names, tensors, as_kwargs = _inputs(model, example_inputs)
    replacements, kinds = _replacements(model, mode)
    clone = baked_copy(model).eval()
    for name, module in replacements.items():
        clone.set_submodule(name, module)
    if mode == "fp16":
        clone = clone.half()
        tensors = [t.half() if t.is_floating_point() else t for t in tensors]
    dest = Path(path).expanduser()
    contrib = any(k in ("nbits", "gather_nbits") for k in kinds.values())
    early_exit = _early_exit(clone, tensors)
    if early_exit is not None:
        with tempfile.TemporaryDirectory() as tmp:
            graph = cascade_model(early_exit, tensors[0], _piece_exporter(Path(tmp), opset, contrib),
                                  input_name=names[0], output_name="output", opset=opset)  # fmt: skip
        _atomically(dest, lambda tmp_path: onnx.save(graph, str(tmp_path)))
        return ExportResult(dest, mode, dest.stat().st_size, names, ["output"], kinds)
    flat = _Flat(clone, names if as_kwargs else None).eval()
    with torch.no_grad():
        outputs = flat(*tensors)
    output_names = flat.output_names
    axes = _dynamic_axes(names, tensors, output_names, outputs) if dynamic else None
    _write(flat, tuple(tensors), dest, names, output_names, axes, opset, contrib)
    return ExportResult(dest, mode, dest.stat().st_size, names, output_names, kinds)


def _early_exit(model: nn.Module, tensors: list[Tensor]) -> EarlyExitModel | None:
    """``model`` if it is an early-exit model with an exit that can fire (exported as its
    cascade), else None (exported by tracing, exact when no exit can fire).

    Raises:
        UnsupportedModuleError: exits inside a wrapper, or more than one input.
    """
    inner = [name for name, m in model.named_modules() if isinstance(m, EarlyExitModel)]
    if not inner:
        return None
    if inner != [""]:
        raise UnsupportedModuleError(
            f"{inner[0]}: an early-exit model can be exported only as the top-level model; "
            "export it on its own."
        )
    if all(t is None for t in model.threshold_values()):  # type: ignore[operator]
        return None
    if len(tensors) != 1:
        raise UnsupportedModuleError(
            f"early_exit export: the model takes {len(tensors)} inputs; export supports one."
        )
    return model  # type: ignore[return-value]


def _piece_exporter(folder: Path, opset: int, contrib: bool) -> PieceExporter:
    """Exports one piece of an early-exit model (one tensor in and out) through ``folder``."""
    count = itertools.count()

    def export_piece(module: nn.Module, x: Tensor) -> onnx.ModelProto:
        flat = _Flat(module, None).eval()
        with torch.no_grad():
            outputs = flat(x)
        path = folder / f"piece{next(count)}.onnx"
        axes = _dynamic_axes(["x"], [x], flat.output_names, outputs)
        _write(flat, (x,), path, ["x"], flat.output_names, axes, opset, contrib)
        return onnx.load(str(path))

    return export_piece


def _inputs(model: nn.Module, example_inputs: Any) -> tuple[list[str], list[Tensor], bool]:
    """``(names, tensors, as_kwargs)`` of one batch of example inputs. Positional inputs are
    named after the parameters of ``model.forward`` (``input_0``... if it takes ``*args``).

    Raises:
        DataError: not a Tensor, a tuple/list of tensors or a mapping of tensors.
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        names, values, as_kwargs = list(example_inputs), list(example_inputs.values()), True
    elif isinstance(example_inputs, (tuple, list)) and example_inputs:
        values, as_kwargs = list(example_inputs), False
        names = _positional_names(model, len(values))
    else:
        values = [None]
    if not all(isinstance(v, Tensor) for v in values):
        raise DataError(
            "example_inputs must be a Tensor, a tuple of tensors or a dict of keyword tensors "
            f"(one batch). Got {type(example_inputs).__name__} instead."
        )
    return names, [v.detach() for v in values], as_kwargs


def _positional_names(model: nn.Module, count: int) -> list[str]:
    """The first ``count`` positional parameter names of ``model.forward``, or ``input_i``."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in params if p.kind in kinds]
    except (TypeError, ValueError):
        names = []
    if len(names) >= count:
        return names[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _replacements(model: nn.Module, mode: str) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The module to put at each name of a baked copy, and the kind of each quantized layer.

    Everything is built (and so checked) before the caller changes anything. A disabled
    input quantizer (calibration unfinished) stays as it is: the layer computes in float.
    """
    out: dict[str, nn.Module] = {}
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if ".parametrizations." in f".{name}." or not name:
            continue
        quantizer = input_quantizer(module)
        if quantizer is not None and not quantizer.enabled:
            if mode == "quant" and read_weight(module) is not None:
                raise UnsupportedModuleError(
                    f"{name}: its input quantizer is disabled (calibration unfinished?); "
                    "enable it, or export with mode='fp32'."
                )
            continue
        if mode == "fp16" and quantizer is not None:
            raise UnsupportedModuleError(
                f"{name}: its input is quantized; export it with mode 'quant' or 'fp32' "
                "(QuantizeLinear takes no fp16 input at opset 17)."
            )
        if mode != "quant":
            if quantizer is not None:
                out[f"{name}.{ATTR}"] = QuantizedInput(quantizer)
            continue
        weight = read_weight(module)
        kind = layer_kind(name, module, weight, quantizer)
        if kind is not None and weight is not None:
            out[name] = _build(kind, name, module, weight, quantizer)
            kinds[name] = kind
    return out, kinds


def _build(
    kind: str,
    name: str,
    module: nn.Module,
    weight: WeightCodes,
    quantizer: InputQuantizer | None,
) -> nn.Module:
    """The export module of ``kind`` for ``module``."""
    if kind == "int8_dynamic":
        return DynamicInt8Layer(name, module, weight, quantizer)  # type: ignore[arg-type]
    if kind == "qdq_static":
        return QDQLayer(name, module, weight, quantizer)
    if kind == "nbits":
        return NBitsLinear(name, module, weight)  # type: ignore[arg-type]
    if kind == "gather_nbits":
        return NBitsEmbedding(name, module, weight)  # type: ignore[arg-type]
    return QDQLayer(name, module, weight)  # dq_weight


class _Flat(nn.Module):
    """Calls the model with positional (or keyword) tensors and returns a flat tuple of
    output tensors; ``output_names`` is set by the first call."""

    def __init__(self, model: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model, self.keys = model, keys
        self.output_names: list[str] = []

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if self.keys is None:
            out = self.model(*tensors)
        else:
            out = self.model(**dict(zip(self.keys, tensors, strict=True)))
        pairs = _flatten(out)
        self.output_names = [n for n, _ in pairs]
        return tuple(t for _, t in pairs)


def _flatten(out: Any) -> list[tuple[str, Tensor]]:
    """Named output tensors: a tensor, a tuple of tensors, or a mapping (Hugging Face
    ``ModelOutput``); None entries are dropped.

    Raises:
        DataError: an output that is not a tensor.
    """
    if isinstance(out, Tensor):
        pairs = [("output", out)]
    elif isinstance(out, Mapping):
        pairs = [(str(k), v) for k, v in out.items() if v is not None]
    elif isinstance(out, (tuple, list)):
        pairs = [(f"output_{i}", v) for i, v in enumerate(out) if v is not None]
    else:
        pairs = [("output", out)]
    bad = [n for n, v in pairs if not isinstance(v, Tensor)]
    if bad or not pairs:
        raise DataError(
            f"the model returns {type(out).__name__} with non-tensor outputs {bad}; ONNX export "
            "needs tensors (or a tuple/dict of them)."
        )
    return pairs


def _dynamic_axes(
    names: list[str], inputs: list[Tensor], output_names: list[str], outputs: tuple[Tensor, ...]
) -> dict[str, dict[int, str]]:
    """Batch axis 0 of every input and output; axis 1 of integer (token) inputs, and of
    outputs whose axis 1 has the token inputs' length, is the sequence."""
    batch = inputs[0].shape[0] if inputs[0].dim() else None
    seq = next((t.shape[1] for t in inputs if not t.is_floating_point() and t.dim() >= 2), None)
    axes: dict[str, dict[int, str]] = {}
    for name, t in [*zip(names, inputs, strict=True), *zip(output_names, outputs, strict=True)]:
        ax: dict[int, str] = {}
        if t.dim() >= 1 and t.shape[0] == batch:
            ax[0] = "batch"
        if seq is not None and t.dim() >= 2 and t.shape[1] == seq:
            ax[1] = "sequence"
        if ax:
            axes[name] = ax
    return axes


def _write(
    flat: nn.Module,
    args: tuple[Tensor, ...],
    dest: Path,
    names: list[str],
    output_names: list[str],
    axes: dict[str, dict[int, str]] | None,
    opset: int,
    contrib: bool,
) -> None:
    """Trace ``flat`` into ``dest`` (atomically); ``contrib`` declares onnxruntime's
    ``com.microsoft`` domain."""

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():  # the TorchScript exporter and HF tracing warn a lot
            warnings.simplefilter("ignore")
            torch.onnx.export(flat, args, str(tmp), input_names=names,
                              output_names=output_names, dynamic_axes=axes,
                              opset_version=opset, custom_opsets={CONTRIB: 1} if contrib else None,
                              do_constant_folding=True, dynamo=False)  # fmt: skip

    _atomically(dest, export)


def _atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file in ``dest``'s folder, then rename it to ``dest``: a failed
    export leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
