"""Data spec strings (``digits``, ``mnist:DIR``, ``fashion-mnist:DIR``, ``npz:FILE``) -> bundles."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelpress.data import loaders
from modelpress.data.bundle import DataBundle
from modelpress.errors import DataError, UnknownNameError, suggest


@dataclass(frozen=True)
class DataSource:
    """One spec scheme: how to write it, what it is, and the function that loads it."""

    usage: str  # e.g. "mnist:DIR"
    description: str
    load: Callable[[str, Path | None], DataBundle]
    needs_path: bool


SOURCES: dict[str, DataSource] = {
    "digits": DataSource(
        "digits",
        "scikit-learn's bundled 8x8 digits, fixed 1437/360 split (the embedded default)",
        lambda spec, _path: loaders.load_digits(spec),
        needs_path=False,
    ),
    "mnist": DataSource(
        "mnist:DIR",
        "MNIST from the four IDX files (.gz or not) in DIR, normalised (x/255-0.1307)/0.3081",
        lambda spec, path: loaders.load_idx_dir(spec, path, loaders.MNIST),
        needs_path=True,
    ),
    "fashion-mnist": DataSource(
        "fashion-mnist:DIR",
        "Fashion-MNIST from the four IDX files in DIR, normalised (x/255-0.2860)/0.3530",
        lambda spec, path: loaders.load_idx_dir(spec, path, loaders.FASHION_MNIST),
        needs_path=True,
    ),
    "npz": DataSource(
        "npz:FILE",
        "arrays x_train, y_train, x_test, y_test from a .npz file (uint8 scaled by 1/255)",
        lambda spec, path: loaders.load_npz(spec, path),
        needs_path=True,
    ),
}


def data_names() -> list[tuple[str, str]]:
    """List the data spec schemes for the CLI.

    Returns:
        ``(usage, description)`` pairs, e.g. ``("mnist:DIR", "MNIST from ...")``.
    """
    return [(source.usage, source.description) for source in SOURCES.values()]


def load_data(spec: str) -> DataBundle:
    """Load a data set from a spec string; nothing is ever downloaded.

    Args:
        spec: ``digits``, ``mnist:DIR``, ``fashion-mnist:DIR`` or ``npz:FILE``; ``~`` in
            paths is expanded.

    Returns:
        A ``DataBundle`` with a train split (for compression) and a held-out test split.

    Raises:
        UnknownNameError: The scheme is not one of the above (the nearest is suggested).
        DataError: A path is missing where one is needed (or given where none is), or the
            files are missing, malformed, truncated or hold NaN/inf.
    """
    scheme, sep, rest = spec.strip().partition(":")
    scheme = scheme.lower()
    source = SOURCES.get(scheme)
    if source is None:
        usages = ", ".join(s.usage for s in SOURCES.values())
        raise UnknownNameError(
            f"unknown data spec {spec!r}{suggest(scheme, SOURCES)}; use one of {usages}"
        )
    if not source.needs_path:
        if sep:
            raise DataError(f"data spec {spec!r}: {scheme} takes no path; write {source.usage}")
        return source.load(spec, None)
    if not rest.strip():
        raise DataError(f"data spec {spec!r} needs a path; write {source.usage}")
    path = Path(rest.strip()).expanduser()
    return source.load(spec, path)
