"""``lowrank.tt``: tensor-train factorization of Linear and Embedding weights.

Novikov et al. 2015 ("Tensorizing Neural Networks"): a Linear ``W`` ``(out, in)`` with
``out = ∏ m_k`` and ``in = ∏ n_k`` is stored as a TT-matrix with cores ``(r_{k-1}, m_k, n_k,
r_k)`` and applied by contracting one core at a time (:class:`TTLinear`); an Embedding
``(num, dim)`` with ``num = ∏ n_k`` (``in_factors``) and ``dim = ∏ m_k`` (``out_factors``) keeps
cores ``(r_{k-1}, n_k, m_k, r_k)`` and builds only the rows it looks up (:class:`TTEmbedding`,
as in TT-embeddings, Hrinchuk et al. 2020). The cores come from TT-SVD (Oseledets 2011) through
tensorly; the TT ranks are capped by ``max_rank`` and, with ``accuracy``, chosen so the relative
error is at most ``accuracy`` (see :mod:`~.tt_math`). Without either, the ranks are full and
the layer is reproduced exactly.

The factors of each dimension are ``in_factors``/``out_factors`` when given (their product must
be the layer's dimension), else ``n_cores`` balanced factors (:func:`~.tt_math.balanced_factors`).
A layer is left dense only when its TT form would not have fewer parameters, and the stage
report says so. An Embedding's ``padding_idx`` row is approximated like any other.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.edits import edit_op, record_edit
from modelpress.errors import UnsupportedModuleError
from modelpress.registry import technique
from modelpress.techniques.lowrank.layer_cost import (
    compare_layers,
    layer_input_shapes,
    relative_error,
)
from modelpress.techniques.lowrank.matrix_select import (
    Selected,
    select_matrices,
    shared_weights,
)
from modelpress.techniques.lowrank.tt_math import (
    accuracy_ranks,
    balanced_factors,
    contract_linear,
    full_ranks,
    gather_rows,
    tt_cores,
    tt_matrix,
    tt_params,
)

OWNER = "lowrank.tt"
Factors = list[Annotated[int, Field(ge=1)]]


class TTConfig(TargetedConfig):
    """Tensor-train factorization of Linear and Embedding weights (TT-SVD)."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Embedding"],
        description="Modules to factorize: exact names, type names or 're:' regexes.",
    )
    n_cores: int = Field(3, ge=2, le=8, description="Cores per layer when factors are automatic.")
    in_factors: Factors | None = Field(
        None, description="Factors of the input width (Embedding: rows); automatic if unset."
    )
    out_factors: Factors | None = Field(
        None, description="Factors of the output width (Embedding: dim); automatic if unset."
    )
    max_rank: int | None = Field(8, ge=1, le=4096, description="Largest TT rank (null: no cap).")
    accuracy: float | None = Field(
        None, gt=0, lt=1, description="Smallest ranks with relative error at most this."
    )

    @model_validator(mode="after")
    def _same_cores(self) -> TTConfig:
        given = [f for f in (self.in_factors, self.out_factors) if f is not None]
        if any(not 2 <= len(f) <= 8 for f in given):
            raise ValueError("'in_factors' and 'out_factors' need 2 to 8 factors each")
        if len(given) == 2 and len(given[0]) != len(given[1]):
            raise ValueError("'in_factors' and 'out_factors' need the same number of factors")
        return self

    @property
    def cores(self) -> int:
        """The number of cores: from the factors when given, else ``n_cores``."""
        given = self.in_factors or self.out_factors
        return len(given) if given else self.n_cores


def _init_cores(shapes: list[tuple[int, int, int, int]], like: torch.Tensor) -> nn.ParameterList:
    return nn.ParameterList(
        nn.Parameter(torch.empty(s, dtype=like.dtype, device=like.device)) for s in shapes
    )


def _core_shapes(rows: list[int], cols: list[int], ranks: list[int]) -> list:
    return [(ranks[k], a, b, ranks[k + 1]) for k, (a, b) in enumerate(zip(rows, cols, strict=True))]


class TTLinear(nn.Module):
    """A Linear whose weight ``(out, in)`` is a TT-matrix: cores ``(r_{k-1}, m_k, n_k, r_k)``."""

    def __init__(self, linear: nn.Linear, in_factors: list[int], out_factors: list[int],
                 ranks: list[int]) -> None:  # fmt: skip
        super().__init__()
        self.in_factors, self.out_factors, self.ranks = in_factors, out_factors, ranks
        self.cores = _init_cores(_core_shapes(out_factors, in_factors, ranks), linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` → ``(..., out)`` by :func:`~.tt_math.contract_linear`."""
        y = contract_linear(x.reshape(-1, x.shape[-1]), list(self.cores))  # (B, out)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class TTEmbedding(nn.Module):
    """An Embedding whose table ``(num, dim)`` is a TT-matrix: cores ``(r_{k-1}, n_k, m_k,
    r_k)``, rows over the vocabulary factors ``n_k``."""

    def __init__(self, embedding: nn.Embedding, in_factors: list[int], out_factors: list[int],
                 ranks: list[int]) -> None:  # fmt: skip
        super().__init__()
        self.in_factors, self.out_factors, self.ranks = in_factors, out_factors, ranks
        self.cores = _init_cores(_core_shapes(in_factors, out_factors, ranks), embedding.weight)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` → ``(..., dim)`` by :func:`~.tt_math.gather_rows`."""
        rows = gather_rows(index.reshape(-1), list(self.cores))  # (N, dim)
        return rows.reshape(*index.shape, rows.shape[-1])


def layer_factors(name: str, module: nn.Module, cfg: TTConfig) -> tuple[list[int], list[int]]:
    """``(in_factors, out_factors)`` of one layer: as configured, or balanced.

    Raises:
        UnsupportedModuleError: configured factors whose product is not the layer's width.
    """
    if isinstance(module, nn.Embedding):
        dims = {"in": module.num_embeddings, "out": module.embedding_dim}
    else:
        dims = {"in": module.in_features, "out": module.out_features}
    out = []
    for side, given in (("in", cfg.in_factors), ("out", cfg.out_factors)):
        if given is not None and math.prod(given) != dims[side]:
            raise UnsupportedModuleError(
                f"{name}: its {side} width {dims[side]} is not the product of "
                f"{side}_factors {given} (= {math.prod(given)}); set factors that multiply to "
                f"{dims[side]} or leave {side}_factors unset."
            )
        out.append(list(given) if given is not None else balanced_factors(dims[side], cfg.cores))
    return out[0], out[1]


def tt_layer(
    module: nn.Linear | nn.Embedding,
    in_factors: list[int],
    out_factors: list[int],
    max_rank: int | None = None,
    accuracy: float | None = None,
) -> TTLinear | TTEmbedding:
    """The TT form of ``module`` from TT-SVD (:func:`~.tt_math.tt_cores`).

    Args:
        module: a Linear or Embedding.
        in_factors: factors of ``in`` (Embedding: ``num_embeddings``).
        out_factors: factors of ``out`` (Embedding: ``embedding_dim``).
        max_rank: cap on every TT rank (None: none).
        accuracy: choose the smallest ranks with relative error at most this
            (:func:`~.tt_math.accuracy_ranks`); None: full ranks (exact), then the cap.

    Returns:
        A :class:`TTLinear` or :class:`TTEmbedding` in the module's dtype and device.
    """
    embedding = isinstance(module, nn.Embedding)
    rows, cols = (in_factors, out_factors) if embedding else (out_factors, in_factors)
    matrix = module.weight.detach().double()  # (num, dim) or (out, in)
    ranks = (accuracy_ranks(matrix, rows, cols, accuracy) if accuracy is not None
             else full_ranks(rows, cols))  # fmt: skip
    ranks = [min(r, max_rank) if max_rank is not None else r for r in ranks]
    cores = tt_cores(matrix, rows, cols, ranks)
    ranks = [1, *(int(c.shape[-1]) for c in cores)]  # as TT-SVD realised them
    cls = TTEmbedding if embedding else TTLinear
    layer = cls(module, in_factors, out_factors, ranks)  # type: ignore[arg-type]
    with torch.no_grad():
        for param, core in zip(layer.cores, cores, strict=True):
            param.copy_(core)
    return layer


def fit_error(module: nn.Module, layer: TTLinear | TTEmbedding) -> float:
    """``||W - Ŵ||_F / ||W||_F`` of the TT form against the dense weight."""
    return relative_error(module.weight, tt_matrix([c.detach().double() for c in layer.cores]))


def _record(module: nn.Module, layer: nn.Module) -> dict[str, Any]:
    bias = 0 if getattr(module, "bias", None) is None else module.bias.numel()
    rows, cols = [c.shape[1] for c in layer.cores], [c.shape[2] for c in layer.cores]
    return {"in_factors": layer.in_factors, "out_factors": layer.out_factors,
            "ranks": layer.ranks, "params_before": module.weight.numel() + bias,
            "params_after": tt_params(rows, cols, layer.ranks) + bias,
            "fit_error": round(fit_error(module, layer), 6)}  # fmt: skip


def _build(layers: Selected, cfg: TTConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Each layer's TT form, and the layers left dense (TT not smaller) with the reason."""
    factors = {n: layer_factors(n, m, cfg) for n, m in layers}  # checks every layer first
    built, skipped = {}, {}
    for name, module in layers:
        layer = tt_layer(module, *factors[name], max_rank=cfg.max_rank, accuracy=cfg.accuracy)
        after = sum(c.numel() for c in layer.cores)
        if after >= module.weight.numel():
            skipped[name] = (f"TT ranks {layer.ranks} need {after} weights, not fewer than the "
                             f"dense {module.weight.numel()}")  # fmt: skip
        else:
            built[name] = layer
    return built, skipped


@technique(OWNER, TTConfig)
def apply_tt(model: nn.Module, cfg: TTConfig, ctx: Context) -> nn.Module:
    """Factor Linear/Embedding weights into tensor-train matrices (Novikov et al. 2015).

    Each weight is reshaped by its in/out factors and decomposed by TT-SVD (Oseledets 2011,
    through tensorly), ranks capped by ``max_rank`` or chosen for ``accuracy``
    (:func:`tt_layer`); everything is checked and computed before the model changes.

    Args:
        model: the model, changed in place.
        cfg: factors (or ``n_cores``), ``max_rank``/``accuracy`` and ``targets``/``ignore``.
        ctx: example inputs, for per-layer FLOPs and latency (omitted without them).

    Returns:
        The model. The stage record holds ``layers`` (per layer factors, ``ranks``,
        ``params_before``/``params_after``, ``fit_error`` and with example inputs the
        :class:`~.layer_cost.LayerCost` record), ``skipped`` (layers left dense and why) and
        ``slower`` (layers that measured slower than the original).

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: a selected layer is masked/quantized, not Linear/Embedding, an
            Embedding with ``max_norm``, or its width is not the product of the configured
            factors; or no layer has a smaller TT form.
    """
    picked = select_matrices(model, cfg, OWNER)
    skipped = shared_weights(model, picked)
    layers = [(n, m) for n, m in picked if n not in skipped]
    built, dense = _build(layers, cfg)
    skipped |= dense
    if not built:
        first = next(iter(skipped.items()))
        raise UnsupportedModuleError(f"{OWNER}: no selected layer has a smaller TT form; e.g. "
                                     f"{first[0]}: {first[1]}.")  # fmt: skip
    modules = dict(layers)
    shapes = layer_input_shapes(model, list(built), ctx.example_inputs)
    records = {n: _record(modules[n], layer) for n, layer in built.items()}
    costs, slower = compare_layers(OWNER, modules, built, shapes)  # type: ignore[arg-type]
    for name, layer in built.items():
        model.set_submodule(name, layer)
        records[name] |= costs.get(name, {})
    edit = {n: {k: records[n][k] for k in ("in_factors", "out_factors", "ranks")} for n in built}
    record_edit(model, "lowrank_tt", layers=edit)
    ctx.report("layers", records)
    ctx.report("skipped", skipped)
    if slower:
        ctx.report("slower", slower)
    return model


@edit_op("lowrank_tt")
def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    for name, spec in edit["layers"].items():
        module = model.get_submodule(name)
        cls = TTEmbedding if isinstance(module, nn.Embedding) else TTLinear
        args = [list(map(int, spec[k])) for k in ("in_factors", "out_factors", "ranks")]
        model.set_submodule(name, cls(module, *args))  # type: ignore[arg-type]
