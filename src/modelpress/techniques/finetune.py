"""The ``train`` stage: fine-tune with the one training loop and any pending callbacks."""

from __future__ import annotations

from torch import nn

from modelpress.context import Context
from modelpress.registry import technique
from modelpress.train import TrainConfig, fit


@technique("train", TrainConfig, needs=("training",))
def apply_train(model: nn.Module, cfg: TrainConfig, ctx: Context) -> nn.Module:
    """Fine-tune the model; masks and quantizers stay in force; runs earlier stages' callbacks."""
    callbacks, ctx.callbacks = ctx.callbacks, []
    summary = fit(model, cfg, ctx, callbacks)
    ctx.report("steps", summary["steps"])
    ctx.report("final_loss", round(summary["final_loss"], 6))
    return model
