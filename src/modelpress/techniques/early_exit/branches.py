"""``early_exit.branches``: exit heads after named layers (BranchyNet, Teerapittayanon et al. 2016).

The model becomes an :class:`~modelpress.techniques.early_exit.model.EarlyExitModel`. During
the next ``train`` stage the backbone and heads train jointly (or the heads alone, with
``freeze_backbone``) on the weighted sum of every exit's loss

    L = w_final * L_task + sum_i w_i * L_i,
    L_i = (1 - alpha) * CE(z_i, y) + alpha * T^2 * KL(softmax(z_final / T) || softmax(z_i / T))

(``alpha = 0`` unless ``distill_from_final``). At the end of that stage one threshold per exit
is calibrated on a validation split carved out of the training data before training (see
:mod:`~modelpress.techniques.early_exit.calibrate`), so inference stops at the first
confident exit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from modelpress.config import TechniqueConfig
from modelpress.context import Batch, Context
from modelpress.data import DataBundle
from modelpress.edits import adopt, record_edit
from modelpress.errors import (
    ConfigError,
    DataError,
    NoMatchingModulesError,
    UnsupportedModuleError,
)
from modelpress.measure.flops import call_model, eval_mode
from modelpress.registry import technique
from modelpress.techniques.early_exit.calibrate import calibrate
from modelpress.techniques.early_exit.heads import ExitHead, init_head
from modelpress.techniques.early_exit.model import EarlyExitModel
from modelpress.train import Callback, TrainState

NAME = "early_exit.branches"
VAL_BATCH = 256


class BranchesConfig(TechniqueConfig):
    """Exit heads after named layers, trained jointly, thresholds calibrated on held-out data."""

    exits: list[str] = Field(
        default_factory=list,
        description="Module names to attach exit heads after, in forward order.",
    )
    pool: int = Field(2, ge=1, le=32, description="Heads pool 4-D features to pool x pool.")
    hidden: int = Field(0, ge=0, le=4096, description="Hidden width of each head (0: none).")
    criterion: Literal["entropy", "max_prob"] = Field(
        "entropy", description="Exit if softmax entropy <= tau, or max probability >= tau."
    )
    weights: list[float] | None = Field(
        None, description="Loss weight per exit, then the final output's (default: all 1)."
    )
    distill_from_final: bool = Field(
        False, description="Also distil each exit from the final output's softmax."
    )
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="Share of each exit's loss taken by that distillation."
    )
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature T there.")
    freeze_backbone: bool = Field(False, description="Train the heads only.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the training data held out to calibrate on."
    )
    target_accuracy: float | None = Field(
        None, ge=0, le=1, description="Cascade accuracy to keep on the validation split."
    )
    max_accuracy_drop: float = Field(
        0.0, ge=0, le=1, description="Else: allowed drop below the final output's accuracy."
    )
    thresholds: list[float | None] | None = Field(
        None, description="Fixed thresholds per exit (null: disabled) instead of calibrating."
    )

    @field_validator("exits")
    @classmethod
    def _some_exits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one module, e.g. ['relu1']")
        if len(set(value)) != len(value):
            raise ValueError("an exit is named twice")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (
            any(not math.isfinite(w) or w < 0 for w in value) or not any(value)
        ):
            raise ValueError("weights must be finite, >= 0 and not all 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BranchesConfig:
        n = len(self.exits)
        if self.weights is not None and len(self.weights) != n + 1:
            raise ValueError(
                f"'weights' needs {n + 1} values (one per exit, then the final output); "
                f"got {len(self.weights)}"
            )
        if self.thresholds is not None:
            check_thresholds(self.thresholds, n, self.criterion)
            if self.target_accuracy is not None:
                raise ValueError("give either 'thresholds' or 'target_accuracy', not both")
        if self.target_accuracy is not None and "max_accuracy_drop" in self.model_fields_set:
            raise ValueError("give either 'target_accuracy' or 'max_accuracy_drop', not both")
        return self


def check_thresholds(values: Sequence[float | None], n_exits: int, criterion: str) -> None:
    """Raise ValueError unless ``values`` holds ``n_exits`` thresholds valid for ``criterion``:
    an entropy ``>= 0`` or a probability in ``[0, 1]``, finite, or None (exit disabled)."""
    if len(values) != n_exits:
        raise ValueError(f"'thresholds' needs one value per exit ({n_exits}); got {len(values)}")
    hi = math.inf if criterion == "entropy" else 1.0
    for v in values:
        if v is not None and not (math.isfinite(v) and 0 <= v <= hi):
            what = "an entropy >= 0" if criterion == "entropy" else "a probability in [0, 1]"
            raise ValueError(f"threshold {v!r} is not {what} (null disables an exit)")


def exit_loss(
    task_loss: Tensor,
    exit_logits: Sequence[Tensor],
    final_logits: Tensor,
    labels: Tensor,
    weights: Sequence[float],
    *,
    distill_alpha: float = 0.0,
    temperature: float = 1.0,
) -> Tensor:
    """BranchyNet's joint loss ``w_final * L_task + sum_i w_i * L_i``.

    ``L_i = (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_final / T) || softmax(z_i / T))``,
    the distillation term (Hinton et al. 2015) against the detached final output.

    Args:
        task_loss: the task loss of the final output (scalar).
        exit_logits: ``(B, K)`` logits of each exit head.
        final_logits: ``(B, K)`` logits of the final output.
        labels: ``(B,)`` class indices.
        weights: one per exit, then the final output's.
        distill_alpha: ``alpha``; 0 is plain cross-entropy.
        temperature: ``T``.

    Returns:
        The scalar loss.
    """
    total = weights[-1] * task_loss
    target = None
    if distill_alpha > 0:
        target = F.softmax(final_logits.detach() / temperature, dim=-1)  # (B, K)
    for w, z in zip(weights, exit_logits, strict=False):  # weights[-1] is the final's
        term = F.cross_entropy(z, labels)
        if target is not None:
            log_p = F.log_softmax(z / temperature, dim=-1)
            kd = F.kl_div(log_p, target, reduction="batchmean") * temperature**2
            term = (1 - distill_alpha) * term + distill_alpha * kd
        total = total + w * term
    return total


class ExitTraining(Callback):
    """Adds the exit losses during the ``train`` stage; calibrates the thresholds at its end."""

    def __init__(self, model: EarlyExitModel, cfg: BranchesConfig, ctx: Context) -> None:
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.weights = cfg.weights or [1.0] * (len(cfg.exits) + 1)
        self.frozen: list[nn.Parameter] = []

    def freeze(self) -> None:
        """Stop the backbone's parameters from training (``freeze_backbone``)."""
        self.frozen = [p for p in self.model.backbone.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)

    def on_train_begin(self, state: TrainState) -> None:
        """With a frozen backbone, keep its BatchNorm statistics and dropout as in eval."""
        if self.cfg.freeze_backbone:
            self.model.backbone.eval()

    def loss(self, state: TrainState, batch: Batch, outputs: Any, loss: Tensor) -> Tensor:
        """Add the weighted exit losses to the task loss."""
        logits = self.model.exit_logits
        if len(logits) != len(self.cfg.exits) or any(z is None for z in logits):
            raise DataError(
                f"{NAME}: an exit layer of {self.cfg.exits} did not run in the training "
                "forward; train the model that early_exit.branches returned."
            )
        final = outputs.logits if hasattr(outputs, "logits") else outputs
        labels = _labels(batch)
        alpha = self.cfg.distill_alpha if self.cfg.distill_from_final else 0.0
        return exit_loss(
            loss, logits, final, labels, self.weights,
            distill_alpha=alpha, temperature=self.cfg.temperature,
        )  # fmt: skip

    def on_step_end(self, state: TrainState) -> None:
        """Drop the step's exit logits (they hold the autograd graph)."""
        self.model.exit_logits = []

    def on_train_end(self, state: TrainState) -> None:
        """Unfreeze, then calibrate the thresholds on the validation split and report."""
        self.model.exit_logits = []
        for p in self.frozen:
            p.requires_grad_(True)
        if self.cfg.thresholds is not None:
            self.ctx.report("thresholds", self.model.threshold_values())
            return
        if self.ctx.data is None or self.ctx.data.val is None:
            raise DataError(f"{NAME}: the validation split to calibrate on is gone.")
        report = calibrate(
            self.model,
            self.ctx.data.loader("val", VAL_BATCH),
            target_accuracy=self.cfg.target_accuracy,
            max_accuracy_drop=self.cfg.max_accuracy_drop,
        )
        for key, value in report.items():
            self.ctx.report(key, value)
        self.ctx.report("exits", [*self.cfg.exits, "final"])


def _labels(batch: Batch) -> Tensor:
    if isinstance(batch, dict) and "labels" in batch:
        return batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    raise DataError(
        f"{NAME} trains its exits on labelled batches ((inputs, labels) or a dict with "
        "'labels'); pass labelled data."
    )


def _validation_data(ctx: Context, cfg: BranchesConfig) -> DataBundle | None:
    if cfg.thresholds is not None:
        return None
    if ctx.data is None:
        raise DataError(
            f"{NAME} calibrates its thresholds on a validation split carved out of the "
            "training data, so it needs the data as a spec (data='digits') or a DataBundle, "
            "not raw batches; or give fixed 'thresholds'."
        )
    return ctx.data.with_validation(cfg.validation_fraction, ctx.seed)


@dataclass(frozen=True)
class ExitProbe:
    """What one traced forward tells about the exits: ``(rank, channels)`` of each exit's
    features and the number of classes of the final output."""

    features: list[tuple[int, int]]
    num_classes: int


def _trace(model: nn.Module, exits: Sequence[str], inputs: Any) -> tuple[list[str], dict, Any]:
    """Run ``model`` once (eval, no grad): the order modules finish in, each exit's outputs
    (one per call) and the final output."""
    order: list[str] = []
    seen: dict[str, list[Any]] = {name: [] for name in exits}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            order.append(name)
            if name in seen:
                seen[name].append(output)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with eval_mode(model), torch.no_grad():
            final = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return order, seen, final


def probe_exits(model: nn.Module, exits: Sequence[str], inputs: Any, *, owner: str) -> ExitProbe:
    """Check that each exit runs once, before the output, in the listed order, and yields 2-D,
    3-D or 4-D features; measure the features and the number of classes.

    Raises:
        DataError: no example inputs to trace with.
        UnsupportedModuleError: the output is not ``(batch, classes)`` logits, or an exit
            does not run exactly once or gives no usable features.
        ConfigError: an exit is not before the output, or the exits are out of order.
    """
    if inputs is None:
        raise DataError(f"{owner} needs example inputs to find the exits' feature shapes.")
    order, seen, final = _trace(model, exits, inputs)
    final = final.logits if hasattr(final, "logits") else final
    if not (isinstance(final, Tensor) and final.dim() == 2):
        got = tuple(final.shape) if isinstance(final, Tensor) else type(final).__name__
        raise UnsupportedModuleError(
            f"{owner}: the model outputs {got}; exits need (batch, classes) logits."
        )
    features, positions = [], []
    for name in exits:
        if len(seen[name]) != 1:
            raise UnsupportedModuleError(
                f"{name}: runs {len(seen[name])} times per forward; an exit needs a module "
                "that runs exactly once."
            )
        out = seen[name][0]
        feats = out if isinstance(out, Tensor) else next(iter(out), None)
        pos = len(order) - 1 - order[::-1].index(name)
        later = [n for n in order[pos + 1 :] if not name.startswith(n + ".")]
        if not later or feats is final:
            raise ConfigError(
                f"{owner}: exit {name!r} is not before the model's output (nothing runs after "
                "it); choose an earlier module."
            )
        if not isinstance(feats, Tensor) or feats.dim() not in (2, 3, 4):
            got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise UnsupportedModuleError(
                f"{name}: outputs {got}, not (B, C), (B, T, C) or (B, C, H, W) features."
            )
        features.append((feats.dim(), int(feats.shape[2 if feats.dim() == 3 else 1])))
        positions.append(pos)
    if positions != sorted(positions):
        in_order = [n for _, n in sorted(zip(positions, exits, strict=True))]
        raise ConfigError(f"{owner}: list 'exits' in forward order: {in_order}.")
    return ExitProbe(features, int(final.shape[-1]))


def attach_exits(
    model: nn.Module, cfg: BranchesConfig, probe: ExitProbe, generator: torch.Generator
) -> EarlyExitModel:
    """Wrap ``model`` with seeded heads for the probed exits and record the ``early_exit`` edit.

    Returns:
        The :class:`EarlyExitModel`, carrying ``model``'s source and edit log.
    """
    heads = [
        init_head(ExitHead(rank, ch, probe.num_classes, cfg.pool, cfg.hidden), generator)
        for rank, ch in probe.features
    ]
    wrapper = adopt(EarlyExitModel(model, cfg.exits, heads, cfg.criterion), model)
    record_edit(
        wrapper, "early_exit", exits=list(cfg.exits), num_classes=probe.num_classes,
        heads=[{"rank": r, "channels": c} for r, c in probe.features],
        pool=cfg.pool, hidden=cfg.hidden, criterion=cfg.criterion,
    )  # fmt: skip
    return wrapper


@technique(NAME, BranchesConfig, needs=("later_train", "training"))
def apply_branches(model: nn.Module, cfg: BranchesConfig, ctx: Context) -> nn.Module:
    """Attach early-exit heads, train them in the next train stage, calibrate (BranchyNet)."""
    if any(isinstance(m, EarlyExitModel) for m in model.modules()):
        raise ConfigError(f"{NAME}: the model already has exits; apply it once.")
    names = dict(model.named_modules())
    for name in cfg.exits:
        if not name or name not in names:
            some = ", ".join(n for n in list(names)[1:7])
            raise NoMatchingModulesError(
                f"{NAME}: exit {name!r} is not a module of the model; modules include: {some}."
            )
    bundle = _validation_data(ctx, cfg)
    probe = probe_exits(model, cfg.exits, ctx.example_inputs, owner=NAME)
    wrapper = attach_exits(model, cfg, probe, ctx.generator(offset=5))
    if cfg.thresholds is not None:
        wrapper.set_thresholds(cfg.thresholds)
    if bundle is not None:
        ctx.data = bundle
    callback = ExitTraining(wrapper, cfg, ctx)
    if cfg.freeze_backbone:
        callback.freeze()
    ctx.callbacks.append(callback)
    return wrapper
