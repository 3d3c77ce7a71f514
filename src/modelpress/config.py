"""The base of every technique config: frozen pydantic models that reject unknown keys.

Bad values are reported with one message template (scikit-learn's):
``The 'sparsity' parameter of prune.magnitude must be a float in [0, 1). Got 1.2 instead.``
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Literal, TypeVar

import annotated_types as at
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from modelpress.errors import ConfigError, suggest

C = TypeVar("C", bound="TechniqueConfig")


def _fractions(value: dict[str, float]) -> dict[str, float]:
    for sel, s in value.items():
        if not 0 <= s < 1:
            raise ValueError(f"layer_sparsity[{sel!r}] = {s!r} is not in [0, 1)")
    return value


# per-layer overrides: selector -> a fraction in [0, 1)
LayerFractions = typing.Annotated[dict[str, float], AfterValidator(_fractions)]


class TechniqueConfig(BaseModel):
    """Base class of technique configs: frozen, ``extra="forbid"``, every field documented.

    A config says what is asked; what a technique learns lives in the model and in the
    stage's result record, never here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    version: ClassVar[int] = 1


class TargetedConfig(TechniqueConfig):
    """A config for techniques that act on selected modules (see :mod:`modelpress.targeting`)."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d"],
        description="Modules to act on: exact names, type names (Linear) or 're:' regexes.",
    )
    ignore: list[str] = Field(
        default_factory=list, description="Modules to leave alone, in the same selector syntax."
    )


def parse_config(cls: type[C], data: dict[str, Any], *, owner: str) -> C:
    """Validate ``data`` into ``cls``, turning pydantic's report into one clear line.

    Args:
        cls: the config class.
        data: the raw keys and values (from YAML, the CLI or Python).
        owner: the technique name used in messages, e.g. ``prune.magnitude``.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: an unknown key (with the nearest valid name) or a bad value, in the
            template ``The 'x' parameter of owner must be ... Got ... instead.``
    """
    if not isinstance(data, dict):
        raise ConfigError(f"The parameters of {owner} must be a mapping. Got {data!r} instead.")
    unknown = [k for k in data if k not in cls.model_fields]
    if unknown:
        key = unknown[0]
        valid = ", ".join(cls.model_fields)
        raise ConfigError(
            f"Unknown parameter {key!r} for {owner}{suggest(str(key), cls.model_fields)}; "
            f"valid parameters: {valid}."
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error_message(cls, exc, owner)) from None


def _first_error_message(cls: type[TechniqueConfig], exc: ValidationError, owner: str) -> str:
    err = exc.errors()[0]
    loc = err.get("loc", ())
    field_name = str(loc[0]) if loc else ""
    got = err.get("input")
    if field_name in cls.model_fields:
        expected = describe_field(cls.model_fields[field_name])
        why = ""
        if err.get("type") == "value_error":  # a field validator said what is wrong
            why = " (" + str(err.get("msg", "")).removeprefix("Value error, ") + ")"
        return (
            f"The {field_name!r} parameter of {owner} must be {expected}. Got {got!r} instead{why}."
        )
    # a model-level validator: its message already names the parameters
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid parameters for {owner}: {msg}"


def describe_field(field: FieldInfo) -> str:
    """Say in words what a field accepts: ``a float in [0, 1)``, ``one of 'global', 'layer'``."""
    annotation = field.annotation
    optional = type(None) in typing.get_args(annotation)
    if optional:
        rest = tuple(a for a in typing.get_args(annotation) if a is not type(None))
        annotation = rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007
    text = _describe_bounded(_describe_type(annotation), field)
    return text + " or null" if optional else text


def _describe_bounded(kind: str, field: FieldInfo) -> str:
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, at.Ge):
            lo = f"[{m.ge}"
        elif isinstance(m, at.Gt):
            lo = f"({m.gt}"
        elif isinstance(m, at.Le):
            hi = f"{m.le}]"
        elif isinstance(m, at.Lt):
            hi = f"{m.lt})"
    if lo and hi:
        return f"{kind} in {lo}, {hi}"
    if lo:
        return f"{kind} {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f"{kind} {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return kind


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe_type(a) for a in args)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    names = {int: "an int", float: "a float", bool: "a bool", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))
