"""Compression state that survives training, kept as ``torch.nn.utils.parametrize`` entries.

A pruning mask or a fake quantizer is registered on ``module.weight``; a plain optimizer step
updates ``parametrizations.weight.original`` and the forward pass always sees the compressed
weight. :func:`bake` removes them, leaving the compressed values as plain parameters.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

P = TypeVar("P", bound=nn.Module)


def find_parametrization(module: nn.Module, tensor_name: str, kind: type[P]) -> P | None:
    """The last parametrization of type ``kind`` on ``module.<tensor_name>``, or None."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    found = [p for p in module.parametrizations[tensor_name] if isinstance(p, kind)]
    return found[-1] if found else None


def parametrizations_of(module: nn.Module, tensor_name: str) -> list[nn.Module]:
    """The parametrizations on ``module.<tensor_name>``, in application order."""
    if not parametrize.is_parametrized(module, tensor_name):
        return []
    return list(module.parametrizations[tensor_name])


def add_parametrization(module: nn.Module, tensor_name: str, p: nn.Module) -> None:
    """Register ``p`` on ``module.<tensor_name>`` after any already there."""
    parametrize.register_parametrization(module, tensor_name, p, unsafe=False)


def parametrized_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified_name, module, tensor_name)`` for every parametrized tensor in ``model``."""
    out = []
    for mod_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name in module.parametrizations:
                qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                out.append((qual, module, tensor_name))
    return out


def bake(model: nn.Module) -> nn.Module:
    """Remove every parametrization in place, keeping the compressed values; returns ``model``.

    Do not bake a ``copy.deepcopy`` of a model that is still in use: the copy shares the
    parametrized classes with the original; use :func:`baked_copy`.
    """
    for _, module, tensor_name in parametrized_tensors(model):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parametrization baked in; ``model`` is untouched.

    ``copy.deepcopy`` keeps the dynamically created ``Parametrized*`` class of each module,
    and removing a parametrization deletes a property from that class, which would break
    the original. So each copied module first gets a class of its own.
    """
    clone = copy.deepcopy(model)
    done: set[int] = set()
    for _, module, _ in parametrized_tensors(clone):
        if id(module) not in done:
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            done.add(id(module))
    return bake(clone)


def effective_tensor(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor:
    """The tensor as the forward pass sees it (masks and quantizers applied), detached."""
    with torch.no_grad():
        return getattr(module, tensor_name).detach()


def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a baked copy would have, without copying: each parametrized tensor
    appears once under its plain name (``fc1.weight``) with its compressed value, in place of
    ``fc1.parametrizations.weight.original`` and the parametrizations' own buffers.
    """
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, sep, rest = key.partition("parametrizations.")
        if not sep or (prefix and not prefix.endswith(".")):
            out[key] = value
            continue
        tensor_name = rest.split(".", 1)[0]
        qual = prefix + tensor_name
        if qual not in out:
            out[qual] = effective_tensor(modules[prefix.rstrip(".")], tensor_name)
    return out
