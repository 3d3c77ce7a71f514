"""Physically remove channels: slice weights, biases and statistics; the ``shrink`` edit.

A *plan* says, per module, which output rows (``out``) and input columns (``in``) to keep.
:func:`shrink_modules` applies it in place — Conv, Linear, BatchNorm, LayerNorm and depthwise
convs get smaller tensors and matching ``in_channels``/``out_features``/... — and the plan is
recorded as one ``shrink`` edit so :func:`modelpress.load` replays it on a fresh model before
loading the saved tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.edits import edit_op, record_edit
from modelpress.errors import UnsupportedModuleError

Plan = dict[str, dict[str, list[int]]]  # module -> {"out": kept rows, "in": kept columns}
Attrs = dict[str, dict[str, int]]  # module -> attributes to set (e.g. num_attention_heads)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _take(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace ``module.<name>`` by its slice ``keep`` along ``dim`` (same tensor kind)."""
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, keep).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = new


def check_shrinkable(model: nn.Module, plan: Plan) -> None:
    """Raise before any change if a module in ``plan`` cannot be sliced.

    Raises:
        UnsupportedModuleError: the module is parametrized (masked or fake-quantized), or its
            type has no rule here.
    """
    modules = dict(model.named_modules())
    for name, axes in plan.items():
        module = modules.get(name)
        if module is None:
            raise UnsupportedModuleError(f"{name}: no such module to shrink in this model.")
        if parametrize.is_parametrized(module):
            raise UnsupportedModuleError(
                f"{name}: carries a mask or quantizer; run prune.structured before techniques "
                "that mask or quantize weights."
            )
        allowed = _axes(module)
        if allowed is None or not set(axes) <= allowed:
            raise UnsupportedModuleError(
                f"{name}: {type(module).__name__} cannot lose {'/'.join(sorted(axes))} "
                "channels in prune.structured."
            )


def _axes(module: nn.Module) -> set[str] | None:
    if isinstance(module, _CONVS):
        if module.groups == 1:
            return {"out", "in"}
        return {"out"} if module.groups == module.in_channels == module.out_channels else None
    if isinstance(module, nn.Linear):
        return {"out", "in"}
    if isinstance(module, (*_NORMS, nn.LayerNorm)):
        return {"out"}
    return None


def shrink_module(module: nn.Module, axes: dict[str, list[int]]) -> None:
    """Keep only ``axes["out"]`` rows / ``axes["in"]`` columns of one module, in place."""
    out = torch.as_tensor(axes["out"], dtype=torch.long) if "out" in axes else None
    inp = torch.as_tensor(axes["in"], dtype=torch.long) if "in" in axes else None
    if isinstance(module, _CONVS):
        depthwise = module.groups > 1
        if out is not None:
            _take(module, "weight", 0, out)
            _take(module, "bias", 0, out)
            module.out_channels = len(out)
            if depthwise:
                module.in_channels = module.groups = len(out)
        if inp is not None:
            _take(module, "weight", 1, inp)
            module.in_channels = len(inp)
    elif isinstance(module, nn.Linear):
        if out is not None:
            _take(module, "weight", 0, out)
            _take(module, "bias", 0, out)
            module.out_features = len(out)
        if inp is not None:
            _take(module, "weight", 1, inp)
            module.in_features = len(inp)
    elif isinstance(module, _NORMS) and out is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            _take(module, name, 0, out)
        module.num_features = len(out)
    elif isinstance(module, nn.LayerNorm) and out is not None:
        _take(module, "weight", 0, out)
        _take(module, "bias", 0, out)
        module.normalized_shape = (len(out),)


def shrink_modules(model: nn.Module, plan: Plan, attrs: Attrs | None = None) -> nn.Module:
    """Apply ``plan`` (and set ``attrs``) in place and record it as a ``shrink`` edit.

    Raises:
        UnsupportedModuleError: before any change, if some module cannot be sliced.
    """
    check_shrinkable(model, plan)
    _apply(model, {"plan": plan, "attrs": attrs or {}})
    record_edit(model, "shrink", plan=plan, attrs=attrs or {})
    return model


@edit_op("shrink")
def _apply(model: nn.Module, edit: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    for name, axes in edit["plan"].items():
        shrink_module(modules[name], axes)
    for name, values in edit.get("attrs", {}).items():
        for attr, value in values.items():
            setattr(modules[name], attr, value)
