"""``lowrank.tucker``: Tucker-2 decomposition of Conv2d kernels into 1×1 → kh×kw → 1×1 convs.

Kim, Park, Yoo, Choi, Yang and Shin (2016), "Compression of Deep Convolutional Neural Networks
for Fast and Low Power Mobile Applications" (ICLR): a kernel ``K`` ``(C_out, C_in, kh, kw)`` is
decomposed along its two channel modes only,

    K[o, i, y, x] ≈ Σ_{a, b} U_out[o, a] · G[a, b, y, x] · U_in[i, b],    (Tucker-2)

and the conv becomes three: a 1×1 conv ``C_in → R_in`` (weights ``U_inᵀ``), a kh×kw conv
``R_in → R_out`` with the original stride, padding and dilation (weights: the core ``G``),
and a 1×1 conv ``R_out → C_out`` (weights ``U_out``, the original bias). The factors come from
tensorly's ``partial_tucker`` (HOSVD initialisation, then HOOI iterations); at
``R_in = C_in, R_out = C_out`` the three convs compute the original one exactly.

Ranks, from one rule: VBMF (the default; as Kim et al., the global analytic EVBMF of
Nakajima et al. 2013 on the mode-0 and mode-1 unfoldings, :mod:`~.vbmf`), an explicit ``rank``
or ``rank_ratio`` of the channel counts, or a budget (``flops_ratio`` / ``params_ratio`` of the
factorizable convs) met by one energy level ``t`` for every layer and both modes: each rank is
the least that keeps ``t`` of its unfolding's ``Σ σ²`` (HOSVD energy), ``t`` bisected to fit.
Ranks are rounded up to a multiple of ``round_to``. A conv is left as it is, and reported,
when it is grouped or 1×1, or when at its ranks the three convs would not have fewer MACs
*and* fewer weights than it (the first 1×1 conv runs at the input resolution).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import skip_init

from modelpress.context import Context
from modelpress.edits import edit_op, record_edit
from modelpress.registry import technique
from modelpress.techniques.lowrank.conv_select import (
    ConvGeometry,
    Convs,
    bisect_budget,
    keep_cheaper,
    measure_layers,
    probe,
    report_layers,
    require_shapes,
    select_convs,
)
from modelpress.techniques.lowrank.layer_cost import relative_error
from modelpress.techniques.lowrank.rank_rule import ConvRankConfig, round_rank
from modelpress.techniques.lowrank.vbmf import evbmf

OWNER = "lowrank.tucker"


class TuckerConfig(ConvRankConfig):
    """Tucker-2 decomposition of Conv2d kernels (Kim et al. 2016), ranks by VBMF or a budget."""

    RULES: ClassVar[tuple[str, ...]] = ("rank", "rank_ratio", "params_ratio", "flops_ratio")
    DEFAULT_RULE: ClassVar[tuple[str, float]] = ("vbmf", 0.0)

    rank: int | None = Field(
        None, ge=1, le=65_536, description="Both ranks (capped at the channels); else VBMF."
    )
    rank_ratio: float | None = Field(
        None, gt=0, le=1, description="Ranks as a fraction of C_in and C_out (rounded up)."
    )
    n_iter: int = Field(
        50, ge=1, le=10_000, description="HOOI iterations after the HOSVD start (partial_tucker)."
    )


class Tucker2Conv(nn.Module):
    """``last(core(first(x)))``: 1×1 ``C_in → R_in``, kh×kw ``R_in → R_out``, 1×1 ``→ C_out``."""

    def __init__(self, conv: nn.Conv2d, rank_in: int, rank_out: int) -> None:
        super().__init__()
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.first = skip_init(nn.Conv2d, conv.in_channels, rank_in, 1, bias=False, **kw)
        self.core = skip_init(
            nn.Conv2d, rank_in, rank_out, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, bias=False,
            padding_mode=conv.padding_mode, **kw,
        )  # fmt: skip
        self.last = skip_init(nn.Conv2d, rank_out, conv.out_channels, 1,
                              bias=conv.bias is not None, **kw)  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, kh, kw)`` the three convs compute."""
        return tucker2_kernel(self.first.weight, self.core.weight, self.last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H', W')``, as the replaced conv."""
        return self.last(self.core(self.first(x)))  # (B, R_in, H, W) → (B, R_out, H', W')


def tucker2_kernel(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``K = G ×₀ U_out ×₁ U_in`` from the three conv weights ``(R_in, C_in, 1, 1)``,
    ``(R_out, R_in, kh, kw)`` and ``(C_out, R_out, 1, 1)``."""
    return torch.einsum("oa,abyx,bi->oiyx", last[:, :, 0, 0], core, first[:, :, 0, 0])


def tucker2_factors(weight: torch.Tensor, rank_in: int, rank_out: int,
                    n_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The three conv weights of the rank-``(R_in, R_out)`` Tucker-2 fit of a kernel.

    Kim et al. (2016), eq. (2): ``K ≈ G ×₀ U_out ×₁ U_in`` with orthonormal ``U_out``
    ``(C_out, R_out)`` and ``U_in`` ``(C_in, R_in)``, from tensorly's ``partial_tucker`` on
    modes 0 and 1 (HOSVD start, then ``n_iter`` HOOI iterations), in float64.

    Args:
        weight: the kernel ``(C_out, C_in, kh, kw)``.
        rank_in, rank_out: ``R_in <= C_in`` and ``R_out <= C_out``.
        n_iter: HOOI iterations.

    Returns:
        ``first (R_in, C_in, 1, 1)``, ``core (R_out, R_in, kh, kw)``,
        ``last (C_out, R_out, 1, 1)``, in the kernel's dtype.
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    w = weight.detach().double().cpu()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tensorly's SVD-size notices
        (core, (u_out, u_in)), _ = partial_tucker(
            w, rank=[rank_out, rank_in], modes=[0, 1], init="svd", n_iter_max=n_iter, tol=1e-10
        )
    dtype = weight.dtype
    first = u_in.T.contiguous()[:, :, None, None]  # (R_in, C_in, 1, 1)
    last = u_out.contiguous()[:, :, None, None]  # (C_out, R_out, 1, 1)
    return first.to(dtype), core.contiguous().to(dtype), last.to(dtype)


def tucker2_layer(conv: nn.Conv2d, rank_in: int, rank_out: int, n_iter: int = 50) -> Tucker2Conv:
    """The :class:`Tucker2Conv` fitted to ``conv`` by :func:`tucker2_factors` (bias moved to
    ``last``); at ``(C_in, C_out)`` it computes ``conv`` exactly (up to rounding)."""
    layer = Tucker2Conv(conv, rank_in, rank_out)
    first, core, last = tucker2_factors(conv.weight, rank_in, rank_out, n_iter)
    with torch.no_grad():
        layer.first.weight.copy_(first)
        layer.core.weight.copy_(core)
        layer.last.weight.copy_(last)
        if conv.bias is not None:
            layer.last.bias.copy_(conv.bias)
    return layer


def tucker2_cost(g: ConvGeometry, rank_in: int, rank_out: int) -> tuple[int, int]:
    """``(MACs per sample, weights)`` of the three convs, without the bias:
    ``C_in R_in H_in W_in + R_in R_out kh kw H_out W_out + R_out C_out H_out W_out`` and
    ``C_in R_in + R_in R_out kh kw + R_out C_out``."""
    taps = g.kh * g.kw
    macs = (g.c_in * rank_in * g.pixels_in
            + (rank_in * rank_out * taps + rank_out * g.c_out) * g.pixels_out)  # fmt: skip
    return macs, g.c_in * rank_in + rank_in * rank_out * taps + rank_out * g.c_out


def unfolding_energy(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative normalised ``σ²`` of the mode-1 (``C_in``) and mode-0 (``C_out``)
    unfoldings: ``(C_in,)`` and ``(C_out,)``, each ending at 1 (the HOSVD energy)."""
    w = weight.detach().double()
    out = []
    for mode in (1, 0):
        s2 = torch.linalg.svdvals(w.movedim(mode, 0).reshape(w.shape[mode], -1)).square()
        total = s2.sum()
        out.append(s2.cumsum(0) / total if total > 0 else torch.ones_like(s2))
    return out[0], out[1]


def energy_rank(cumulative: torch.Tensor, level: float) -> int:
    """The least rank whose cumulative energy reaches ``level`` (at least 1)."""
    r = int(torch.searchsorted(cumulative, torch.tensor([level - 1e-12], dtype=cumulative.dtype)))
    return min(max(r + 1, 1), cumulative.numel())


def vbmf_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """``(R_in, R_out)``: the EVBMF ranks of the mode-1 and mode-0 unfoldings (Kim et al.
    2016, section 3.1, with :func:`~.vbmf.evbmf`), each at least 1."""
    w = weight.detach().double()
    r_out = evbmf(w.reshape(w.shape[0], -1)).rank
    r_in = evbmf(w.transpose(0, 1).reshape(w.shape[1], -1)).rank
    return max(r_in, 1), max(r_out, 1)


def _rule_ranks(conv: nn.Conv2d, rule: str, value: float, round_to: int) -> tuple[int, int]:
    c_in, c_out = conv.in_channels, conv.out_channels
    if rule == "vbmf":
        r_in, r_out = vbmf_ranks(conv.weight)
    elif rule == "rank":
        r_in, r_out = int(value), int(value)
    else:
        r_in, r_out = math.ceil(value * c_in), math.ceil(value * c_out)
    return round_rank(r_in, round_to, c_in), round_rank(r_out, round_to, c_out)


def not_worth(g: ConvGeometry, ranks: tuple[int, ...]) -> str | None:
    """Why the Tucker-2 layers at ``ranks`` would not be cheaper than the conv, or None."""
    macs, params = tucker2_cost(g, *ranks)
    if macs >= g.dense_macs():
        return f"at ranks {tuple(ranks)} it would cost {macs} MACs, not fewer than {g.dense_macs()}"
    if params >= g.dense_params():
        return (f"at ranks {tuple(ranks)} it would have {params} weights, not fewer than "
                f"{g.dense_params()}")  # fmt: skip
    return None


def plan_ranks(convs: Convs, geo: dict[str, ConvGeometry], cfg: TuckerConfig,
               ctx: Context) -> dict[str, tuple[int, int]]:  # fmt: skip
    """``{name: (R_in, R_out)}`` for every conv under the config's rule."""
    rule, value = cfg.rule
    if rule not in ("params_ratio", "flops_ratio"):
        return {n: _rule_ranks(c, rule, value, cfg.round_to) for n, c in convs}
    require_shapes(rule, ctx.example_inputs, OWNER)
    energy = {n: unfolding_energy(c.weight) for n, c in convs}
    caps = {n: (c.in_channels, c.out_channels) for n, c in convs}
    which = 0 if rule == "flops_ratio" else 1

    def plan_at(level: float) -> dict[str, tuple[int, ...]]:
        return {n: tuple(round_rank(energy_rank(e, level), cfg.round_to, cap)
                         for e, cap in zip(energy[n], caps[n], strict=True)) for n in energy}  # fmt: skip

    def cost(name: str, ranks: tuple[int, ...]) -> int:
        g = geo[name]
        dense = (g.dense_macs(), g.dense_params())[which]
        return dense if not_worth(g, ranks) else tucker2_cost(g, *ranks)[which]

    dense = {n: (g.dense_macs(), g.dense_params())[which] for n, g in geo.items()}
    plan, kept = bisect_budget(plan_at, cost, dense, value, key=rule, owner=OWNER)
    ctx.report(f"{rule.removesuffix('_ratio')}_kept_predicted", round(kept, 4))
    return {n: (r[0], r[1]) for n, r in plan.items()}


@technique(OWNER, TuckerConfig)
def apply_tucker(model: nn.Module, cfg: TuckerConfig, ctx: Context) -> nn.Module:
    """Replace k×k Conv2d by Tucker-2 1×1 → k×k → 1×1 convs (Kim et al. 2016).

    Each factorized conv becomes :class:`Tucker2Conv` from :func:`tucker2_factors`
    (``K ≈ G ×₀ U_out ×₁ U_in``) at ranks from the config's rule (VBMF by default).

    Args:
        model: the model, changed in place.
        cfg: the rank rule, ``round_to``, ``n_iter`` and ``targets``/``ignore``.
        ctx: example inputs, for each conv's real sizes, FLOPs and measured latency.

    Returns:
        The model. The stage record holds per layer ``rank_in``/``rank_out``, ``fit_error``
        ``||K − K̂||_F / ||K||_F``, params before/after and, with example inputs, FLOPs and
        latency before/after; ``skipped`` (conv → why it was left as it is); ``slower``
        (layers measured slower than the original, also a ``RuntimeWarning``).

    Raises:
        NoMatchingModulesError: the selection holds no Conv2d.
        UnsupportedModuleError: a selected conv is masked/quantized, or named in ``targets``
            but grouped or 1×1; a selected leaf is not a Conv2d; no conv can be factorized.
        ConfigError: a budget below every conv at its smallest ranks.
        DataError: ``flops_ratio`` without example inputs.
    """
    convs, skipped = select_convs(model, cfg, OWNER)
    geo, in_shapes = probe(model, convs, ctx.example_inputs)
    ranks = plan_ranks(convs, geo, cfg, ctx) if convs else {}
    chosen = keep_cheaper(convs, lambda n: not_worth(geo[n], ranks[n]), skipped, OWNER)
    layers = {n: tucker2_layer(c, *ranks[n], n_iter=cfg.n_iter) for n, c in chosen}
    fields = {n: {"rank_in": ranks[n][0], "rank_out": ranks[n][1],
                  "fit_error": round(relative_error(c.weight, layers[n].weight), 6)}
              for n, c in chosen}  # fmt: skip
    records, slower = measure_layers(
        OWNER, {n: (c, layers[n]) for n, c in chosen}, in_shapes, fields
    )
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    record_edit(model, "tucker2", layers={n: list(ranks[n]) for n in layers})
    report_layers(ctx, records, slower, skipped)
    return model


@edit_op("tucker2")
def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    for name, (rank_in, rank_out) in edit["layers"].items():
        conv = model.get_submodule(name)
        model.set_submodule(name, Tucker2Conv(conv, int(rank_in), int(rank_out)))
