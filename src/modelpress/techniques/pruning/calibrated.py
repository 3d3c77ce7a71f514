"""What ``prune.wanda`` and ``prune.sparsegpt`` share: one-shot pruning from calibration
activations, per output row or N:M — the config, the layer selection checked before any
change, the per-row selection and the sparsity report.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Batch, Context
from modelpress.layerwise import LAYERWISE, Selected, check_supported
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.nm import check_divisible


class CalibratedPruningConfig(TargetedConfig):
    """One-shot pruning from calibration activations, unstructured per row or N:M."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of each row's weights to zero.")
    n: int | None = Field(None, ge=1, description="Keep n of every m inputs (set with m).")
    m: int | None = Field(None, ge=2, le=64, description="N:M group size along the inputs.")
    n_samples: int = Field(128, ge=1, description="Calibration samples.")
    batch_size: int = Field(16, ge=1, description="Calibration samples per forward pass.")

    @model_validator(mode="after")
    def _nm_or_sparsity(self) -> CalibratedPruningConfig:
        if (self.n is None) != (self.m is None):
            raise ValueError("'n' and 'm' must be set together (e.g. n: 2, m: 4)")
        if self.n is not None and self.m is not None:
            if self.n >= self.m:
                raise ValueError(f"'n' ({self.n}) must be smaller than 'm' ({self.m})")
            if "sparsity" in self.model_fields_set:
                raise ValueError("set either 'sparsity' or 'n' and 'm', not both")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` when N:M sparsity is asked, else None."""
        return (self.n, self.m) if self.n is not None and self.m is not None else None


def select_calibrated(
    model: nn.Module, cfg: CalibratedPruningConfig, ctx: Context, owner: str
) -> tuple[Selected, list[Batch]]:
    """The layers to prune and the calibration batches, checked before anything changes.

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: an unsupported or grouped layer, or (N:M) inputs not a
            multiple of ``m``.
        DataError: no calibration data.
    """
    selected = select_weighted(model, cfg, owner=owner, supported=LAYERWISE)
    check_supported(selected, owner)
    if cfg.m is not None:
        check_divisible(selected, cfg.m, owner)
    return selected, list(ctx.calibration_batches(cfg.n_samples, cfg.batch_size))


def report_sparsity(ctx: Context, masks: dict[str, torch.Tensor]) -> None:
    """Report each layer's pruned fraction, as :func:`~.unstructured.apply_masks` does."""
    ctx.report("sparsity", {n: round(1 - float(m.float().mean()), 4) for n, m in masks.items()})


def prune_lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` lowest scores of each row of ``scores`` ``(rows, cols)`` (ties: the
    earlier position goes first); returns a bool tensor with exactly ``k`` True per row."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        order = torch.argsort(scores, dim=1, stable=True)
        pruned.scatter_(1, order[:, :k], True)
    return pruned
