"""``prune.wanda``: pruning by weights and activations (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models").

Each weight is scored by its magnitude times the norm of the input it multiplies,

    S_ij = |W_ij| * ||X_j||_2,

with ``X_j`` the ``j``-th input column over all calibration tokens (for a convolution, the
im2col column of input channel and kernel position). The lowest ``sparsity`` fraction of each
output row is removed, or, with ``n``/``m``, all but the ``n`` highest of each ``m``
consecutive inputs. No weight is updated. Calibration runs block by block
(:mod:`modelpress.layerwise`), so each block's norms come from the already pruned blocks
before it.
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.context import Context
from modelpress.layerwise import ColumnNorms, calibrate_layerwise, input_width
from modelpress.parametrizations import effective_tensor
from modelpress.registry import technique
from modelpress.techniques.pruning.calibrated import (
    CalibratedPruningConfig,
    prune_lowest_per_row,
    report_sparsity,
    select_calibrated,
)
from modelpress.techniques.pruning.mask import set_mask
from modelpress.techniques.pruning.nm import nm_mask


class WandaConfig(CalibratedPruningConfig):
    """Wanda: prune by |weight| x input-activation norm, per output row or N:M."""


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||_2`` in the weight's shape.

    Args:
        weight: ``(out, in)`` or ``(out, in, *k)``.
        input_norms: ``(in * prod(k),)`` norms of the input columns, in the order of
            ``weight.flatten(1)``.
    """
    return weight.abs() * input_norms.reshape(weight.shape[1:])


def wanda_mask(
    weight: torch.Tensor,
    input_norms: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda's keep mask: per output row, keep all but the ``round(sparsity * cols)`` lowest
    scores; with ``nm = (n, m)``, the ``n`` highest of each ``m`` consecutive inputs (at
    each kernel position, as :func:`~.nm.nm_mask` groups them).

    Returns:
        A bool tensor of ``weight``'s shape.
    """
    scores = wanda_scores(weight, input_norms)
    if nm is not None:
        return nm_mask(scores, *nm)
    flat = scores.flatten(1)  # (out, cols)
    return ~prune_lowest_per_row(flat, round(sparsity * flat.shape[1])).reshape(weight.shape)


class WandaPruner:
    """The layer callback: input-column norms in, a mask out (see :func:`wanda_mask`)."""

    def __init__(self, cfg: WandaConfig) -> None:
        self.cfg = cfg
        self.masks: dict[str, torch.Tensor] = {}

    def stats(self, name: str, module: nn.Module) -> ColumnNorms:
        """Fresh norms of the layer's input columns."""
        return ColumnNorms(input_width(module))

    def process(self, name: str, module: nn.Module, stats: ColumnNorms) -> None:
        """Mask the layer's lowest-scoring weights; earlier masks stay (they are narrowed)."""
        keep = wanda_mask(effective_tensor(module), stats.norms, self.cfg.sparsity, self.cfg.nm)
        set_mask(module, "weight", keep)
        self.masks[name] = keep


@technique("prune.wanda", WandaConfig, needs=("calibration",))
def apply_wanda(model: nn.Module, cfg: WandaConfig, ctx: Context) -> nn.Module:
    """Prune by |weight| x input-activation norm per row or N:M, layer by layer (Wanda)."""
    selected, batches = select_calibrated(model, cfg, ctx, "prune.wanda")
    pruner = WandaPruner(cfg)
    calibrate_layerwise(model, batches, selected, pruner, owner="prune.wanda")
    report_sparsity(ctx, pruner.masks)
    return model
