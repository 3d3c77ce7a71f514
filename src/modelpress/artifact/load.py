"""Load an artifact: rebuild the model from its source, replay edits, decode, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from modelpress.artifact.manifest import TENSORS, read_manifest
from modelpress.artifact.packing import EntropyCoding, set_entropy_coding
from modelpress.artifact.tensor_codec import decode_tensor
from modelpress.edits import replay_edits
from modelpress.errors import ArtifactError
from modelpress.models.source import ModelSource, tag_source


def decode_state_dict(manifest: dict[str, Any], root: Path) -> dict[str, torch.Tensor]:
    """Decode every tensor the manifest lists from ``root/tensors.safetensors``.

    Raises:
        ArtifactError: the payload file cannot be read or disagrees with the manifest.
    """
    try:
        stored = load_file(str(root / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{root / TENSORS} cannot be read ({exc}).") from None
    records = manifest["tensors"]
    state = {
        name: decode_tensor(name, rec, stored)
        for name, rec in records.items()
        if "alias_of" not in rec
    }
    for name, rec in records.items():
        if "alias_of" in rec:
            state[name] = state[rec["alias_of"]]
    return state


def load_artifact(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Load the artifact at ``path`` as a runnable module in eval mode.

    Args:
        path: the artifact directory.
        model: a fresh instance to load into, for artifacts of models built by hand (no
            source spec); by default the model is rebuilt from the recorded source.

    Returns:
        The model, its outputs equal to the compressed model that was saved; an entropy-coded
        artifact's model keeps its coding mark, so saving it again codes it the same way.

    Raises:
        ArtifactError: missing, corrupt or truncated files; a state dict that does not fit.
    """
    from modelpress.models import build_from_source

    root = Path(path).expanduser()
    manifest = read_manifest(root)
    if model is None:
        if manifest.get("source") is None:
            raise ArtifactError(
                f"{root} records no model source (it was saved from a model built by hand); "
                "pass model=<a fresh instance> to load it."
            )
        source = ModelSource.from_dict(manifest["source"])
        model = build_from_source(source)
        tag_source(model, source)
    model = replay_edits(model, manifest.get("edits", []))
    coding = manifest.get("entropy")
    coding = None if coding is None else EntropyCoding.from_dict(coding)
    state = decode_state_dict(manifest, root)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(
            f"{root} does not fit the rebuilt model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}."
        )
    set_entropy_coding(model, coding)
    return model.eval()
