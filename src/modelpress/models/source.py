"""Where a model came from: the spec string and keyword args that rebuild it from nothing.

The artifact stores this, so loading builds a fresh instance and never unpickles classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

_ATTR = "_modelpress_source"


@dataclass(frozen=True)
class ModelSource:
    """A model spec (``zoo:lenet5``, ``hf:PATH``, ``import:pkg.mod:fn``) and its build kwargs."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest."""
        return {"spec": self.spec, "kwargs": self.kwargs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSource:
        """Inverse of :meth:`to_dict`."""
        return cls(spec=str(d["spec"]), kwargs=dict(d.get("kwargs") or {}))


def tag_source(model: nn.Module, source: ModelSource) -> nn.Module:
    """Attach ``source`` to ``model`` (survives ``copy.deepcopy``) and return the model."""
    setattr(model, _ATTR, source)
    return model


def source_of(model: nn.Module) -> ModelSource | None:
    """The source attached by :func:`tag_source`, or None for a model built by hand."""
    return getattr(model, _ATTR, None)
