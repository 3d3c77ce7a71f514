"""``prune.gradual``: automated gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Runs as a callback inside the next ``train`` stage. Over the training steps ``t`` from
``t0`` to ``t1`` the sparsity rises along the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3

and every ``frequency`` steps the masks are recomputed from the current weights (magnitude,
layer-wise or global), so the network has time to recover between pruning steps. With
``n`` set, the same schedule drives N:M sparsity: each group of ``m`` inputs keeps
``m - round(s_t * m)`` weights, ending at ``n`` of ``m``.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator
from torch import nn

from modelpress.context import Context
from modelpress.parametrizations import effective_tensor
from modelpress.registry import technique
from modelpress.targeting import select_weighted
from modelpress.techniques.pruning.nm import NM_PRUNABLE, check_divisible, nm_mask
from modelpress.techniques.pruning.unstructured import (
    PRUNABLE,
    Selected,
    UnstructuredConfig,
    apply_masks,
    sparsity_masks,
)
from modelpress.train import Callback, TrainState


class GradualConfig(UnstructuredConfig):
    """Sparsity ramped from ``initial_sparsity`` to ``sparsity`` during the next train stage."""

    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="Sparsity at the start step.")
    start_fraction: float = Field(
        0.0, ge=0, lt=1, description="Where the ramp starts, as a fraction of the train steps."
    )
    end_fraction: float = Field(
        0.75, gt=0, le=1, description="Where the final sparsity is reached (fraction of steps)."
    )
    frequency: int = Field(10, ge=1, description="Steps between mask updates.")
    n: int | None = Field(None, ge=1, description="Ramp to n:m sparsity instead (weights kept).")
    m: int = Field(4, ge=2, le=64, description="Group size for n:m.")

    @model_validator(mode="after")
    def _consistent(self) -> GradualConfig:
        if self.end_fraction <= self.start_fraction:
            raise ValueError("'end_fraction' must be larger than 'start_fraction'")
        if self.n is not None and self.n >= self.m:
            raise ValueError(f"'n' ({self.n}) must be smaller than 'm' ({self.m})")
        if self.n is None and self.initial_sparsity > self.sparsity:
            raise ValueError("'initial_sparsity' must not exceed 'sparsity'")
        return self

    @property
    def final_sparsity(self) -> float:
        """The sparsity reached at the end of the ramp."""
        return (self.m - self.n) / self.m if self.n is not None else self.sparsity


def cubic_sparsity(step: int, t0: int, t1: int, s_i: float, s_f: float) -> float:
    """Zhu & Gupta's schedule: ``s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3``, clamped."""
    progress = min(max((step - t0) / max(t1 - t0, 1), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


class GradualPruning(Callback):
    """Recomputes the masks on the cubic schedule during training."""

    def __init__(self, selected: Selected, cfg: GradualConfig, ctx: Context) -> None:
        self.selected, self.cfg, self.ctx = selected, cfg, ctx
        self.history: list[tuple[int, float]] = []

    def prune_to(self, sparsity: float) -> None:
        """Set every mask for ``sparsity`` (magnitude of the current weights)."""
        scores = {name: effective_tensor(m).abs() for name, m in self.selected}
        if self.cfg.n is None:
            masks = sparsity_masks(
                self.selected, scores, sparsity, self.cfg.scope, self.cfg.layer_sparsity
            )
        else:
            keep = max(self.cfg.m - round(sparsity * self.cfg.m), self.cfg.n)
            masks = {name: nm_mask(s, keep, self.cfg.m) for name, s in scores.items()}
        apply_masks(self.selected, masks, None)

    def _window(self, total: int) -> tuple[int, int]:
        t0 = math.floor(self.cfg.start_fraction * total)
        return t0, max(t0 + 1, math.floor(self.cfg.end_fraction * total))

    def on_step_begin(self, state: TrainState) -> None:
        """Prune at ``t0``, every ``frequency`` steps after, and at ``t1``."""
        t0, t1 = self._window(state.total_steps)
        t = state.step
        if t0 <= t <= t1 and ((t - t0) % self.cfg.frequency == 0 or t == t1):
            s_t = cubic_sparsity(t, t0, t1, self.cfg.initial_sparsity, self.cfg.final_sparsity)
            self.prune_to(s_t)
            self.history.append((t, round(s_t, 4)))

    def on_train_end(self, state: TrainState) -> None:
        """Reach the final sparsity even if training stopped before ``t1``; report."""
        if not self.history or self.history[-1][1] < round(self.cfg.final_sparsity, 4):
            self.prune_to(self.cfg.final_sparsity)
            self.history.append((state.step, round(self.cfg.final_sparsity, 4)))
        self.ctx.report("schedule", self.history)
        zeros = {n: float((effective_tensor(m) == 0).float().mean()) for n, m in self.selected}
        self.ctx.report("sparsity", {n: round(z, 4) for n, z in zeros.items()})


@technique("prune.gradual", GradualConfig, needs=("later_train",))
def apply_gradual(model: nn.Module, cfg: GradualConfig, ctx: Context) -> nn.Module:
    """Prune gradually on a cubic schedule during the next train stage (Zhu & Gupta)."""
    supported = NM_PRUNABLE if cfg.n is not None else PRUNABLE
    selected = select_weighted(model, cfg, owner="prune.gradual", supported=supported)
    if cfg.n is not None:
        check_divisible(selected, cfg.m, "prune.gradual")
    callback = GradualPruning(selected, cfg, ctx)
    callback.prune_to(cfg.initial_sparsity if cfg.n is None else 0.0)
    ctx.callbacks.append(callback)
    return model
