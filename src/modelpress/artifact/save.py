"""Write a model as an artifact: real packed bytes, atomically (temp dir, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modelpress import __version__
from modelpress.artifact.codecs import ValueCodec
from modelpress.artifact.manifest import (
    ENTROPY_FORMAT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TENSORS,
    is_artifact,
    sha256_file,
)
from modelpress.artifact.packing import entropy_coding_of
from modelpress.artifact.tensor_codec import encode_tensor
from modelpress.edits import edits_of
from modelpress.errors import ArtifactError
from modelpress.models.source import ModelSource, source_of
from modelpress.parametrizations import (
    effective_state_dict,
    parametrizations_of,
    parametrized_tensors,
)


def value_codecs(model: nn.Module) -> dict[str, ValueCodec]:
    """For each parametrized tensor, the codec of its last parametrization that has one."""
    out: dict[str, ValueCodec] = {}
    for qual, module, tensor_name in parametrized_tensors(model):
        for p in reversed(parametrizations_of(module, tensor_name)):
            if hasattr(p, "value_codec"):
                out[qual] = p.value_codec()
                break
    return out


def encode_model(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Tensor records and payloads for every entry of the model's (baked) state dict.

    Tensors that share storage (tied weights) are stored once; the others point at it
    with ``{"alias_of": name}``. A model marked by ``encode.huffman``/``encode.ans`` has its
    integer streams entropy-coded (see :mod:`~modelpress.artifact.packing`).
    """
    codecs = value_codecs(model)
    coding = entropy_coding_of(model)
    state = effective_state_dict(model)
    records: dict[str, Any] = {}
    payloads: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            records[name] = {"alias_of": seen[key]}
            continue
        seen[key] = name
        record, parts = encode_tensor(name, tensor, codecs.get(name), coding)
        records[name] = record
        payloads.update(parts)
    return records, payloads


def check_destination(path: str | Path) -> Path:
    """The resolved ``path`` if an artifact may be written there (new, empty, or an artifact).

    Raises:
        ArtifactError: ``path`` is a file or a non-empty directory that is not an artifact.
    """
    dest = Path(path).expanduser().resolve()
    if dest.exists() and not is_artifact(dest) and (dest.is_file() or any(dest.iterdir())):
        raise ArtifactError(
            f"{dest} exists and is not a modelpress artifact; choose another --out path."
        )
    return dest


def save_artifact(
    model: nn.Module,
    path: str | Path,
    *,
    source: ModelSource | None = None,
    extra: dict[str, Any] | None = None,
    encoded: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Save ``model`` as an artifact directory at ``path`` and return the path.

    Written to a temporary sibling directory first and renamed into place, so a failure
    leaves nothing half-written; an existing artifact at ``path`` is replaced.

    Args:
        model: the (possibly parametrized) model; its effective weights are stored.
        path: the artifact directory.
        source: how to rebuild the model; defaults to the source attached to the model.
        extra: more manifest entries (``recipe``, ``stages``, ``metrics``).
        encoded: ``encode_model(model)`` if already computed (to write the same model twice).

    Raises:
        ArtifactError: ``path`` exists and is not an artifact (it is never overwritten).
    """
    dest = check_destination(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    records, payloads = encoded if encoded is not None else encode_model(model)
    source = source or source_of(model)
    coding = entropy_coding_of(model)
    version = {"format_version": FORMAT_VERSION if coding is None else ENTROPY_FORMAT_VERSION}
    entropy = {} if coding is None else {"entropy": coding.to_dict()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        save_file(payloads, str(tmp / TENSORS), metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT,
            **version,
            "modelpress_version": __version__,
            "source": source.to_dict() if source else None,
            "edits": edits_of(model),
            **entropy,
            "tensors": records,
            **(extra or {}),
            "files": {TENSORS: {"bytes": (tmp / TENSORS).stat().st_size,
                                "sha256": sha256_file(tmp / TENSORS)}},
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``; an old ``dest`` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
