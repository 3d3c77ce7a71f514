"""``EarlyExitModel``: a backbone with exit heads that stops at the first confident exit.

BranchyNet (Teerapittayanon et al. 2016): forward hooks on the exit layers run the heads. In
train mode the model returns the backbone's final output and keeps every exit's logits in
:attr:`EarlyExitModel.exit_logits` for the loss. In eval mode a sample leaves at the first
exit whose head is confident (entropy ``<= tau`` or max probability ``>= tau``); finished
samples leave the batch (the hook returns the layer's output sliced to the unfinished ones)
and when none remain the forward stops. The wrapper returns each sample's logits from the
exit it left at, in the original order, and records in :attr:`last_exit_index` which exit
each sample used (``len(exits)`` is the final output).

The batch may only flow through the exit layers' outputs: a backbone that later combines
them with other per-sample tensors (a residual or attention mask that skips over an exit
layer) cannot drop finished samples there; choose exits at block boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modelpress.context import batch_inputs
from modelpress.edits import edit_op
from modelpress.errors import ConfigError, DataError
from modelpress.measure.flops import call_model, eval_mode
from modelpress.techniques.early_exit.heads import (
    CRITERIA,
    ExitHead,
    disabled_threshold,
    entropy,
    exits_now,
    max_prob,
)


class _Exited(Exception):
    """Raised inside the backbone's forward when every sample has left; the wrapper catches it."""


class _ExitHook:
    """The forward hook on one exit layer (an object, so ``copy.deepcopy`` re-binds it)."""

    def __init__(self, owner: EarlyExitModel, index: int) -> None:
        self.owner, self.index = owner, index
        self.head = owner.heads[index]

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        return self.owner._at_exit(self.index, self.head, output)


class _State:
    """Per-forward state, kept off the module: ``nn.Module.__setattr__`` costs microseconds,
    which count at batch 1."""

    __slots__ = ("collect", "collecting", "exit_logits", "last_exit_index", "run")

    def __init__(self) -> None:
        self.run: _Run | None = None
        self.collect = False  # eval forwards run every exit (for calibration)
        self.collecting = False  # inside a train-mode or collecting forward
        self.exit_logits: list[Tensor | None] = []
        self.last_exit_index: Tensor | None = None


class _Run:
    """Book-keeping of one eval forward: who is still in the batch, who left where."""

    __slots__ = ("active", "done_index", "done_logits", "index", "logits", "size", "thresholds")

    def __init__(self, thresholds: list[float | None], size: int) -> None:
        self.thresholds, self.size = thresholds, size
        self.active: Tensor | None = None  # (B_active,) rows of the batch still running
        self.logits: Tensor | None = None  # (B, K) assembled once a subset has left
        self.index: Tensor | None = None  # (B,) exit used per sample
        self.done_logits: Tensor | None = None  # the logits when the whole batch left at once
        self.done_index = -1

    def leave(self, exit_index: int, logits: Tensor, mask: Tensor | None = None) -> None:
        """Samples (all remaining, or those in ``mask``) leave at ``exit_index``."""
        if self.logits is None and mask is None:
            self.done_logits, self.done_index = logits, exit_index
            return
        if self.logits is None:
            self.logits = logits.new_empty(self.size, logits.shape[-1])  # (B, K)
            self.index = torch.empty(self.size, dtype=torch.long)
            self.active = torch.arange(self.size)
        rows = self.active if mask is None else self.active[mask]
        self.logits[rows] = logits if mask is None else logits[mask]
        self.index[rows] = exit_index


class EarlyExitModel(nn.Module):
    """A backbone plus one :class:`ExitHead` per exit layer and a threshold per head.

    Attributes:
        backbone: the original network (its final output is the last exit).
        heads: one head per exit layer, in forward order.
        exit_names: the exit layers' module names inside ``backbone``.
        criterion: ``"entropy"`` (exit if ``H(p) <= tau``) or ``"max_prob"`` (``>= tau``).
        thresholds: buffer ``(len(exits),)``; ``-inf``/``+inf`` disables an exit.
        exit_logits: per exit, the logits of the last train-mode (or collecting) forward.
        last_exit_index: ``(B,)`` exit used by each sample of the last eval forward.
    """

    def __init__(
        self, backbone: nn.Module, exits: Sequence[str], heads: Sequence[ExitHead], criterion: str
    ) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {CRITERIA}; got {criterion!r}.")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.exit_names = list(exits)
        self.criterion = criterion
        never = disabled_threshold(criterion)
        self.register_buffer("thresholds", torch.full((len(self.exit_names),), never))
        self._state = _State()
        self._exit_ids = [torch.tensor([i]) for i in range(len(self.exit_names) + 1)]
        for i, name in enumerate(self.exit_names):
            backbone.get_submodule(name).register_forward_hook(_ExitHook(self, i))

    @property
    def exit_logits(self) -> list[Tensor | None]:
        """Per exit, the logits of the last train-mode (or collecting) forward."""
        return self._state.exit_logits

    @exit_logits.setter
    def exit_logits(self, value: list[Tensor | None]) -> None:
        self._state.exit_logits = value

    @property
    def last_exit_index(self) -> Tensor | None:
        """``(B,)`` the exit each sample of the last eval forward left at (``len(exits)``:
        the final output)."""
        return self._state.last_exit_index

    # ------------------------------------------------------------------ thresholds

    def set_thresholds(self, values: Sequence[float | None]) -> None:
        """Set one threshold per exit (None disables that exit).

        Raises:
            ConfigError: wrong count, NaN/inf, a max_prob outside ``[0, 1]`` or a negative
                entropy; nothing is changed.
        """
        values = list(values)
        if len(values) != len(self.exit_names):
            raise ConfigError(
                f"early_exit: {len(values)} thresholds given for {len(self.exit_names)} exits "
                f"{self.exit_names}; give one per exit (null disables one)."
            )
        hi = math.inf if self.criterion == "entropy" else 1.0
        for v in values:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if v is not None and not (ok and 0.0 <= v <= hi):
                bound = ">= 0" if self.criterion == "entropy" else "in [0, 1]"
                raise ConfigError(
                    f"early_exit: threshold {v!r} is not a finite {self.criterion} value "
                    f"{bound}; use null to disable an exit."
                )
        never = disabled_threshold(self.criterion)
        filled = [never if v is None else float(v) for v in values]
        with torch.no_grad():
            self.thresholds.copy_(torch.tensor(filled, dtype=self.thresholds.dtype))

    def threshold_values(self) -> list[float | None]:
        """The thresholds as floats, None for a disabled exit."""
        return [None if math.isinf(t) else t for t in self.thresholds.tolist()]

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Train mode: the backbone's output (exit logits kept in :attr:`exit_logits`).
        Eval mode: ``(B, K)`` logits, each sample's from the first exit it was confident at.
        """
        state = self._state
        if self.training or state.collect:
            state.exit_logits = [None] * len(self.exit_names)
            state.collecting = True
            try:
                return self.backbone(*args, **kwargs)
            finally:
                state.collecting = False
        state.exit_logits = []
        taus = [None if math.isinf(t) else t for t in self.thresholds.tolist()]
        run = state.run = _Run(taus, _batch_size(args, kwargs))
        try:
            out = self.backbone(*args, **kwargs)
        except _Exited:
            out = None
        finally:
            state.run = None
        if out is not None:
            run.leave(len(taus), out if isinstance(out, Tensor) else out.logits)
        if run.logits is None:  # the whole batch left at one exit
            i = run.done_index
            state.last_exit_index = (
                self._exit_ids[i] if run.size == 1 else torch.full((run.size,), i)
            )
            return run.done_logits
        state.last_exit_index = run.index
        return run.logits

    def _at_exit(self, i: int, head: ExitHead, output: Any) -> Any:
        """The hook body: run head ``i``; in eval mode drop the samples that may leave."""
        feats = output if isinstance(output, Tensor) else output[0]
        state = self._state
        run = state.run
        if run is None:  # train mode or collecting every exit; else a call from outside
            if state.collecting:
                state.exit_logits[i] = head(feats)
            return None
        tau = run.thresholds[i]
        if tau is None:  # a disabled exit costs nothing
            return None
        logits = head(feats)  # (B_active, K)
        if logits.shape[0] == 1:  # batch 1: one scalar test, no tensor book-keeping
            if self.criterion == "entropy":
                leave = entropy(logits).item() <= tau
            else:
                leave = max_prob(logits).item() >= tau
            if leave:
                run.leave(i, logits)
                raise _Exited
            return None
        done = exits_now(logits, self.criterion, tau)  # (B_active,)
        n_done = int(done.sum())
        if n_done == 0:
            return None
        if n_done == logits.shape[0]:
            run.leave(i, logits)
            raise _Exited
        run.leave(i, logits, done)
        keep = ~done
        run.active = run.active[keep]
        return _keep_rows(output, keep)


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim():
            return int(value.shape[0])
    raise DataError("early_exit: the model inputs hold no batched tensor.")


def _keep_rows(output: Any, keep: Tensor) -> Any:
    """``output`` with only the rows in ``keep``, for a tensor or a tuple of tensors."""
    if isinstance(output, Tensor):
        return output[keep]
    n = keep.shape[0]
    return type(output)(
        t[keep] if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t for t in output
    )


@edit_op("early_exit")
def rebuild(model: nn.Module, edit: dict[str, Any]) -> EarlyExitModel:
    """Replay the ``early_exit`` edit: a fresh :class:`EarlyExitModel` around ``model`` with
    heads of the recorded shapes (their weights and the thresholds come from the artifact)."""
    heads = [
        ExitHead(h["rank"], h["channels"], edit["num_classes"], edit["pool"], edit["hidden"])
        for h in edit["heads"]
    ]
    return EarlyExitModel(model, edit["exits"], heads, edit["criterion"])


def find_early_exit(model: nn.Module) -> EarlyExitModel:
    """The :class:`EarlyExitModel` that is ``model`` or inside it.

    Raises:
        ConfigError: there is none.
    """
    for module in model.modules():
        if isinstance(module, EarlyExitModel):
            return module
    raise ConfigError(
        f"{type(model).__name__} has no exits; add them with the early_exit.branches technique."
    )


@torch.no_grad()
def exit_outputs(model: EarlyExitModel, inputs: Any) -> list[Tensor]:
    """The logits of every exit and of the final output for all samples (no early stop).

    Args:
        model: the early-exit model; run in eval mode, its modes restored afterwards.
        inputs: one batch of model inputs.

    Returns:
        ``len(exits) + 1`` tensors ``(B, K)``, the final output last.
    """
    model._state.collect = True
    try:
        with eval_mode(model):
            out = call_model(model, inputs)
    finally:
        model._state.collect = False
    final = out.logits if hasattr(out, "logits") else out
    logits = [*model.exit_logits, final]
    model.exit_logits = []
    return logits


@torch.no_grad()
def exit_statistics(model: nn.Module, loader: Iterable[Any]) -> dict[str, Any]:
    """Accuracy of the early-exit cascade and where the samples leave, over a loader.

    Runs the model as deployed (eval mode, stopping at the first confident exit).

    Args:
        model: an :class:`EarlyExitModel` (or a model holding one).
        loader: ``(inputs, labels)`` batches.

    Returns:
        ``{"accuracy", "exit_fractions", "exit_accuracy", "exit_counts", "exits",
        "n_samples"}``: per exit (the final output last) the fraction of samples leaving there
        and the accuracy on those samples (None where none left).

    Raises:
        ConfigError: the model has no exits.
        DataError: the loader is empty or yields no labels.
    """
    ee = find_early_exit(model)
    n_exits = len(ee.heads) + 1
    counts = torch.zeros(n_exits, dtype=torch.long)
    right = torch.zeros(n_exits, dtype=torch.long)
    with eval_mode(model):
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError("exit_statistics expects (inputs, labels) batches.")
            logits = call_model(model, batch_inputs(batch))
            correct = (logits.argmax(-1) == batch[1]).double()  # (B,)
            used = ee.last_exit_index
            counts += torch.bincount(used, minlength=n_exits)
            right += torch.bincount(used, weights=correct, minlength=n_exits).long()
    total = int(counts.sum())
    if total == 0:
        raise DataError("exit_statistics: the loader yields no samples.")
    return {
        "accuracy": int(right.sum()) / total,
        "exit_fractions": (counts.double() / total).tolist(),
        "exit_accuracy": [
            int(r) / int(c) if c else None for r, c in zip(right, counts, strict=True)
        ],
        "exit_counts": counts.tolist(),
        "exits": [*ee.exit_names, "final"],
        "n_samples": total,
    }
