"""Structural edits: changes to a model's shape (pruned widths, factorized layers, exit heads).

Each edit is recorded on the model as a JSON-ready dict ``{"op": ..., ...}`` and stored in the
artifact manifest; loading replays the edits, in order, on a fresh instance built from the
model's source, so its shapes match the saved tensors before any tensor is loaded.
A technique that edits structure registers the replay function for its op with
:func:`edit_op` and calls :func:`record_edit` after changing the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from modelpress.errors import ArtifactError

_ATTR = "_modelpress_edits"
ReplayFn = Callable[[nn.Module, dict[str, Any]], "nn.Module | None"]
_OPS: dict[str, ReplayFn] = {}


def edit_op(name: str) -> Callable[[ReplayFn], ReplayFn]:
    """Register ``replay(model, edit)``, which re-applies an edit of kind ``name``: in place
    (returning None), or by returning the model that replaces ``model`` (a wrapper such as the
    early-exit model, which then carries the edit log)."""

    def register(fn: ReplayFn) -> ReplayFn:
        _OPS[name] = fn
        return fn

    return register


def record_edit(model: nn.Module, op: str, **args: Any) -> None:
    """Append an edit ``{"op": op, **args}`` to the model's log (args must be JSON-ready)."""
    if op not in _OPS:
        raise RuntimeError(f"edit op {op!r} has no replay function registered")
    edits_of(model).append({"op": op, **args})


def edits_of(model: nn.Module) -> list[dict[str, Any]]:
    """The model's edit log (created empty on first use; survives ``copy.deepcopy``)."""
    log = getattr(model, _ATTR, None)
    if log is None:
        log = []
        setattr(model, _ATTR, log)
    return log


def replay_edits(model: nn.Module, edits: list[dict[str, Any]]) -> nn.Module:
    """Re-apply recorded ``edits`` in order on a fresh ``model``; returns the model.

    Raises:
        ArtifactError: an edit names an op this version of modelpress does not know.
    """
    import modelpress.techniques  # noqa: F401  (registers the ops)

    for edit in edits:
        fn = _OPS.get(edit.get("op", ""))
        if fn is None:
            raise ArtifactError(
                f"artifact records structural edit {edit.get('op')!r}, unknown to this "
                "modelpress version; upgrade modelpress to load it."
            )
        replaced = fn(model, edit)
        if replaced is not None and replaced is not model:
            model = adopt(replaced, model)
        edits_of(model).append(dict(edit))
    return model


def adopt(wrapper: nn.Module, model: nn.Module) -> nn.Module:
    """Give ``wrapper`` (a module that replaces ``model``) its edit log and source tag, so it
    saves and reloads as ``model`` would, plus its own edit."""
    from modelpress.models.source import source_of, tag_source

    setattr(wrapper, _ATTR, list(edits_of(model)))
    source = source_of(model)
    if source is not None:
        tag_source(wrapper, source)
    return wrapper
