"""The technique registry: ``@technique("family.name", Config)`` next to each technique's code.

Families register by being imported: :mod:`modelpress.techniques` imports each family package
by name (nothing walks packages), and :func:`get_technique` imports it on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from modelpress.config import TechniqueConfig
from modelpress.errors import UnknownNameError, suggest

if TYPE_CHECKING:
    from torch import nn

    from modelpress.context import Context

Need = Literal["calibration", "training", "teacher", "later_train"]
ApplyFn = Callable[["nn.Module", TechniqueConfig, "Context"], "nn.Module"]
F = TypeVar("F", bound=ApplyFn)


@dataclass(frozen=True)
class TechniqueSpec:
    """A registered technique: its name, config class, apply function and data needs."""

    name: str
    config_cls: type[TechniqueConfig]
    apply: ApplyFn
    needs: frozenset[str]

    @property
    def summary(self) -> str:
        """The first line of the apply function's docstring."""
        doc = (self.apply.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, TechniqueSpec] = {}


def technique(
    name: str, config_cls: type[TechniqueConfig], *, needs: tuple[Need, ...] = ()
) -> Callable[[F], F]:
    """Register ``apply(model, cfg, ctx) -> model`` as technique ``name`` with its config class.

    Args:
        name: the registry key, ``family.name`` (e.g. ``prune.magnitude``) or ``train``.
        config_cls: the technique's :class:`~modelpress.config.TechniqueConfig` subclass.
        needs: what the pipeline must supply: calibration batches, training data, a teacher,
            or ``later_train``: a ``train`` stage after this one (the technique acts as a
            callback during that training).
    """

    def register(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name].apply is not fn:
            raise RuntimeError(f"technique {name!r} is registered twice")
        _REGISTRY[name] = TechniqueSpec(name, config_cls, fn, frozenset(needs))
        return fn

    return register


def _load_builtins() -> None:
    importlib.import_module("modelpress.techniques")


def get_technique(name: str) -> TechniqueSpec:
    """Return the registered technique ``name``.

    Raises:
        UnknownNameError: no such technique; the message suggests the nearest names.
    """
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"Unknown technique {name!r}{suggest(name, _REGISTRY)}; "
            "run 'modelpress techniques' to list them."
        ) from None


def technique_names() -> list[str]:
    """All registered technique names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)
