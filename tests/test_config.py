"""Configs: frozen, unknown keys rejected with suggestions, values in the message template."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field, ValidationError

from modelpress.config import TechniqueConfig, describe_field, parse_config
from modelpress.errors import ConfigError


class Demo(TechniqueConfig):
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction")
    bits: int = Field(4, ge=2, le=8, description="bits")
    scope: Literal["global", "layer"] = "global"
    group_size: int | None = Field(None, ge=1)


def test_valid_values_parse_and_config_is_frozen():
    cfg = parse_config(Demo, {"sparsity": 0.9, "bits": 3}, owner="x.demo")
    assert (cfg.sparsity, cfg.bits, cfg.scope) == (0.9, 3, "global")
    with pytest.raises(ValidationError):
        cfg.sparsity = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"sparsity": 1.2},
            "The 'sparsity' parameter of x.demo must be a float in [0, 1). Got 1.2 instead.",
        ),
        ({"bits": 9}, "The 'bits' parameter of x.demo must be an int in [2, 8]. Got 9 instead."),
        (
            {"scope": "glob"},
            "The 'scope' parameter of x.demo must be one of 'global', 'layer'. Got 'glob' instead.",
        ),
        (
            {"group_size": 0},
            "The 'group_size' parameter of x.demo must be an int >= 1 or null. Got 0 instead.",
        ),
    ],
)
def test_bad_values_use_the_message_template(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(Demo, data, owner="x.demo")
    assert str(info.value) == message


def test_unknown_key_suggests_the_nearest_name():
    with pytest.raises(
        ConfigError, match=r"Unknown parameter 'sparsty' for x.demo \(did you mean 'sparsity'\?\)"
    ):
        parse_config(Demo, {"sparsty": 0.5}, owner="x.demo")


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        parse_config(Demo, {"bits": 1}, owner="x.demo")


def test_non_mapping_is_rejected():
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(Demo, [1, 2], owner="x.demo")  # type: ignore[arg-type]


def test_describe_field_words():
    assert describe_field(Demo.model_fields["sparsity"]) == "a float in [0, 1)"
    assert describe_field(Demo.model_fields["scope"]) == "one of 'global', 'layer'"
