"""One way to say which layers: ``targets`` and ``ignore`` selectors.

A selector is an exact module name (``features.0``), a type name (``Linear``, matched against
the module's class and its bases) or a regex over module names prefixed ``re:`` (matched with
:func:`re.fullmatch`, so ``re:fc.*`` matches ``fc1`` but not ``head.fc1``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from modelpress.config import TargetedConfig
from modelpress.errors import ConfigError, NoMatchingModulesError, UnsupportedModuleError


def matches(selector: str, name: str, module: nn.Module) -> bool:
    """Whether ``selector`` picks the module called ``name``."""
    if selector.startswith("re:"):
        try:
            return re.fullmatch(selector[3:], name) is not None
        except re.error as exc:
            raise ConfigError(f"Selector {selector!r} is not a valid regex: {exc}.") from None
    if selector == name:
        return True
    return any(cls.__name__ == selector for cls in type(module).__mro__)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without parametrization internals (``x.parametrizations.weight.0``)."""
    return [(n, m) for n, m in model.named_modules() if n and ".parametrizations." not in f".{n}."]


def _no_match(selector: str, kind: str, owner: str, modules: Sequence[str]) -> str:
    some = ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")
    return f"{owner}: {kind} selector {selector!r} matched no module; modules include: {some}."


def select_modules(
    model: nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str] = (),
    *,
    owner: str,
    strict_targets: bool = True,
    strict_ignore: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` pairs picked by any of ``targets`` and none of ``ignore``.

    Args:
        model: the model to search.
        targets: selectors of modules to act on.
        ignore: selectors of modules to leave alone.
        owner: the technique name, for messages.
        strict_targets: every target selector must match something (else only the whole
            list must); set False for a technique's default targets.
        strict_ignore: every ignore selector must match something (catches typos).

    Raises:
        NoMatchingModulesError: a selector, or the whole selection, matched nothing.
    """
    cands = _candidates(model)
    names = [n for n, _ in cands]
    chosen: set[str] = set()
    for sel in targets:
        hit = {n for n, m in cands if matches(sel, n, m)}
        if strict_targets and not hit:
            raise NoMatchingModulesError(_no_match(sel, "target", owner, names))
        chosen |= hit
    for sel in ignore:
        hit = {n for n, m in cands if matches(sel, n, m)}
        if strict_ignore and not hit:
            raise NoMatchingModulesError(_no_match(sel, "ignore", owner, names))
        chosen -= hit
    picked = [(n, m) for n, m in cands if n in chosen]
    if not picked:
        raise NoMatchingModulesError(
            f"{owner}: targets {list(targets)} minus ignore {list(ignore)} select no module; "
            f"modules include: {', '.join(names[:6])}."
        )
    return picked


def select_weighted(
    model: nn.Module, cfg: TargetedConfig, *, owner: str, supported: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module]]:
    """Select modules by ``cfg.targets``/``cfg.ignore`` and check each is a supported type.

    Default targets (not set by the user) are lenient: only the whole selection must match.
    Container modules picked by a type or regex selector are skipped in favour of their
    supported children; a picked leaf of an unsupported type is an error naming it.

    Raises:
        NoMatchingModulesError: nothing selected.
        UnsupportedModuleError: a selected leaf module of a type the technique cannot handle.
    """
    strict = "targets" in cfg.model_fields_set
    picked = select_modules(model, cfg.targets, cfg.ignore, owner=owner, strict_targets=strict)
    out: list[tuple[str, nn.Module]] = []
    for name, module in picked:
        if isinstance(module, supported):
            out.append((name, module))
        elif not any(True for _ in module.children()):
            kinds = ", ".join(t.__name__ for t in supported)
            raise UnsupportedModuleError(
                f"{name}: {type(module).__name__} is not supported by {owner} (supports {kinds})."
            )
    if not out:
        kinds = ", ".join(t.__name__ for t in supported)
        raise NoMatchingModulesError(
            f"{owner}: the selected modules hold no {kinds}; check targets {cfg.targets}."
        )
    return out
