"""The contract every registered technique passes (``check_technique``).

Checks, each with a clear failure message:

1. the config round-trips through a recipe's YAML;
2. a bad value is rejected with the message template, and an unknown key with a suggestion;
3. a ``targets`` selector that matches nothing is a :class:`NoMatchingModulesError`;
4. outputs stay close to the original's (mean cosine similarity >= ``min_cosine``);
5. the artifact is smaller than the original's (when ``expect_smaller``);
6. save → load gives exactly the compressed model's outputs;
7. the same seed gives byte-identical payloads and tensor records.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import annotated_types as at
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.artifact import load_artifact, save_artifact
from modelpress.artifact.manifest import MANIFEST, TENSORS
from modelpress.config import parse_config
from modelpress.errors import ConfigError, NoMatchingModulesError
from modelpress.measure import directory_bytes
from modelpress.pipeline import compress
from modelpress.recipe import Recipe, Stage
from modelpress.registry import get_technique


class ContractError(AssertionError):
    """A technique broke the contract (raised by :func:`check_technique`)."""


def _bad_value(cfg_cls: type, field: str) -> Any | None:
    """A value just outside a numeric field's bounds, or an invalid choice, or None."""
    info = cfg_cls.model_fields[field]
    for m in info.metadata:
        if isinstance(m, at.Ge):
            return m.ge - 1
        if isinstance(m, at.Gt):
            return m.gt - 1
        if isinstance(m, at.Le):
            return m.le + 1
        if isinstance(m, at.Lt):
            return m.lt + 1
    if "Literal" in str(info.annotation):
        return "__not_a_choice__"
    return None


def check_config(name: str, params: dict[str, Any]) -> None:
    """Checks 1-2: YAML round-trip, bad values and unknown keys rejected clearly."""
    spec = get_technique(name)
    recipe = Recipe(stages=(Stage.of(name, **params),))
    if Recipe.from_yaml(recipe.to_yaml()) != recipe:
        raise ContractError(f"{name}: config does not round-trip through YAML")
    checked = 0
    for field in spec.config_cls.model_fields:
        bad = _bad_value(spec.config_cls, field)
        if bad is None:
            continue
        try:
            parse_config(spec.config_cls, {**params, field: bad}, owner=name)
        except ConfigError as exc:
            pattern = (
                f"The '{field}' parameter of {name} must be .* Got {re.escape(repr(bad))} instead."
            )
            if not re.search(pattern, str(exc)):
                raise ContractError(
                    f"{name}: message for bad {field!r} breaks the template: {exc}"
                ) from None
            checked += 1
        else:
            raise ContractError(f"{name}: {field}={bad!r} was accepted")
    if not checked:
        raise ContractError(f"{name}: no bounded or choice field to check rejection on")
    first = next(iter(spec.config_cls.model_fields))
    try:
        parse_config(spec.config_cls, {first + "x": 1}, owner=name)
    except ConfigError as exc:
        if f"did you mean '{first}'" not in str(exc):
            raise ContractError(f"{name}: unknown key gives no suggestion: {exc}") from None
    else:
        raise ContractError(f"{name}: unknown key was accepted")


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _artifact(model: nn.Module, root: Path, name: str) -> tuple[Path, bytes, dict[str, Any]]:
    path = save_artifact(model, root / name)
    tensors = json.loads((path / MANIFEST).read_text())["tensors"]
    return path, (path / TENSORS).read_bytes(), tensors


def check_technique(
    name: str,
    params: dict[str, Any],
    model: nn.Module,
    data: Any,
    *,
    inputs: torch.Tensor,
    min_cosine: float = 0.95,
    expect_smaller: bool = True,
    targeted: bool = True,
    followed_by: Sequence[Stage] = (),
) -> dict[str, Any]:
    """Run the whole contract for technique ``name`` with ``params`` on ``model``.

    Args:
        name: the registry key.
        params: config values to use (valid ones).
        model: a trained model with a source (so it saves and loads); not changed.
        data: what :func:`~modelpress.compress` takes as ``data``.
        inputs: a batch to compare outputs on.
        min_cosine: the tolerance of check 4: mean cosine similarity of output rows.
        expect_smaller: check 5 applies (False for stages that do not compress, like train).
        targeted: check 3 applies (the config has ``targets``).
        followed_by: stages run after the technique's (e.g. the ``train`` stage a
            training-time technique acts in).

    Returns:
        What was measured: ``cosine``, ``bytes_before``, ``bytes_after``.

    Raises:
        ContractError: a check failed; the message says which and why.
    """
    check_config(name, params)
    if targeted:
        try:
            stages = [Stage.of(name, **params, targets=["re:no_such_module"]), *followed_by]
            compress(model, stages, data=data, latency_runs=0)
        except NoMatchingModulesError as exc:
            if "no_such_module" not in str(exc):
                raise ContractError(
                    f"{name}: nothing-matched error does not name the selector"
                ) from None
        else:
            raise ContractError(f"{name}: a selector matching nothing was accepted")
    before = copy.deepcopy(model.state_dict())
    recipe = [Stage.of(name, **params), *followed_by]
    runs = [compress(model, recipe, data=data, seed=0, latency_runs=0) for _ in range(2)]
    if any(not torch.equal(before[k], v) for k, v in model.state_dict().items()):
        raise ContractError(f"{name}: the input model was changed")
    ref, out = _outputs(model, inputs), _outputs(runs[0].model, inputs)
    cosine = float(F.cosine_similarity(ref.flatten(1), out.flatten(1), dim=1).mean())
    if cosine < min_cosine:
        raise ContractError(f"{name}: output cosine {cosine:.4f} < {min_cosine}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_path, _, _ = _artifact(model, root, "base")
        path, payload, records = _artifact(runs[0].model, root, "a")
        _, payload2, records2 = _artifact(runs[1].model, root, "b")
        sizes = directory_bytes(base_path), directory_bytes(path)
        if expect_smaller and not sizes[1] < sizes[0]:
            raise ContractError(f"{name}: artifact not smaller ({sizes[1]} >= {sizes[0]} bytes)")
        if not torch.equal(_outputs(load_artifact(path), inputs), out):
            raise ContractError(f"{name}: save -> load changes the outputs")
        if payload != payload2 or records != records2:
            raise ContractError(f"{name}: the same seed gave different artifact bytes")
    return {"cosine": cosine, "bytes_before": sizes[0], "bytes_after": sizes[1]}
