"""What ``lowrank.tucker`` and ``lowrank.cp`` share: picking the Conv2d layers to factorize
(checked before anything changes), their geometry and multiply-accumulate counts, a model-wide
rank budget solved by bisection, and the per-layer report (through :mod:`~.layer_cost`).

A factorization is worth it only if it costs fewer multiply-accumulates (MACs) than the conv it
replaces, counted on the layer's real input and output sizes: a 1×1 conv at the start of a
factorized layer runs at the *input* resolution, which for a strided conv is ``stride²`` times
the output's. Without example inputs the sizes are per output pixel (``H_out = W_out = 1``,
``H_in × W_in = stride_h × stride_w``), which gives the same ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.measure.size import count_params
from modelpress.targeting import select_weighted
from modelpress.techniques.lowrank.layer_cost import compare_layers

Convs = list[tuple[str, nn.Conv2d]]
Ranks = tuple[int, ...]


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv2d's channels, kernel and per-sample input/output sizes in the model.

    Attributes:
        c_in, c_out: channels.
        kh, kw: kernel size.
        h_in, w_in, h_out, w_out: spatial sizes of one sample (per output pixel without
            example inputs: 1 × 1 out, ``stride_h × stride_w`` in).
        bias: whether the conv has a bias.
    """

    c_in: int
    c_out: int
    kh: int
    kw: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    bias: bool

    @property
    def pixels_in(self) -> int:
        """``H_in · W_in``."""
        return self.h_in * self.w_in

    @property
    def pixels_out(self) -> int:
        """``H_out · W_out``."""
        return self.h_out * self.w_out

    def dense_macs(self) -> int:
        """MACs of the conv for one sample: ``C_out · C_in · kh · kw · H_out · W_out``."""
        return self.c_out * self.c_in * self.kh * self.kw * self.pixels_out

    def dense_params(self) -> int:
        """Weights of the conv, without the bias (which every factorization keeps)."""
        return self.c_out * self.c_in * self.kh * self.kw


def geometry(
    conv: nn.Conv2d, shapes: tuple[tuple[int, ...], tuple[int, ...]] | None
) -> ConvGeometry:
    """The :class:`ConvGeometry` of ``conv`` from its probed ``(input, output)`` shapes, or per
    output pixel when they are unknown."""
    kh, kw = conv.kernel_size
    if shapes is None:
        (h_in, w_in), (h_out, w_out) = conv.stride, (1, 1)
    else:
        (h_in, w_in), (h_out, w_out) = shapes[0][-2:], shapes[1][-2:]
    return ConvGeometry(conv.in_channels, conv.out_channels, kh, kw, h_in, w_in, h_out, w_out,
                        conv.bias is not None)  # fmt: skip


def structural_skip(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be factorized whatever the rank (grouped, or 1×1), or None."""
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convs are not factorized)"
    if conv.kernel_size == (1, 1):
        return "1x1 kernel (a matrix product over channels: nothing spatial to factorize)"
    return None


def select_convs(model: nn.Module, cfg: TargetedConfig, owner: str) -> tuple[Convs, dict[str, str]]:
    """The Conv2d layers picked by ``cfg.targets``/``cfg.ignore`` that can be factorized, and
    ``{name: reason}`` for the picked ones that cannot (grouped or 1×1).

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: a selected leaf that is not a Conv2d; a conv named exactly in
            ``targets`` that cannot be factorized; a conv to factorize that carries a mask or
            quantizer (factorize before masking or quantizing).
    """
    picked = select_weighted(model, cfg, owner=owner, supported=(nn.Conv2d,))
    named = set(cfg.targets) if "targets" in cfg.model_fields_set else set()
    chosen: Convs = []
    skipped: dict[str, str] = {}
    for name, conv in picked:
        why = structural_skip(conv)
        if why and name in named:
            raise UnsupportedModuleError(f"{name}: {why} is not supported by {owner}; remove it "
                                         "from targets.")  # fmt: skip
        if why:
            skipped[name] = why
            continue
        if parametrize.is_parametrized(conv):
            raise UnsupportedModuleError(f"{name}: carries a mask or quantizer; run {owner} "
                                         "before techniques that mask or quantize weights.")  # fmt: skip
        chosen.append((name, conv))
    return chosen, skipped


def keep_cheaper(convs: Convs, why_not: Callable[[str], str | None], skipped: dict[str, str],
                 owner: str) -> Convs:  # fmt: skip
    """The convs whose factorization is cheaper (``why_not(name)`` is None); the others are
    added to ``skipped`` as ``"not cheaper: ..."``.

    Raises:
        UnsupportedModuleError: no selected conv is left to factorize.
    """
    for name, _ in convs:
        why = why_not(name)
        if why:
            skipped[name] = f"not cheaper: {why}"
    chosen = [(n, c) for n, c in convs if n not in skipped]
    if not chosen:
        first = next(iter(skipped.items()))
        raise UnsupportedModuleError(f"{owner}: no selected conv can be factorized; e.g. "
                                     f"{first[0]}: {first[1]}.")  # fmt: skip
    return chosen


def probe(model: nn.Module, convs: Convs, example_inputs: Any) -> tuple[dict[str, ConvGeometry],
                                                                        dict[str, tuple[int, ...]]]:  # fmt: skip
    """Geometry of each conv and its input shape on ``example_inputs`` ({} without them)."""
    shapes: dict[str, Any] = {}
    if example_inputs is not None:
        from modelpress.techniques.architecture.blocks import probe_shapes

        shapes = probe_shapes(model, [n for n, _ in convs], example_inputs)
    geo = {n: geometry(c, shapes.get(n)) for n, c in convs}
    return geo, {n: io[0] for n, io in shapes.items()}


def require_shapes(key: str, example_inputs: Any, owner: str) -> None:
    """Check a ``flops_ratio`` budget can be counted (it needs the layers' real sizes).

    Raises:
        DataError: ``flops_ratio`` without example inputs.
    """
    if key == "flops_ratio" and example_inputs is None:
        raise DataError(f"{owner} with 'flops_ratio' needs example inputs to count each conv's "
                        "FLOPs; pass data=... or example_inputs=..., or use 'params_ratio'.")  # fmt: skip


def bisect_budget(
    plan_at: Callable[[float], dict[str, Ranks]],
    cost: Callable[[str, Ranks], int],
    dense: dict[str, int],
    ratio: float,
    *,
    key: str,
    owner: str,
    steps: int = 40,
) -> tuple[dict[str, Ranks], float]:
    """The plan of the largest ``t`` in ``[0, 1]`` whose cost is at most ``ratio`` of dense.

    ``plan_at(t)`` gives every layer's ranks at level ``t`` (non-decreasing in ``t``); a layer
    whose factorized ``cost`` is not below its ``dense`` cost stays dense, so the total cost
    ``Σ min(cost, dense)`` is non-decreasing in ``t`` and bisection finds the largest level
    that fits.

    Args:
        plan_at: level → ``{layer: ranks}``.
        cost: ``(layer, ranks)`` → factorized cost (MACs or weights).
        dense: ``{layer: dense cost}``.
        ratio: the budget as a fraction of ``Σ dense``.
        key, owner: the config field and technique, for the error message.
        steps: bisection steps.

    Returns:
        ``(plan, fraction of the dense cost it keeps)``; layers not cheaper than dense included
        (the caller leaves them dense).

    Raises:
        ConfigError: even level 0 (the smallest ranks) does not fit the budget.
    """
    total = sum(dense.values())

    def kept(plan: dict[str, Ranks]) -> float:
        return sum(min(cost(n, r), dense[n]) for n, r in plan.items()) / total

    floor = kept(plan_at(0.0))
    if floor > ratio:
        raise ConfigError(f"The '{key}' parameter of {owner} must be at least {floor:.4f} (every "
                          f"layer at its smallest rank). Got {ratio!r} instead.")  # fmt: skip
    lo, hi = 0.0, 1.0
    if kept(plan_at(hi)) <= ratio:
        lo = hi
    for _ in range(steps if lo < hi else 0):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(plan_at(mid)) <= ratio else (lo, mid)
    best = plan_at(lo)
    return best, kept(best)


def measure_layers(
    owner: str,
    pairs: dict[str, tuple[nn.Conv2d, nn.Module]],
    input_shapes: dict[str, tuple[int, ...]],
    fields: dict[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], list[str] | None]:
    """Each layer's stage record: its ``fields`` (ranks, fit error), params before/after and,
    where its input shape is known, FLOPs and measured latency
    (:func:`~.layer_cost.compare_layers`, which warns about the slower ones).

    Args:
        owner: the technique, for the warning.
        pairs: ``{name: (original conv, replacement)}``.
        input_shapes: ``{name: input shape}`` on the example inputs (may be empty).
        fields: ``{name: {...}}`` technique-specific entries of each record.

    Returns:
        ``(records, slower)``; ``slower`` is None when no layer was timed.
    """
    costs, slower = compare_layers(owner, {n: o for n, (o, _) in pairs.items()},
                                   {n: r for n, (_, r) in pairs.items()}, input_shapes)  # fmt: skip
    records = {
        name: {**fields[name], "params_before": count_params(original),
               "params_after": count_params(replacement), **costs.get(name, {})}
        for name, (original, replacement) in pairs.items()
    }  # fmt: skip
    return records, slower if costs else None


def report_layers(ctx: Context, records: dict[str, dict[str, Any]], slower: list[str] | None,
                  skipped: dict[str, str]) -> None:  # fmt: skip
    """Put ``layers``, ``skipped`` and (when layers were timed) ``slower`` in the stage record."""
    ctx.report("layers", records)
    if skipped:
        ctx.report("skipped", skipped)
    if slower is not None:
        ctx.report("slower", slower)
