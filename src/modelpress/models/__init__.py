"""Model spec strings: ``zoo:NAME``, ``hf:PATH``, ``gguf:FILE``, ``import:pkg.mod:fn``, or an
artifact dir.

:func:`load_model` turns a spec into a module tagged with its :class:`ModelSource`;
:func:`build_from_source` rebuilds a fresh (untrained) instance from a stored source.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from modelpress.errors import ModelError, UnknownNameError, suggest
from modelpress.models.source import ModelSource, source_of, tag_source
from modelpress.models.zoo import build_zoo_model, zoo_names

SCHEMES = {
    "zoo": "zoo:NAME — a reference model defined in modelpress (see zoo_names())",
    "hf": "hf:PATH — a local Hugging Face model folder",
    "gguf": "gguf:FILE — a llama.cpp GGUF file of a Llama model",
    "import": "import:pkg.mod:fn — a function returning an nn.Module (called with kwargs)",
}

__all__ = [
    "ModelSource",
    "build_from_source",
    "load_model",
    "shape_kwargs",
    "source_of",
    "tag_source",
    "zoo_names",
]


def _import_builder(spec: str) -> Any:
    target = spec.removeprefix("import:")
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ModelError(f"{spec}: write import:package.module:function.")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"{spec}: cannot import it ({exc}).") from None
    return fn


def shape_kwargs(spec: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` the builder named by a ``zoo:``/``import:`` spec accepts.

    Zoo models take every key; an ``import:`` function gets only the keys in its signature
    (all of them if it takes ``**kwargs``), so a builder without ``input_shape`` still works.
    """
    if not spec.startswith("import:"):
        return kwargs
    params = inspect.signature(_import_builder(spec)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def build_from_source(source: ModelSource) -> nn.Module:
    """A fresh instance of the model described by ``source`` (weights not loaded).

    Raises:
        ModelError: the source cannot be built (unknown scheme, import failure, bad kwargs).
    """
    scheme = source.spec.partition(":")[0]
    if scheme == "zoo":
        model = build_zoo_model(source.spec.removeprefix("zoo:"), **source.kwargs)
    elif scheme == "hf":
        from modelpress.models.hf import build_hf

        model = build_hf(source)
    elif scheme == "gguf":
        from modelpress.models.gguf import build_gguf

        model = build_gguf(source)
    elif scheme == "import":
        try:
            model = _import_builder(source.spec)(**source.kwargs)
        except TypeError as exc:
            raise ModelError(f"{source.spec}: {exc}.") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"{source.spec} returned {type(model).__name__}, not an nn.Module.")
    else:
        raise ModelError(f"cannot rebuild a model from source {source.spec!r}.")
    return tag_source(model, source)


def load_model(spec: str, **kwargs: Any) -> nn.Module:
    """Resolve a model spec into a module tagged with its source.

    Args:
        spec: ``zoo:NAME``, ``hf:PATH``, ``gguf:FILE``, ``import:pkg.mod:fn`` or an artifact
            directory.
        kwargs: build arguments for ``zoo:`` and ``import:`` (e.g. ``input_shape``,
            ``num_classes``); ignored for ``hf:``, ``gguf:`` and artifacts.

    Returns:
        The model in eval mode. Artifacts, ``hf:`` folders and ``gguf:`` files come with
        trained weights; ``zoo:`` and ``import:`` models are as their builder returns them.

    Raises:
        UnknownNameError: an unknown scheme or zoo name (with the nearest suggestion).
        ModelError: the model cannot be built; ArtifactError: a corrupt artifact.
    """
    from modelpress.artifact import is_artifact, load_artifact

    scheme, sep, rest = spec.partition(":")
    if is_artifact(spec):
        return load_artifact(spec)
    if scheme == "hf" and sep:
        from modelpress.models.hf import load_hf

        model, source = load_hf(rest)
        return tag_source(model, source)
    if scheme == "gguf" and sep:
        from modelpress.models.gguf import load_gguf

        model, source = load_gguf(rest)
        return tag_source(model, source)
    if scheme in ("zoo", "import") and sep:
        return build_from_source(ModelSource(spec, kwargs)).eval()
    if sep and len(scheme) > 1:
        raise UnknownNameError(
            f"Unknown model spec scheme {scheme + ':'!r}{suggest(scheme, SCHEMES)}; use "
            + ", ".join(f"{s}:" for s in SCHEMES)
            + " or an artifact directory."
        )
    raise ModelError(
        f"{spec!r} is not a model spec or an artifact directory (no manifest.json there); "
        "use zoo:NAME, hf:PATH, gguf:FILE, import:pkg.mod:fn or a directory made by modelpress."
    )
