"""How much each channel of a coupled group matters; higher = keep.

- ``l1``: Σ over the group's producers of ‖W_c‖₁, the filter norm of Li et al. 2017
  ("Pruning Filters for Efficient ConvNets"), summed over every layer that creates channel c.
- ``l2``: the same with ‖W_c‖₂.
- ``group_l1`` / ``group_l2``: the p-norm of *every* parameter coupled to channel c — the
  producers' rows and biases, the consumers' input columns, the norms' γ and β — as one
  vector: the group norm of DepGraph (Fang et al. 2023, "DepGraph: Towards Any Structural
  Pruning", sec. 3.3), which Torch-Pruning's ``GroupMagnitudeImportance`` also sums. A channel
  the next layers barely read scores low even when its own filter is large.
- ``bn_scale``: Σ |γ_c| over the group's BatchNorms (Liu et al. 2017, "Learning Efficient
  Convolutional Networks through Network Slimming"); groups without BatchNorm use ``l1``.
- ``taylor``: first-order Taylor expansion of the loss (Molchanov et al. 2019, "Importance
  Estimation for Neural Network Pruning"): ``(Σ_{w ∈ channel c} w · ∂L/∂w)²`` per batch,
  averaged over a few labelled batches; summed over producers and norms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from modelpress.context import Batch, Context, forward
from modelpress.measure.flops import eval_mode
from modelpress.techniques.pruning.structured.graph import Group, Member

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


def channel_rows(tensor: torch.Tensor, member: Member, size: int, dim: int) -> torch.Tensor:
    """``(size, rest)``: the slice of ``tensor`` for each of ``member``'s ``size`` channels.

    Channel c covers ``expand`` consecutive positions starting at ``offset + c·expand``
    along ``dim``.
    """
    span = tensor.detach().narrow(dim, member.offset, size * member.expand).movedim(dim, 0)
    return span.reshape(size, -1)


def _producer_rows(modules: dict[str, nn.Module], group: Group, name: str) -> list[torch.Tensor]:
    rows = []
    for m in group.producers:
        tensor = getattr(modules[m.module], name, None)
        if tensor is not None:
            rows.append(channel_rows(tensor, m, group.size, 0))
    return rows


def magnitude_scores(modules: dict[str, nn.Module], group: Group, p: int) -> torch.Tensor:
    """Σ over producers of the ``p``-norm of each channel's weights (``p`` = 1 or 2)."""
    rows = _producer_rows(modules, group, "weight")
    return sum(r.float().norm(p=p, dim=1) for r in rows)  # type: ignore[return-value]


def group_magnitude_scores(modules: dict[str, nn.Module], group: Group, p: int) -> torch.Tensor:
    """``‖θ_c‖_p`` with θ_c every weight, bias and norm parameter of channel c in the group."""
    total = torch.zeros(group.size)
    for m in group.members:
        module = modules[m.module]
        names = ("weight",) if m.role == "in" else ("weight", "bias")
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, torch.Tensor):
                rows = channel_rows(param, m, group.size, 1 if m.role == "in" else 0)
                total += rows.float().abs().pow(p).sum(1)
    return total.pow(1 / p)


def bn_scale_scores(modules: dict[str, nn.Module], group: Group) -> torch.Tensor:
    """Σ |γ_c| over the group's BatchNorms; the L1 filter norm where it has none."""
    scales = [
        channel_rows(modules[m.module].weight, m, group.size, 0).abs().sum(1)
        for m in group.members
        if m.role == "norm" and isinstance(modules[m.module], nn.modules.batchnorm._BatchNorm)
    ]
    return sum(scales) if scales else magnitude_scores(modules, group, 1)  # type: ignore[return-value]


def taylor_scores(
    model: nn.Module, groups: list[Group], batches: Iterable[Batch], ctx: Context
) -> list[torch.Tensor]:
    """Per group, ``mean over batches of (Σ_{w ∈ c} w · ∂L/∂w)²`` for each channel c.

    The model runs in eval mode (batch-norm running statistics are used and left untouched,
    dropout is off, so the scores are deterministic) and only gradients are computed; every
    submodule's mode and the parameters' gradients are restored.
    """
    modules = dict(model.named_modules())
    totals = [torch.zeros(g.size) for g in groups]
    saved = {n: p.grad for n, p in model.named_parameters()}
    count = 0
    try:
        with eval_mode(model):
            for batch in batches:
                model.zero_grad(set_to_none=True)
                ctx.loss_fn(forward(model, batch), batch).backward()
                for total, group in zip(totals, groups, strict=True):
                    total += _first_order(modules, group) ** 2
                count += 1
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]
    return [t / max(count, 1) for t in totals]


def _first_order(modules: dict[str, nn.Module], group: Group) -> torch.Tensor:
    """Σ w · ∂L/∂w over each channel's weights, biases and norm parameters."""
    score = torch.zeros(group.size)
    for m in group.members:
        if m.role not in ("out", "depthwise", "norm"):
            continue
        for name in ("weight", "bias"):
            param: Any = getattr(modules[m.module], name, None)
            if isinstance(param, nn.Parameter) and param.grad is not None:
                product = channel_rows(param * param.grad, m, group.size, 0)
                score += product.sum(1).float()
    return score


def group_scores(
    model: nn.Module,
    groups: list[Group],
    importance: str,
    ctx: Context,
    batches: Iterable[Batch] | None = None,
) -> list[torch.Tensor]:
    """Channel scores for every group under ``importance`` (l1, l2, group_l1, group_l2,
    bn_scale, taylor)."""
    modules = dict(model.named_modules())
    if importance == "taylor":
        return taylor_scores(model, groups, batches or [], ctx)
    if importance == "bn_scale":
        return [bn_scale_scores(modules, g) for g in groups]
    p = 1 if importance.endswith("l1") else 2
    if importance.startswith("group_"):
        return [group_magnitude_scores(modules, g, p) for g in groups]
    return [magnitude_scores(modules, g, p) for g in groups]
