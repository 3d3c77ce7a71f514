"""``hf:PATH``: a local Hugging Face model folder, through ``transformers`` (never a hub).

The artifact stores the model's config itself, so an artifact of an ``hf:`` model loads
without the original folder: the model is rebuilt from the config, then its weights decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from modelpress.errors import ModelError
from modelpress.models.source import ModelSource


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_hf(path: str) -> tuple[nn.Module, ModelSource]:
    """Load the model in the local folder ``path`` (class from ``config.architectures``).

    Raises:
        ModelError: the folder or its ``config.json`` is missing, or transformers fails.
    """
    import transformers

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"hf:{path}: no config.json in {folder}; point hf: at a local Hugging Face model "
            "folder (hub names are not downloaded)."
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model = _model_class(config).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"hf:{path}: transformers could not load it ({exc}).") from None
    source = ModelSource(f"hf:{folder}", {"config": config.to_dict()})
    return model.eval(), source


def build_hf(source: ModelSource) -> nn.Module:
    """A fresh model from the config stored in ``source`` (weights to be loaded after).

    Raises:
        ModelError: the stored config is missing or transformers cannot build it.
    """
    import transformers

    cfg = dict(source.kwargs.get("config") or {})
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"{source.spec}: the stored config has no model_type.")
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        return _model_class(config)._from_config(config).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"{source.spec}: cannot rebuild from its config ({exc}).") from None
