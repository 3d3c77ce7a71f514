"""The one training loop. Fine-tuning, QAT, distillation and gradual pruning all run here.

Techniques that act during training do not write loops: they register a :class:`Callback`
on the pipeline context, and the next ``train`` stage runs it (step/epoch hooks, and
:meth:`Callback.loss` to change the loss, e.g. to add a distillation term).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TechniqueConfig
from modelpress.context import Batch, Context, forward
from modelpress.data.augment import Augmentation, augment_batch
from modelpress.errors import TrainingError


class TrainConfig(TechniqueConfig):
    """Fine-tuning: optimizer, learning rate schedule and length."""

    epochs: int = Field(1, ge=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for adamw).")
    batch_size: int = Field(64, ge=1, description="Batch size when data comes as a spec.")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="LR schedule.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this.")
    crop_padding: int = Field(
        0, ge=0, description="Augment: zero-pad images by this much, random crop back (0: off)."
    )
    hflip: bool = Field(False, description="Augment: flip images left-right with p = 1/2.")
    rotate_degrees: float = Field(
        0.0, ge=0, le=180, description="Augment: rotate images by up to this many degrees."
    )
    scale_range: float = Field(
        0.0, ge=0, lt=1, description="Augment: scale images by a factor in [1 - s, 1 + s]."
    )
    elastic_alpha: float = Field(
        0.0,
        ge=0,
        description="Augment: elastic distortion strength in pixels (Simard et al. 2003; 34 "
        "on MNIST; 0: off).",
    )
    elastic_sigma: float = Field(
        4.0, gt=0, description="Augment: smoothness (Gaussian sigma, pixels) of the elastic field."
    )

    @property
    def augmentation(self) -> Augmentation:
        """The image augmentation these settings ask for."""
        return Augmentation(**{f.name: getattr(self, f.name) for f in fields(Augmentation)})

    @model_validator(mode="after")
    def _some_training(self) -> TrainConfig:
        if self.epochs == 0 and self.max_steps is None:
            raise ValueError("'epochs' is 0 and 'max_steps' is not set, so nothing would train")
        return self


@dataclass
class TrainState:
    """What callbacks see: the model, optimizer, and where training is."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ctx: Context
    total_steps: int
    step: int = 0
    epoch: int = 0
    loss: float = math.nan
    history: list[float] = field(default_factory=list)


class Callback:
    """Hooks into the training loop; override what you need. All default to doing nothing.

    Attributes:
        replaces_task_loss: when any callback sets it, the task loss (``ctx.loss_fn``) is not
            computed and :meth:`loss` starts from zero, so unlabeled data can train (e.g.
            distillation with no hard-label term).
    """

    replaces_task_loss: bool = False

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step."""

    def on_step_begin(self, state: TrainState) -> None:
        """Before the forward pass of each step."""

    def loss(
        self, state: TrainState, batch: Batch, outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        """Return the loss to minimise (default: unchanged)."""
        return loss

    def on_step_end(self, state: TrainState) -> None:
        """After the optimizer step."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After each epoch."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg`` names over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: constant, or cosine decay ``lr * (1 + cos(pi t / T)) / 2``."""
    if cfg.schedule == "constant" or total_steps <= 1:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _steps_per_epoch(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def fit(
    model: nn.Module, cfg: TrainConfig, ctx: Context, callbacks: list[Callback] | None = None
) -> dict[str, float]:
    """Train ``model`` in place with ``ctx.loss_fn`` plus the callbacks' loss changes.

    Args:
        model: the model (parametrizations such as masks and fake quantizers stay in force).
        cfg: optimizer, schedule and length.
        ctx: supplies the batches, the loss, the seed and the progress flag.
        callbacks: hooks run at each step and epoch, in order.

    Returns:
        ``{"steps": ..., "final_loss": ..., "seconds": ...}``.

    Raises:
        TrainingError: the loss became NaN or infinite.
        DataError: no training data was supplied.
    """
    callbacks = list(callbacks or [])
    torch.manual_seed(ctx.seed * 7919 + ctx.stage_index)
    per_epoch = _steps_per_epoch(ctx.training_batches(cfg.batch_size))
    total = cfg.max_steps or 0
    if per_epoch is not None and cfg.epochs:
        total = min(total, per_epoch * cfg.epochs) if total else per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg)
    state = TrainState(model=model, optimizer=optimizer, ctx=ctx, total_steps=total)
    augment_gen = ctx.generator(offset=7)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    for cb in callbacks:
        cb.on_train_begin(state)
    with _progress(ctx.progress, total) as advance:
        epochs = cfg.epochs if cfg.epochs else 1 << 30
        while state.epoch < epochs and (not total or state.step < total):
            for batch in ctx.training_batches(cfg.batch_size, epoch=state.epoch):
                batch = augment_batch(batch, cfg.augmentation, augment_gen)
                _train_step(state, batch, cfg, callbacks)
                advance(state.loss)
                if total and state.step >= total:
                    break
            state.epoch += 1
            for cb in callbacks:
                cb.on_epoch_end(state)
    for cb in callbacks:
        cb.on_train_end(state)
    model.train(was_training)
    return {"steps": state.step, "final_loss": state.loss, "seconds": time.perf_counter() - start}


def _train_step(
    state: TrainState, batch: Batch, cfg: TrainConfig, callbacks: list[Callback]
) -> None:
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, state.total_steps, cfg)
    for cb in callbacks:
        cb.on_step_begin(state)
    outputs = forward(state.model, batch)
    if any(cb.replaces_task_loss for cb in callbacks):
        loss = torch.zeros((), requires_grad=True)
    else:
        loss = state.ctx.loss_fn(outputs, batch)
    for cb in callbacks:
        loss = cb.loss(state, batch, outputs, loss)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"train: the loss became {loss.item()} at step {state.step}; lower 'lr' "
            f"(now {cfg.lr}) or check the data for NaN/inf."
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.step += 1
    state.loss = float(loss.detach())
    state.history.append(state.loss)
    for cb in callbacks:
        cb.on_step_end(state)


class _NullAdvance:
    def __call__(self, loss: float) -> None:
        pass


class _progress:
    """A rich progress bar over steps when enabled; a no-op otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return _NullAdvance()
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task("train", total=self.total or None)

        def advance(loss: float) -> None:
            self._bar.update(task, advance=1, description=f"train loss {loss:.4f}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def train_model(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, float]:
    """Train a model from scratch or further, outside any recipe (e.g. a baseline).

    Args:
        model: the model, trained in place.
        data: a :class:`~modelpress.data.DataBundle` or re-iterable labelled batches.
        cfg: the training config; or give its fields as keyword ``overrides``.
        seed: seeds shuffling, dropout and initialisation-free randomness.
        progress: show a progress bar.

    Returns:
        ``{"steps": ..., "final_loss": ..., "seconds": ...}``.
    """
    from modelpress.config import parse_config
    from modelpress.data import DataBundle

    if cfg is None:
        cfg = parse_config(TrainConfig, overrides, owner="train")
    bundle = data if isinstance(data, DataBundle) else None
    ctx = Context(data=bundle, batches=None if bundle else data, seed=seed, progress=progress)
    return fit(model, cfg, ctx)
