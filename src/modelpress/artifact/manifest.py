"""The artifact directory: file names, the manifest, and its integrity checks.

An artifact is a directory holding exactly::

    manifest.json          format version, model source, structural edits, one record per
                           tensor (layout, codec, packing), recipe, stages, metrics, and the
                           size and sha256 of every other file
    tensors.safetensors    every payload: packed codes, indices, scales, raw values, and
                           entropy-coded streams with their coding tables

An artifact whose integer streams are entropy-coded (``encode.huffman``/``encode.ans``) says so
with ``"entropy": {"coder": ..., "payloads": ...}`` and format version 2, so a modelpress that
cannot decode it refuses it by version; every other artifact is written as version 1.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from modelpress.errors import ArtifactError

FORMAT = "modelpress-artifact"
FORMAT_VERSION = 1  # written for artifacts without entropy coding
ENTROPY_FORMAT_VERSION = 2  # written for entropy-coded artifacts
READABLE_VERSION = ENTROPY_FORMAT_VERSION  # the newest version this modelpress reads
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a directory with a manifest (not whether it is intact)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest; with ``verify``, check every file's sha256.

    Raises:
        ArtifactError: no artifact there, a corrupt manifest, an unknown format version, or a
            file that is missing, truncated or altered.
    """
    root = Path(path).expanduser()
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"no modelpress artifact at {root} ({MANIFEST} not found); "
            "create one with 'modelpress compress' or 'modelpress train'."
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt ({exc.__class__.__name__}: {exc}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a modelpress manifest.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > READABLE_VERSION:
        raise ArtifactError(
            f"{root} has artifact format version {version!r}; this modelpress reads up to "
            f"{READABLE_VERSION}: upgrade modelpress."
        )
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check each file listed in the manifest for size and sha256.

    Raises:
        ArtifactError: a file is missing, truncated, or its contents changed.
    """
    for name, info in manifest.get("files", {}).items():
        fpath = root / name
        if not fpath.is_file():
            raise ArtifactError(f"{fpath} is missing; the artifact is incomplete.")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(
                f"{fpath} has {size} bytes but the manifest records {info['bytes']} "
                "(truncated or replaced); re-create the artifact."
            )
        if sha256_file(fpath) != info["sha256"]:
            raise ArtifactError(
                f"{fpath} fails its sha256 check (the file is corrupt); re-create the artifact."
            )
