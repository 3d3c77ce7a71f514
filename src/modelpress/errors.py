"""The error tree. Every error a user can cause is one of these, with a one-line message.

``ConfigError`` and its relatives also subclass ``ValueError`` (as peft does), so code that
already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModelpressError(Exception):
    """Base of every error modelpress raises on purpose."""


class ConfigError(ModelpressError, ValueError):
    """A recipe, stage or technique config is wrong: unknown key, out-of-range value."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown technique, recipe, model or data name; the message suggests the nearest."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class NoMatchingModulesError(ConfigError):
    """A ``targets``/``ignore`` selector matched no module of the model."""


class UnsupportedModuleError(ModelpressError, ValueError):
    """A technique cannot handle a module (names the module and the reason); nothing changed."""


class DataError(ModelpressError, ValueError):
    """Data is missing, malformed, or unusable (wrong path, NaN/inf activations, bad shapes)."""


class ModelError(ModelpressError, ValueError):
    """A model spec cannot be resolved or built."""


class ArtifactError(ModelpressError, ValueError):
    """An artifact directory is missing, corrupt, truncated or of an unknown format version."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return `` (did you mean 'x'?)`` for the nearest names in ``choices``, or ``''``.

    Names are ranked by :class:`difflib.SequenceMatcher` ratio; only those within 0.1 of
    the best (and above 0.5) are offered, at most ``n``.
    """
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in choices), reverse=True
    )
    if not scored or scored[0][0] < 0.5:
        return ""
    best = scored[0][0]
    close = [c for r, c in scored[:n] if r >= max(0.5, best - 0.1)]
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


class TrainingError(ModelpressError, RuntimeError):
    """Training diverged (non-finite loss) or cannot proceed."""
