"""``lowrank.svd``: truncated SVD of Linear and Embedding weights into two smaller layers.

A Linear ``W`` ``(out, in)`` becomes ``Linear(in, r, bias=False)`` then ``Linear(r, out, bias)``;
an Embedding ``(num, dim)`` becomes ``Embedding(num, r)`` then ``Linear(r, dim, bias=False)``
(:class:`LowRank`, whose ``first``/``second`` are plain modules that later stages such as
``quant.rtn`` or ``prune.*`` can target). The factors come from the truncated SVD
(Eckart–Young) or, with ``whiten: true``, from the SVD of the weight whitened by the layer's
calibration inputs (SVD-LLM, Wang et al. 2024); see :mod:`~.svd_math`. Whitening applies to
Linear layers; Embeddings are factored plainly (weighting their rows by token frequency, the
whitening of a one-hot input, is not implemented) and their records say ``whitened: false``.

The rank of each layer comes from one rule: an ``energy`` threshold (the default, 0.95), an
explicit ``rank`` or ``rank_ratio`` of the full rank ``min(in, out)``, or a model-wide budget
(``params_ratio`` / ``flops_ratio`` of the selected layers) solved by :mod:`~.svd_budget`;
ranks are rounded up to a multiple of ``round_to``. A layer is left dense only when
factorizing it would not reduce its parameters (``r · (in + out) ≥ in · out``, a weight shared
with another module, or a budget that affords the dense layer), and the stage report says so.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import skip_init

from modelpress.context import Context
from modelpress.edits import edit_op, record_edit
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.layerwise import calibrate_layerwise
from modelpress.registry import technique
from modelpress.techniques.lowrank.layer_cost import compare_layers, layer_input_shapes
from modelpress.techniques.lowrank.matrix_select import (
    Selected,
    as_matrix,
    input_rows,
    matrix_shape,
    select_matrices,
    shared_weights,
)
from modelpress.techniques.lowrank.rank_rule import RankRuleConfig, round_rank
from modelpress.techniques.lowrank.svd_budget import LayerCosts, budget_ranks, smallest_cost
from modelpress.techniques.lowrank.svd_math import (
    Gram,
    Spectrum,
    energy_rank,
    plain_spectrum,
    whitened_spectrum,
    whitening_factor,
)

OWNER = "lowrank.svd"


class SVDConfig(RankRuleConfig):
    """Truncated (optionally activation-aware) SVD of Linear and Embedding weights."""

    RULES: ClassVar[tuple[str, ...]] = (
        "energy",
        "rank",
        "rank_ratio",
        "params_ratio",
        "flops_ratio",
    )
    DEFAULT_RULE: ClassVar[tuple[str, float]] = ("energy", 0.95)

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Embedding"],
        description="Modules to factorize: exact names, type names or 're:' regexes.",
    )
    energy: float | None = Field(
        None, gt=0, le=1, description="Keep this fraction of sum(sigma^2) (default rule: 0.95)."
    )
    rank: int | None = Field(None, ge=1, le=1_000_000, description="The same rank everywhere.")
    rank_ratio: float | None = Field(
        None, gt=0, le=1, description="Rank as a fraction of each layer's full rank."
    )
    params_ratio: float | None = Field(
        None, gt=0, lt=1, description="Budget: keep this fraction of the layers' weights."
    )
    flops_ratio: float | None = Field(
        None, gt=0, lt=1, description="Budget: keep this fraction of the layers' FLOPs."
    )
    whiten: bool = Field(
        False, description="Activation-aware: whiten Linear weights by calibration inputs."
    )
    damping: float = Field(
        0.01, ge=0, le=1, description="Whitening: lambda as a fraction of mean diag(X^T X)."
    )
    n_samples: int = Field(128, ge=1, le=1_000_000, description="Whitening: samples.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Whitening: samples per pass.")


class LowRank(nn.Module):
    """``second(first(x))``: a Linear or Embedding factored through rank ``r``.

    ``first`` is ``Linear(in, r, bias=False)`` or ``Embedding(num, r)``; ``second`` is
    ``Linear(r, out)`` holding the original bias (none after an Embedding).
    """

    def __init__(self, first: nn.Linear | nn.Embedding, second: nn.Linear) -> None:
        super().__init__()
        self.first = first
        self.second = second

    @classmethod
    def shaped_like(cls, module: nn.Linear | nn.Embedding, rank: int) -> LowRank:
        """An uninitialised LowRank of rank ``rank`` replacing ``module`` (same device, dtype,
        bias, and Embedding options)."""
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        if isinstance(module, nn.Embedding):
            first: nn.Module = skip_init(
                nn.Embedding, module.num_embeddings, rank, padding_idx=module.padding_idx,
                scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, **kw,
            )  # fmt: skip
            second = skip_init(nn.Linear, rank, module.embedding_dim, bias=False, **kw)
        else:
            first = skip_init(nn.Linear, module.in_features, rank, bias=False, **kw)
            second = skip_init(nn.Linear, rank, module.out_features,
                               bias=module.bias is not None, **kw)  # fmt: skip
        return cls(first, second)  # type: ignore[arg-type]

    @property
    def rank(self) -> int:
        """``r``."""
        return self.second.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight the pair computes, in the replaced module's layout (``(out, in)``
        or ``(num, dim)``), for code that reads ``.weight`` (dtype, device, shape)."""
        product = self.second.weight @ (
            self.first.weight.T if isinstance(self.first, nn.Embedding) else self.first.weight
        )  # (out, in) or (dim, num)
        return product.T if isinstance(self.first, nn.Embedding) else product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` (or indices) → ``(..., out)``, as the replaced module."""
        return self.second(self.first(x))  # (..., r) → (..., out)


def low_rank(module: nn.Linear | nn.Embedding, spectrum: Spectrum, rank: int) -> LowRank:
    """The :class:`LowRank` of ``module`` at ``rank`` from its SVD (:meth:`Spectrum.factors`).

    Args:
        module: the Linear or Embedding; ``spectrum`` is of its Linear-convention matrix
            (:func:`~.matrix_select.as_matrix`).
        spectrum: the plain or whitened SVD.
        rank: ``r``, at most the full rank; at the full rank the pair computes ``module``.

    Returns:
        The pair, in the module's dtype and on its device.
    """
    pair = LowRank.shaped_like(module, rank)
    first, second = spectrum.factors(rank)  # (r, in), (out, r)
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            pair.first.weight.copy_(first.T)  # (num, r)
        else:
            pair.first.weight.copy_(first)
        pair.second.weight.copy_(second)
        if getattr(module, "bias", None) is not None:
            pair.second.bias.copy_(module.bias)
    return pair


def factorize(module: nn.Linear | nn.Embedding, rank: int) -> LowRank:
    """The plain truncated-SVD :class:`LowRank` of ``module`` at ``rank`` (Eckart–Young)."""
    return low_rank(module, plain_spectrum(as_matrix(module)), rank)


def rule_rank(spectrum: Spectrum, rule: str, value: float, round_to: int) -> int:
    """The rank of one layer under a per-layer rule (``energy``, ``rank``, ``rank_ratio``),
    rounded up to a multiple of ``round_to`` and at most the full rank."""
    q = spectrum.full_rank
    if rule == "energy":
        r = energy_rank(spectrum, value)
    elif rule == "rank":
        r = min(int(value), q)
    else:
        r = max(1, math.ceil(value * q))
    return round_rank(r, round_to, q)


class _GramCollector:
    """The layer-wise callback that only records ``XᵀX`` of each layer (changes nothing)."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}

    def stats(self, name: str, module: nn.Module) -> Gram:
        return Gram(module.in_features)

    def process(self, name: str, module: nn.Module, stats: Gram) -> None:
        self.grams[name] = stats.matrix


def _spectra(
    model: nn.Module, layers: Selected, cfg: SVDConfig, ctx: Context
) -> dict[str, Spectrum]:
    """Each layer's SVD: whitened for Linear layers when ``cfg.whiten``, else plain."""
    grams: dict[str, torch.Tensor] = {}
    linears = [(n, m) for n, m in layers if isinstance(m, nn.Linear)]
    if cfg.whiten and linears:
        batches = list(ctx.calibration_batches(cfg.n_samples, cfg.batch_size))
        collector = _GramCollector()
        calibrate_layerwise(model, batches, linears, collector, owner=OWNER)
        grams = collector.grams
    out = {}
    for name, module in layers:
        weight = as_matrix(module)
        if name in grams:
            out[name] = whitened_spectrum(weight, whitening_factor(grams[name], cfg.damping, name))
        else:
            out[name] = plain_spectrum(weight)
    return out


def _rank_costs(
    layers: Selected, cfg: SVDConfig, rows: dict[str, int]
) -> dict[str, tuple[float, float]]:
    """``(cost per rank, dense cost)`` of each layer in the budget's unit (params or FLOPs)."""
    out = {}
    for name, module in layers:
        out_f, in_f = matrix_shape(module)
        scale = 2.0 * rows[name] if cfg.flops_ratio is not None else 1.0
        out[name] = (scale * (in_f + out_f), scale * in_f * out_f)
    return out


def _budget(
    layers: Selected, spectra: dict[str, Spectrum], cfg: SVDConfig, rows: dict[str, int]
) -> tuple[dict[str, int], dict[str, str]]:
    """Ranks under a ``params_ratio``/``flops_ratio`` budget (:func:`~.svd_budget.budget_ranks`)
    over the layers that can be factorized at all; the others and the ones the budget keeps
    dense, with the reason."""
    key, ratio = cfg.rule
    costs = _rank_costs(layers, cfg, rows)
    step, ranks, skipped = cfg.round_to, {}, {}
    fit = {n: LayerCosts(spectra[n].energies(), *costs[n]) for n, _ in layers}
    for name, layer in list(fit.items()):
        if layer.max_rank(step) == 0:
            skipped[name] = f"even rank {step} costs {step * layer.rank_cost:g}, not less " \
                            f"than the dense layer's {layer.dense_cost:g}"  # fmt: skip
            del fit[name]
    if not fit:
        return ranks, skipped
    total = sum(layer.dense_cost for layer in fit.values())
    floor = smallest_cost(list(fit.values()), step) / total
    if ratio < floor:
        raise ConfigError(f"The {key!r} parameter of {OWNER} must be at least {floor:.4f} here "
                          f"(every layer at rank {step}). Got {ratio!r} instead.")  # fmt: skip
    chosen = budget_ranks(list(fit.values()), ratio * total, step)
    for name, rank in zip(fit, chosen, strict=True):
        if rank is None:
            skipped[name] = f"the {key} budget keeps it dense (it buys more energy per unit " \
                            "than any rank cheaper than dense)"  # fmt: skip
        else:
            ranks[name] = rank
    return ranks, skipped


def _choose_ranks(
    layers: Selected, spectra: dict[str, Spectrum], cfg: SVDConfig, rows: dict[str, int]
) -> tuple[dict[str, int], dict[str, str]]:
    """Each layer's rank, and the layers left dense with the reason."""
    key, value = cfg.rule
    if key in ("params_ratio", "flops_ratio"):
        return _budget(layers, spectra, cfg, rows)
    ranks, skipped = {}, {}
    for name, module in layers:
        out_f, in_f = matrix_shape(module)
        r = rule_rank(spectra[name], key, value, cfg.round_to)
        if r * (in_f + out_f) >= in_f * out_f:
            skipped[name] = f"rank {r} needs {r * (in_f + out_f)} weights, not fewer than the " \
                            f"dense {in_f * out_f}"  # fmt: skip
        else:
            ranks[name] = r
    return ranks, skipped


def _layer_record(module: nn.Module, spectrum: Spectrum, rank: int) -> dict[str, Any]:
    out_f, in_f = matrix_shape(module)  # type: ignore[arg-type]
    bias = out_f if getattr(module, "bias", None) is not None else 0
    return {"rank": rank, "full_rank": spectrum.full_rank,
            "energy_kept": round(spectrum.energy_kept(rank), 6),
            "params_before": in_f * out_f + bias, "params_after": rank * (in_f + out_f) + bias,
            "whitened": spectrum.chol is not None}  # fmt: skip


def _check(model: nn.Module, cfg: SVDConfig) -> tuple[Selected, dict[str, str]]:
    """The layers to consider and those left dense because their weight is shared."""
    picked = select_matrices(model, cfg, OWNER)
    if cfg.flops_ratio is not None:
        for name, module in picked:
            if isinstance(module, nn.Embedding):
                raise UnsupportedModuleError(
                    f"{name}: an Embedding lookup has no FLOPs for 'flops_ratio' to cut; use "
                    "'params_ratio' or add it to 'ignore'."
                )
    skipped = shared_weights(model, picked)
    return [(n, m) for n, m in picked if n not in skipped], skipped


@technique(OWNER, SVDConfig)
def apply_svd(model: nn.Module, cfg: SVDConfig, ctx: Context) -> nn.Module:
    """Factor Linear/Embedding weights by truncated SVD, optionally activation-aware.

    Implements Eckart–Young truncation ``W ≈ U_r Σ_r V_rᵀ`` and, with ``whiten``, SVD-LLM's
    whitened truncation ``W ≈ U_r Σ_r V_rᵀ S⁻¹`` with ``S Sᵀ = XᵀX + λI`` (:mod:`~.svd_math`);
    ranks from the rule in ``cfg`` (:func:`rule_rank`, :func:`~.svd_budget.budget_ranks`).
    Everything is checked and computed before the model changes.

    Args:
        model: the model, changed in place.
        cfg: the rank rule, ``round_to``, whitening options and ``targets``/``ignore``.
        ctx: calibration data (with ``whiten``) and example inputs (per-layer FLOPs and
            latency, and the rows per layer of a ``flops_ratio`` budget; 1 row without).

    Returns:
        The model. The stage record holds ``layers`` (per layer ``rank``, ``full_rank``,
        ``energy_kept``, ``params_before``/``params_after``, ``whitened``, and with example
        inputs the :class:`~.layer_cost.LayerCost` record), ``skipped`` (layers left dense
        and why) and ``slower`` (layers that measured slower than the original).

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: a selected layer is masked/quantized, not Linear/Embedding,
            an Embedding with ``max_norm`` or under ``flops_ratio``; or no layer can be
            factorized with fewer parameters.
        ConfigError: a budget below every layer at rank ``round_to``.
        DataError: ``whiten`` without calibration data, NaN/inf activations reaching a
            layer, or a Gram matrix that stays singular after damping.
    """
    layers, skipped = _check(model, cfg)
    shapes = layer_input_shapes(model, [n for n, _ in layers], ctx.example_inputs)
    rows = {n: input_rows(shapes, n, m) for n, m in layers}
    spectra = _spectra(model, layers, cfg, ctx)
    ranks, dense = _choose_ranks(layers, spectra, cfg, rows)
    skipped |= dense
    if not ranks:
        first = next(iter(skipped.items()))
        raise UnsupportedModuleError(f"{OWNER}: no selected layer can be factorized with fewer "
                                     f"parameters; e.g. {first[0]}: {first[1]}.")  # fmt: skip
    modules = dict(layers)
    pairs = {n: low_rank(modules[n], spectra[n], r) for n, r in ranks.items()}
    records = {n: _layer_record(modules[n], spectra[n], r) for n, r in ranks.items()}
    costs, slower = compare_layers(OWNER, modules, pairs, shapes)  # type: ignore[arg-type]
    for name, pair in pairs.items():
        model.set_submodule(name, pair)
        records[name] |= costs.get(name, {})
    record_edit(model, "lowrank_svd", layers=dict(ranks))
    ctx.report("layers", records)
    ctx.report("skipped", skipped)
    if slower:
        ctx.report("slower", slower)
    return model


@edit_op("lowrank_svd")
def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    for name, rank in edit["layers"].items():
        model.set_submodule(name, LowRank.shaped_like(model.get_submodule(name), int(rank)))
