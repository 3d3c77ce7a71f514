"""The teacher of every distillation technique: which model teaches, and running it frozen.

A distillation stage adds a loss to the next ``train`` stage (a :class:`DistillCallback`); it
changes no weight itself. The teacher is ``ctx.teacher`` — the original model given to
:func:`modelpress.compress` (or its ``teacher=`` argument) — unless the config's ``teacher``
names a model spec (``hf:PATH``, an artifact directory, ``zoo:``/``import:``). It runs under
``torch.no_grad()`` in eval mode with every submodule's training flag restored afterwards;
its parameters never reach the optimizer and nothing of it is saved in the artifact. Forward
hooks that capture its intermediate outputs live only for the duration of one teacher call.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from modelpress.context import Batch, Context, batch_inputs, forward
from modelpress.errors import (
    ConfigError,
    DataError,
    ModelpressError,
    NoMatchingModulesError,
    UnsupportedModuleError,
)
from modelpress.measure.flops import eval_mode
from modelpress.models import load_model, shape_kwargs, source_of
from modelpress.train import Callback, TrainState


def teacher_field() -> Any:
    """The ``teacher`` field every distillation config ends with (a model spec or None)."""
    return Field(
        None,
        description="Teacher model spec (hf:PATH, an artifact dir, zoo:/import:); "
        "default: the pipeline's original model.",
    )


def resolve_teacher(spec: str | None, student: nn.Module, ctx: Context, owner: str) -> nn.Module:
    """The teacher: ``ctx.teacher`` when ``spec`` is None, else the model ``spec`` names.

    ``zoo:`` and ``import:`` specs are built with the student's ``input_shape`` and
    ``num_classes`` (from its source); a ``zoo:`` model is untrained, so a trained teacher is
    normally an artifact directory or an ``hf:`` folder.

    Args:
        spec: the config's ``teacher`` field.
        student: the model being trained (for the build arguments of ``zoo:``/``import:``).
        ctx: the pipeline context holding the default teacher.
        owner: the technique name, for messages.

    Returns:
        The teacher module (never modified by the caller).

    Raises:
        ConfigError: no teacher is available, or ``spec`` cannot be loaded.
    """
    if spec is None:
        if ctx.teacher is None:
            raise ConfigError(
                f"{owner} needs a teacher: pass teacher=... to compress() or set 'teacher' to "
                "a model spec (hf:PATH or an artifact directory)."
            )
        return ctx.teacher
    source = source_of(student)
    known = source.kwargs if source is not None else {}
    kwargs = {k: known[k] for k in ("input_shape", "num_classes") if k in known}
    try:
        teacher = load_model(spec, **shape_kwargs(spec, kwargs))
    except ModelpressError as exc:
        raise ConfigError(
            f"The 'teacher' parameter of {owner} names a model that cannot be loaded: {exc}"
        ) from None
    return teacher.eval().requires_grad_(False)


def output_tensor(outputs: Any, owner: str) -> torch.Tensor:
    """The tensor a model's outputs stand for: ``.logits``, else ``.last_hidden_state``, else
    the tensor itself (or the first tensor of a tuple).

    Raises:
        UnsupportedModuleError: the outputs hold no tensor.
    """
    for attr in ("logits", "last_hidden_state"):
        value = getattr(outputs, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    tensor = first_tensor(outputs)
    if tensor is None:
        raise UnsupportedModuleError(
            f"{owner}: the model returns {type(outputs).__name__}, which holds no tensor "
            "(expected logits, last_hidden_state or a tensor)."
        )
    return tensor


def first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` if it is a tensor, else the first tensor in a tuple, list or dict-like output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


def attention_mask_of(batch: Batch) -> torch.Tensor | None:
    """The batch's ``attention_mask`` ``(B, T)`` as bools, when it is a dict that has one."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def find_modules(
    model: nn.Module, names: Iterable[str], role: str, owner: str
) -> dict[str, nn.Module]:
    """The modules called ``names`` in ``model``.

    Raises:
        NoMatchingModulesError: some names are not modules of the model; the message names
            them and some names that exist.
    """
    modules = dict(model.named_modules())
    wanted = list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in modules]
    if missing:
        some = [n for n in modules if n and ".parametrizations." not in f".{n}."]
        listed = ", ".join(some[:8]) + (", ..." if len(some) > 8 else "")
        raise NoMatchingModulesError(
            f"{owner}: {role} module(s) {', '.join(repr(n) for n in missing)} not found; "
            f"modules include: {listed}."
        )
    return {n: modules[n] for n in wanted}


class Taps:
    """Forward hooks that keep the last output tensor of named modules in :attr:`values`.

    Use as a context manager (attached for the block) or with :meth:`attach`/:meth:`detach`.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Any:
        def store(module: nn.Module, args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                self.values[name] = tensor

        return store

    def attach(self) -> Taps:
        """Register the hooks (once)."""
        if not self._handles:
            self._handles = [
                m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()
            ]
        return self

    def detach(self, keep_values: bool = False) -> None:
        """Remove the hooks; forget the captured values unless ``keep_values``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not keep_values:
            self.values = {}

    def __enter__(self) -> Taps:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach(keep_values=True)


def run_frozen(
    model: nn.Module, batch: Batch, taps: dict[str, nn.Module] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``model`` on ``batch`` under ``no_grad`` in eval mode, modes restored afterwards.

    Args:
        model: the teacher (or a student being probed); not changed.
        batch: a tuple ``(x, y)``, a dict (``labels`` dropped) or a tensor.
        taps: modules whose outputs to capture, by name; hooked for this call only.

    Returns:
        ``(outputs, captured)``: the model's outputs and the captured tensors by name.
    """
    with Taps(taps or {}) as tap, eval_mode(model), torch.no_grad():
        outputs = forward(model, batch)
    return outputs, tap.values


def probe_inputs(ctx: Context) -> Any:
    """A small batch of inputs to check shapes on: ``ctx.example_inputs`` or the first
    training batch.

    Raises:
        DataError: there are no example inputs and no data.
    """
    if ctx.example_inputs is not None:
        return ctx.example_inputs
    for batch in ctx.training_batches(8):
        return batch_inputs(batch)
    raise DataError("the training data yields no batches.")


def check_same_shape(
    student: torch.Tensor, teacher: torch.Tensor, what: str, owner: str, fix: str
) -> None:
    """Raise one clear error when the student's and teacher's ``what`` differ in shape.

    Raises:
        ConfigError: the shapes differ; the message names both and ``fix``.
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"{owner}: the student's {what} have shape {tuple(student.shape)} but the "
            f"teacher's have shape {tuple(teacher.shape)}; {fix}."
        )


class _TeacherPass:
    """One frozen forward of a teacher per training step, shared by every distillation loss
    that reads it: ``distill.kd`` and ``distill.hint`` in one recipe run the teacher once per
    batch, with the union of the modules they tap hooked."""

    def __init__(self) -> None:
        self.taps: dict[str, nn.Module] = {}
        self.users: collections.Counter[str] = collections.Counter()
        self.members = 0
        self._key: tuple[TrainState, int, Batch] | None = None
        self._result: tuple[Any, dict[str, torch.Tensor]] | None = None

    def join(self, taps: dict[str, nn.Module]) -> None:
        """A loss starts training: its teacher modules are tapped from the next forward on."""
        self.members += 1
        self.users.update(taps.keys())
        self.taps.update(taps)
        self._key = self._result = None

    def leave(self, taps: dict[str, nn.Module]) -> None:
        """A loss ends training: its taps go when no other loss uses them."""
        self.members -= 1
        self.users.subtract(taps.keys())
        self.taps = {n: m for n, m in self.taps.items() if self.users[n] > 0}
        self._key = self._result = None

    def run(
        self, teacher: nn.Module, state: TrainState, batch: Batch
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """The teacher's outputs and tapped tensors for this step's ``batch``; the teacher
        runs only for the first loss of the step that asks."""
        last = self._key
        if last is None or last[0] is not state or last[1] != state.step or last[2] is not batch:
            self._result = run_frozen(teacher, batch, self.taps)
            self._key = (state, state.step, batch)
        return self._result  # type: ignore[return-value]


_PASSES: weakref.WeakKeyDictionary[nn.Module, _TeacherPass] = weakref.WeakKeyDictionary()


class DistillCallback(Callback):
    """A distillation loss added inside the next ``train`` stage:
    ``loss = task_weight * task_loss + weight * distill_loss``.

    With ``task_weight == 0`` the task loss is not computed at all (``replaces_task_loss``),
    so unlabeled data trains. Subclasses implement :meth:`distill_loss`, reading the teacher
    through :meth:`run_teacher` (one teacher forward per step for all losses on the same
    teacher; the modules in ``teacher_modules`` are tapped); the mean distillation loss of the
    first and last ten steps lands in the train stage's report under ``key``.
    """

    key = "distill_loss"

    def __init__(self, teacher: nn.Module, ctx: Context, weight: float, task_weight: float):
        self.teacher, self.ctx = teacher, ctx
        self.weight, self.task_weight = weight, task_weight
        self.replaces_task_loss = task_weight == 0
        self.history: list[float] = []
        self.teacher_modules: dict[str, nn.Module] = {}
        self._state: TrainState | None = None

    def distill_loss(self, batch: Batch, outputs: Any) -> torch.Tensor:
        """The distillation term for one batch (the student's ``outputs`` are given)."""
        raise NotImplementedError

    def run_teacher(self, batch: Batch) -> tuple[Any, dict[str, torch.Tensor]]:
        """The frozen teacher's outputs on ``batch`` and its ``teacher_modules``' outputs
        (outside a training run, e.g. called directly, the teacher simply runs)."""
        shared = _PASSES.get(self.teacher)
        if shared is None or self._state is None:
            return run_frozen(self.teacher, batch, self.teacher_modules)
        return shared.run(self.teacher, self._state, batch)

    def on_train_begin(self, state: TrainState) -> None:
        """Share the teacher's forward with the other losses on the same teacher."""
        _PASSES.setdefault(self.teacher, _TeacherPass()).join(self.teacher_modules)

    def loss(
        self, state: TrainState, batch: Batch, outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        """``task_weight * loss + weight * distill_loss(batch, outputs)``."""
        self._state = state
        term = self.distill_loss(batch, outputs)
        self.history.append(float(term.detach()))
        return self.task_weight * loss + self.weight * term

    def on_train_end(self, state: TrainState) -> None:
        """Leave the shared teacher forward; report the distillation loss at the start and
        the end of training."""
        shared = _PASSES.get(self.teacher)
        if shared is not None:
            shared.leave(self.teacher_modules)
            if shared.members <= 0:
                del _PASSES[self.teacher]
        self._state = None
        if self.history:
            first, last = self.history[:10], self.history[-10:]
            self.ctx.report(
                self.key,
                {
                    "first": round(sum(first) / len(first), 6),
                    "last": round(sum(last) / len(last), 6),
                },
            )
