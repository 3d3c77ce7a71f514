"""``quant.ternary``: ternary weights ``alpha * {-1, 0, +1}`` (Li et al. 2016, "Ternary Weight
Networks").

Per output channel (or per tensor, as in the paper) with ``n`` weights, TWN's approximate
solution of ``min ||W - alpha T||^2`` is the threshold ``Delta = 0.7 * mean|W|`` (the factor
is ``threshold_factor``), ``T = sign(W) * 1_{|W| > Delta}``, and
``alpha = mean of |W_i| over |W_i| > Delta``. ``Delta`` and ``alpha`` are recomputed from the
real-valued weights at every forward pass; the next ``train`` stage trains those with the
plain straight-through estimator (``dC/dW = dC/dW_t``, TWN's rule). ``alpha`` is rounded to
``scale_dtype`` in the forward pass.

Storage: the quantizer *is* a 2-bit symmetric :class:`AffineFakeQuant` grid with scale
``alpha`` (zero point 2: codes ``{1, 2, 3}`` decode to ``{-alpha, 0, +alpha}``), so the
artifact holds 2-bit codes and one ``alpha`` per channel, and decodes exactly. Weights an
earlier stage pruned stay zero. Keep the first and last layers in full precision (``ignore``),
as TWN and most low-bit work do.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.parametrizations import add_parametrization, effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.quantization.binary import TRAINABLE
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant, check_unquantized
from modelpress.techniques.quantization.ste import on_dtype_grid, substitute_ste

OWNER = "quant.ternary"


class TernaryConfig(TargetedConfig):
    """Ternary weights ``alpha * {-1, 0, +1}``, trained in the next train stage (TWN)."""

    granularity: Literal["channel", "tensor"] = Field(
        "channel", description="One alpha and threshold per output channel, or per tensor."
    )
    threshold_factor: float = Field(
        0.7, gt=0, le=1, description="Delta = threshold_factor * mean|W| (TWN: 0.7)."
    )
    scale_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Storage dtype of the scales alpha."
    )


def ternary_threshold(groups: torch.Tensor, factor: float = 0.7) -> torch.Tensor:
    """TWN's threshold ``Delta = factor * mean|W|`` of each row of ``groups`` ``(G, n)``."""
    return factor * groups.abs().mean(dim=1)


def ternary_alpha(groups: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """TWN's scale: the mean of ``|W_i|`` over ``|W_i| > Delta``, per row (0 if none)."""
    kept = groups.abs() > delta[:, None]  # (G, n)
    total = (groups.abs() * kept).sum(dim=1)
    return total / kept.sum(dim=1).clamp(min=1)


def ternarize(
    groups: torch.Tensor, factor: float = 0.7, scale_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha * sign(W) * 1_{|W| > Delta}`` per row of ``groups`` ``(G, n)``; plain STE.

    Args:
        groups: real-valued weights, one row per scale.
        factor: ``Delta = factor * mean|W|``.
        scale_dtype: ``alpha`` is rounded to this storage dtype (and kept positive).

    Returns:
        ``(values, alpha)``: ``(G, n)`` values in ``{-alpha_g, 0, +alpha_g}`` (the gradient
        passes to ``groups`` unchanged) and the ``(G,)`` ``alpha`` as stored.
    """
    w = groups.detach()
    delta = ternary_threshold(w, factor)
    alpha = on_dtype_grid(ternary_alpha(w, delta), scale_dtype)
    t = torch.sign(w) * (w.abs() > delta[:, None])  # (G, n) in {-1, 0, 1}
    return substitute_ste(groups, alpha[:, None] * t), alpha


class TernaryFakeQuant(AffineFakeQuant):
    """A 2-bit symmetric grid whose scale is TWN's ``alpha``, recomputed at every forward.

    ``scale`` always holds the last ``alpha`` (as stored), so the inherited
    :meth:`value_codec` stores codes ``{1, 2, 3}`` for ``{-alpha, 0, +alpha}``.
    """

    def __init__(
        self, weight: torch.Tensor, granularity: str, threshold_factor: float, scale_dtype: str
    ) -> None:
        super().__init__(
            weight,
            2,
            symmetric=True,
            granularity=granularity,  # type: ignore[arg-type]
            group_size=None,
            scale_dtype=scale_dtype,
        )
        self.threshold_factor = threshold_factor
        self.forward(weight.detach())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The ternarized weight (``Delta`` and ``alpha`` from ``w`` itself)."""
        groups = self.layout.to_groups(w)
        out, alpha = ternarize(groups, self.threshold_factor, self.scale_dtype)
        with torch.no_grad():
            self.scale.copy_(alpha)
        return self.layout.from_groups(out).to(w.dtype)


@technique(OWNER, TernaryConfig, needs=("later_train",))
def apply_ternary(model: nn.Module, cfg: TernaryConfig, ctx: Context) -> nn.Module:
    """Ternarize weights to alpha * {-1, 0, +1} per channel and train them next (TWN)."""
    selected = select_weighted(model, cfg, owner=OWNER, supported=TRAINABLE)
    check_unquantized(selected, OWNER)
    for _, module in selected:
        quantizer = TernaryFakeQuant(
            effective_tensor(module), cfg.granularity, cfg.threshold_factor, cfg.scale_dtype
        )
        add_parametrization(module, "weight", quantizer)
    ctx.report("bits", {n: 2 for n, _ in selected})
    return model
