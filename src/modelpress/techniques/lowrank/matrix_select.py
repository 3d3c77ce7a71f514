"""What ``lowrank.svd`` and ``lowrank.tt`` share: picking the Linear and Embedding layers to
factorize (checked before anything changes), their weights as matrices.

A weight is seen in the Linear convention, ``(out, in)``: an Embedding of ``num`` rows of width
``dim`` is the Linear that maps a one-hot row ``(num,)`` to its embedding, weight ``W.T``
``(dim, num)``. So one factorization covers both, and ``in`` of an Embedding is its vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.config import TargetedConfig
from modelpress.errors import UnsupportedModuleError
from modelpress.targeting import select_weighted

MATRIX_LAYERS = (nn.Linear, nn.Embedding)
Selected = list[tuple[str, nn.Linear | nn.Embedding]]


def select_matrices(model: nn.Module, cfg: TargetedConfig, owner: str) -> Selected:
    """The Linear/Embedding layers picked by ``cfg.targets``/``cfg.ignore``, checked.

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: a selected leaf that is not Linear/Embedding, a layer that
            carries a mask or quantizer (factorize before masking or quantizing), or an
            Embedding with ``max_norm`` (its lookup rewrites rows).
    """
    picked = select_weighted(model, cfg, owner=owner, supported=MATRIX_LAYERS)
    for name, module in picked:
        if parametrize.is_parametrized(module):
            raise UnsupportedModuleError(
                f"{name}: carries a mask or quantizer; run {owner} before techniques that "
                "mask or quantize weights."
            )
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise UnsupportedModuleError(
                f"{name}: an Embedding with max_norm={module.max_norm} renormalises the rows it "
                f"looks up, which {owner} cannot reproduce; add it to 'ignore'."
            )
    return picked  # type: ignore[return-value]


def shared_weights(model: nn.Module, picked: Selected) -> dict[str, str]:
    """Layers whose weight is also held by another module (tied embeddings, a module reused
    under two names), as ``{name: reason}``: factorizing one holder keeps the full matrix in
    the other, so it would not reduce parameters."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    out = {}
    for name, module in picked:
        others = [n for n in holders.get(id(module.weight), []) if n != name]
        if others:
            out[name] = (
                f"its weight is shared with {others[0]} (tied); factorizing it would not "
                "reduce parameters"
            )
    return out


def as_matrix(module: nn.Linear | nn.Embedding) -> torch.Tensor:
    """The weight in the Linear convention, float64: ``(out, in)``, or ``W.T`` ``(dim, num)``
    for an Embedding."""
    weight = module.weight.detach().double()
    return weight.T if isinstance(module, nn.Embedding) else weight


def matrix_shape(module: nn.Linear | nn.Embedding) -> tuple[int, int]:
    """``(out, in)`` of the Linear-convention matrix (``(dim, num)`` for an Embedding)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    return module.out_features, module.in_features


def input_rows(shapes: dict[str, tuple[int, ...]], name: str, module: nn.Module) -> int:
    """Rows (tokens or samples) a layer multiplies per forward pass of the example inputs:
    ``prod(input_shape[:-1])`` for a Linear, ``prod(input_shape)`` for an Embedding; 1 when
    the layer did not run on them (or there are none)."""
    shape = shapes.get(name)
    if shape is None:
        return 1
    return math.prod(shape if isinstance(module, nn.Embedding) else shape[:-1]) or 1
