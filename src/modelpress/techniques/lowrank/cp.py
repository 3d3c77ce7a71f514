"""``lowrank.cp``: CP decomposition of Conv2d kernels into 1×1 → kh×1 → 1×kw → 1×1 convs.

Lebedev, Ganin, Rakhuba, Oseledets and Lempitsky (2015), "Speeding-up Convolutional Neural
Networks Using Fine-tuned CP-Decomposition" (ICLR): a kernel ``K`` ``(C_out, C_in, kh, kw)`` is
approximated by a sum of ``R`` rank-one tensors,

    K[o, i, y, x] ≈ Σ_r λ_r · A_out[o, r] · A_in[i, r] · A_y[y, r] · A_x[x, r],    (CP)

and the conv becomes four: a 1×1 conv ``C_in → R`` (``A_in``), a depthwise ``kh × 1`` conv on
the ``R`` channels with the vertical stride/padding/dilation (``A_y``), a depthwise ``1 × kw``
conv with the horizontal ones (``A_x``), and a 1×1 conv ``R → C_out`` (``λ · A_out`` and the
original bias). The factors come from tensorly's ``parafac`` (CP-ALS), seeded from the run
seed so the same seed gives the same layers; each rank-one term's scale is spread evenly over
its four factors (``|λ_r|^{1/4}`` each) so no conv holds huge or tiny weights. CP-ALS is not
guaranteed to reach the best fit (Lebedev et al. used non-linear least squares for that
reason) and plain ALS *degenerates*: it finds rank-one terms far larger than ``K`` that cancel
each other, which fine-tuning then breaks (ResNet-20 at half the FLOPs, 40 SGD steps at lr
0.02 on 2,560 CIFAR images: 77 % accuracy before fine-tuning, 14 % after). A small ridge on
every ALS step (``l2_reg``, on the kernel scaled to norm 1) keeps the terms near ``||K||`` at
no loss of fit (the same run: 69 % → 76 %). Per layer the record holds the relative fit error
``||K − K̂||_F / ||K||_F`` and ``term_norm_ratio`` (``sqrt(Σ_r ||term_r||²) / ||K||``, far
above 1 when degenerate); the layers are meant to be fine-tuned (a ``train`` stage)
afterwards. Unlike Tucker-2, CP has no rank at which it is exact for every kernel.

Rank, from one rule: ``rank_ratio`` (the default, 0.5) of the layer's *break-even rank* — the
rank at which the four convs cost as many MACs as the original one, so ``rank_ratio`` is
about the fraction of the conv's FLOPs kept (``R_be = C_out C_in kh kw H_out W_out /
(C_in H_in W_in + kh H_out W_in + kw H_out W_out + C_out H_out W_out)``); an explicit
``rank``; or a budget (``flops_ratio`` / ``params_ratio`` of the factorizable convs) met by one
``rank_ratio`` for all of them, bisected to fit. Ranks are rounded up to a multiple of
``round_to``. A conv is left as it is, and reported, when it is grouped or 1×1, or when at its
rank the four convs would not have fewer MACs and fewer weights than it.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

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

OWNER = "lowrank.cp"


class CPConfig(ConvRankConfig):
    """CP decomposition of Conv2d kernels (Lebedev et al. 2015), fitted by seeded CP-ALS."""

    RULES: ClassVar[tuple[str, ...]] = ("rank_ratio", "rank", "params_ratio", "flops_ratio")
    DEFAULT_RULE: ClassVar[tuple[str, float]] = ("rank_ratio", 0.5)

    rank_ratio: float | None = Field(
        None, gt=0, le=1, description="Rank as a fraction of the break-even rank (default 0.5)."
    )
    rank: int | None = Field(None, ge=1, le=1_000_000, description="The same rank everywhere.")
    n_iter: int = Field(100, ge=1, le=100_000, description="CP-ALS iterations (tensorly parafac).")
    init: Literal["svd", "random"] = Field(
        "svd", description="CP-ALS start: HOSVD factors (random-padded) or random, both seeded."
    )
    l2_reg: float = Field(
        1e-3, ge=0, le=1, description="CP-ALS ridge on the factors (kernel scaled to norm 1)."
    )


class CPConv(nn.Module):
    """``last(horizontal(vertical(first(x))))``: 1×1 ``C_in → R``, depthwise kh×1 and 1×kw on
    the ``R`` channels, 1×1 ``R → C_out``."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        (kh, kwd), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        pad_v, pad_h = _split_padding(conv.padding)
        self.first = skip_init(nn.Conv2d, conv.in_channels, rank, 1, bias=False, **kw)
        self.vertical = skip_init(
            nn.Conv2d, rank, rank, (kh, 1), stride=(sh, 1), padding=pad_v, dilation=(dh, 1),
            groups=rank, bias=False, padding_mode=conv.padding_mode, **kw,
        )  # fmt: skip
        self.horizontal = skip_init(
            nn.Conv2d, rank, rank, (1, kwd), stride=(1, sw), padding=pad_h, dilation=(1, dw),
            groups=rank, bias=False, padding_mode=conv.padding_mode, **kw,
        )  # fmt: skip
        self.last = skip_init(nn.Conv2d, rank, conv.out_channels, 1,
                              bias=conv.bias is not None, **kw)  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, kh, kw)`` the four convs compute."""
        return cp_kernel(self.first.weight, self.vertical.weight, self.horizontal.weight,
                         self.last.weight)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, C_out, H', W')``, as the replaced conv."""
        z = self.vertical(self.first(x))  # (B, R, H, W) → (B, R, H', W)
        return self.last(self.horizontal(z))  # (B, R, H', W') → (B, C_out, H', W')


def _split_padding(padding: str | tuple[int, ...]) -> tuple[Any, Any]:
    """The padding of the vertical and horizontal convs (a string applies to both)."""
    if isinstance(padding, str):
        return padding, padding
    return (padding[0], 0), (0, padding[1])


def cp_kernel(first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor,
              last: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``K[o, i, y, x] = Σ_r last[o, r] · vertical[r, y] · horizontal[r, x] · first[r, i]``
    from the four conv weights ``(R, C_in, 1, 1)``, ``(R, 1, kh, 1)``, ``(R, 1, 1, kw)`` and
    ``(C_out, R, 1, 1)``."""
    return torch.einsum("or,ry,rx,ri->oiyx", last[:, :, 0, 0], vertical[:, 0, :, 0],
                        horizontal[:, 0, 0, :], first[:, :, 0, 0])  # fmt: skip


def balance(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each rank-one term's scale evenly: every factor column gets norm ``|s_r|^{1/N}``,
    ``s_r = λ_r Π_n ||A_n[:, r]||``, with the sign on the first factor.

    Args:
        weights: ``λ`` ``(R,)``.
        factors: N factor matrices ``(I_n, R)``.

    Returns:
        The N rescaled factors; ``Σ_r Π_n A_n[:, r]`` is unchanged (zero columns stay zero).
    """
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors])  # (N, R)
    scale = weights * norms.prod(dim=0)  # (R,)
    root = scale.abs().pow(1.0 / len(factors))  # (R,)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))  # (N, R)
    out = [f / safe[n] * root for n, f in enumerate(factors)]
    out[0] = out[0] * torch.where(scale < 0, -1.0, 1.0).to(out[0].dtype)
    return out


def cp_factors(weight: torch.Tensor, rank: int, *, n_iter: int = 100, init: str = "svd",
               l2_reg: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The four conv weights of the rank-``R`` CP fit of a kernel.

    Lebedev et al. (2015), eq. (4), fitted by CP-ALS (tensorly ``parafac``, ``n_iter``
    iterations from an ``init`` start seeded by ``seed``) in float64 on ``K / ||K||_F``, then
    :func:`balance`. Plain ALS tends to *degenerate* — rank-one terms far larger than ``K``
    that cancel each other (Lebedev et al.'s instability; :func:`term_norm_ratio` reaches
    5-7 on ResNet-20), which fine-tuning then breaks; a small ridge ``l2_reg`` on
    every least-squares step (``+ l2_reg · I``) keeps the terms near ``||K||`` at no loss of fit.

    Args:
        weight: the kernel ``(C_out, C_in, kh, kw)``.
        rank: ``R``.
        n_iter: ALS iterations.
        init: ``"svd"`` or ``"random"``.
        l2_reg: the ridge of each ALS step, relative to the unit-norm kernel.
        seed: seeds the start (and the random columns padding an SVD start past a mode's size).

    Returns:
        ``first (R, C_in, 1, 1)``, ``vertical (R, 1, kh, 1)``, ``horizontal (R, 1, 1, kw)``,
        ``last (C_out, R, 1, 1)``, in the kernel's dtype.
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    w = weight.detach().double().cpu()
    norm = float(torch.linalg.vector_norm(w)) or 1.0
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tensorly's SVD-size notices
        cp = parafac(w / norm, rank, n_iter_max=n_iter, init=init, tol=1e-10,
                     random_state=seed, l2_reg=l2_reg)  # fmt: skip
    a_out, a_in, a_y, a_x = balance(
        cp.weights * norm, list(cp.factors)
    )  # (C_out, R), (C_in, R), ...
    dtype = weight.dtype
    first = a_in.T.contiguous()[:, :, None, None]  # (R, C_in, 1, 1)
    vertical = a_y.T.contiguous()[:, None, :, None]  # (R, 1, kh, 1)
    horizontal = a_x.T.contiguous()[:, None, None, :]  # (R, 1, 1, kw)
    last = a_out.contiguous()[:, :, None, None]  # (C_out, R, 1, 1)
    return tuple(t.to(dtype) for t in (first, vertical, horizontal, last))


def cp_layer(conv: nn.Conv2d, rank: int, *, n_iter: int = 100, init: str = "svd",
             l2_reg: float = 1e-3, seed: int = 0) -> CPConv:  # fmt: skip
    """The :class:`CPConv` fitted to ``conv`` by :func:`cp_factors` (bias moved to ``last``)."""
    layer = CPConv(conv, rank)
    weights = cp_factors(conv.weight, rank, n_iter=n_iter, init=init, l2_reg=l2_reg, seed=seed)
    with torch.no_grad():
        for module, w in zip((layer.first, layer.vertical, layer.horizontal, layer.last), weights,
                             strict=True):  # fmt: skip
            module.weight.copy_(w)
        if conv.bias is not None:
            layer.last.bias.copy_(conv.bias)
    return layer


def term_norm_ratio(weight: torch.Tensor, layer: CPConv) -> float:
    """``sqrt(Σ_r ||term_r||²) / ||K||_F``: about 1 or less for a well-posed CP, far above 1
    when large rank-one terms cancel each other (a degenerate fit)."""
    cols = [
        layer.first.weight[:, :, 0, 0],
        layer.vertical.weight[:, 0, :, 0],
        layer.horizontal.weight[:, 0, 0, :],
        layer.last.weight[:, :, 0, 0].T,
    ]  # (R, ·) each
    terms = torch.stack([torch.linalg.vector_norm(c.detach().double(), dim=1) for c in cols])
    norm = float(torch.linalg.vector_norm(weight.detach().double()))
    return float(torch.linalg.vector_norm(terms.prod(dim=0))) / norm if norm > 0 else 0.0


def cp_cost(g: ConvGeometry, rank: int) -> tuple[int, int]:
    """``(MACs per sample, weights)`` of the four convs, without the bias:
    ``R (C_in H_in W_in + kh H_out W_in + kw H_out W_out + C_out H_out W_out)`` and
    ``R (C_in + kh + kw + C_out)``."""
    per_rank = (g.c_in * g.pixels_in + g.kh * g.h_out * g.w_in
                + (g.kw + g.c_out) * g.pixels_out)  # fmt: skip
    return rank * per_rank, rank * (g.c_in + g.kh + g.kw + g.c_out)


def break_even_rank(g: ConvGeometry) -> float:
    """The rank at which the four convs cost as many MACs as the conv (:func:`cp_cost`)."""
    return g.dense_macs() / cp_cost(g, 1)[0]


def not_worth(g: ConvGeometry, rank: int) -> str | None:
    """Why the CP layers at ``rank`` would not be cheaper than the conv, or None."""
    macs, params = cp_cost(g, rank)
    if macs >= g.dense_macs():
        return f"at rank {rank} it would cost {macs} MACs, not fewer than {g.dense_macs()}"
    if params >= g.dense_params():
        return f"at rank {rank} it would have {params} weights, not fewer than {g.dense_params()}"
    return None


def ratio_rank(g: ConvGeometry, ratio: float, round_to: int) -> int:
    """``round(ratio · R_be)`` (at least 1), rounded up to a multiple of ``round_to``."""
    return round_rank(round(ratio * break_even_rank(g)), round_to)


def plan_ranks(convs: Convs, geo: dict[str, ConvGeometry], cfg: CPConfig,
               ctx: Context) -> dict[str, int]:  # fmt: skip
    """``{name: R}`` for every conv under the config's rule."""
    rule, value = cfg.rule
    if rule == "rank":
        return {n: round_rank(int(value), cfg.round_to) for n, _ in convs}
    if rule == "rank_ratio":
        return {n: ratio_rank(geo[n], value, cfg.round_to) for n, _ in convs}
    require_shapes(rule, ctx.example_inputs, OWNER)
    which = 0 if rule == "flops_ratio" else 1

    def plan_at(level: float) -> dict[str, tuple[int, ...]]:
        return {n: (ratio_rank(geo[n], level, cfg.round_to),) for n, _ in convs}

    def cost(name: str, ranks: tuple[int, ...]) -> int:
        g = geo[name]
        dense = (g.dense_macs(), g.dense_params())[which]
        return dense if not_worth(g, ranks[0]) else cp_cost(g, ranks[0])[which]

    dense = {n: (geo[n].dense_macs(), geo[n].dense_params())[which] for n, _ in convs}
    plan, kept = bisect_budget(plan_at, cost, dense, value, key=rule, owner=OWNER)
    ctx.report(f"{rule.removesuffix('_ratio')}_kept_predicted", round(kept, 4))
    return {n: r[0] for n, r in plan.items()}


@technique(OWNER, CPConfig)
def apply_cp(model: nn.Module, cfg: CPConfig, ctx: Context) -> nn.Module:
    """Replace k×k Conv2d by CP 1×1 → kh×1 → 1×kw → 1×1 convs (Lebedev et al. 2015).

    Each factorized conv becomes :class:`CPConv` from :func:`cp_factors` (seeded CP-ALS) at
    the rank from the config's rule (half the break-even rank by default).

    Args:
        model: the model, changed in place.
        cfg: the rank rule, ``round_to``, ``n_iter``, ``init``, ``l2_reg``, ``targets``/``ignore``.
        ctx: the seed, and example inputs for each conv's real sizes, FLOPs and latency.

    Returns:
        The model. The stage record holds per layer ``rank``, ``fit_error``
        ``||K − K̂||_F / ||K||_F``, ``term_norm_ratio``, params before/after and, with example inputs, FLOPs and
        latency before/after; ``skipped`` (conv → why it was left as it is); ``slower``
        (layers measured slower than the original, also a ``RuntimeWarning``).

    Raises:
        NoMatchingModulesError: the selection holds no Conv2d.
        UnsupportedModuleError: a selected conv is masked/quantized, or named in ``targets``
            but grouped or 1×1; a selected leaf is not a Conv2d; no conv can be factorized.
        ConfigError: a budget below every conv at rank ``round_to``.
        DataError: ``flops_ratio`` without example inputs.
    """
    convs, skipped = select_convs(model, cfg, OWNER)
    geo, in_shapes = probe(model, convs, ctx.example_inputs)
    ranks = plan_ranks(convs, geo, cfg, ctx) if convs else {}
    chosen = keep_cheaper(convs, lambda n: not_worth(geo[n], ranks[n]), skipped, OWNER)
    seeds = {n: int(ctx.generator(i).initial_seed() % 2**32) for i, (n, _) in enumerate(chosen)}
    layers = {n: cp_layer(c, ranks[n], n_iter=cfg.n_iter, init=cfg.init, l2_reg=cfg.l2_reg,
                          seed=seeds[n]) for n, c in chosen}  # fmt: skip
    fields = {n: {"rank": ranks[n], "fit_error": round(relative_error(c.weight, layers[n].weight), 6),
                  "term_norm_ratio": round(term_norm_ratio(c.weight, layers[n]), 4)}
              for n, c in chosen}  # fmt: skip
    records, slower = measure_layers(
        OWNER, {n: (c, layers[n]) for n, c in chosen}, in_shapes, fields
    )
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    record_edit(model, "cp_conv", layers={n: ranks[n] for n in layers})
    report_layers(ctx, records, slower, skipped)
    return model


@edit_op("cp_conv")
def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    for name, rank in edit["layers"].items():
        conv = model.get_submodule(name)
        model.set_submodule(name, CPConv(conv, int(rank)))
