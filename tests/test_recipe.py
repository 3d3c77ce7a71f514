"""Recipes: YAML in and out, built-ins, and clear errors naming the stage."""

from __future__ import annotations

import pytest

from modelpress.errors import ConfigError, UnknownNameError
from modelpress.recipe import Recipe, Stage, builtin_recipes

YAML = """
version: 1
name: prune-finetune-int4
stages:
  - technique: prune.magnitude
    sparsity: 0.9
    scope: global
  - technique: train
    epochs: 2
    lr: 1.0e-3
  - technique: quant.rtn
    bits: 4
    group_size: 64
"""


def test_design_example_parses_and_round_trips():
    recipe = Recipe.from_yaml(YAML)
    assert [s.technique for s in recipe.stages] == ["prune.magnitude", "train", "quant.rtn"]
    assert recipe.stages[2].config.granularity == "group"  # group_size implies it
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_yaml_file_and_builtins(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(YAML)
    assert Recipe.resolve(str(path)).name == "prune-finetune-int4"
    assert {"demo", "int8", "int4"} <= set(builtin_recipes())
    for name in builtin_recipes():
        assert Recipe.builtin(name).stages


def test_stage_of_python_api():
    stage = Stage.of("quant.rtn", bits=3)
    assert stage.config.bits == 3 and stage.to_dict() == {"technique": "quant.rtn", "bits": 3}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "stages: [{technique: prune.magnitud}]",
            r"stage 1 \(prune.magnitud\): Unknown technique .*did you mean 'prune.magnitude'",
        ),
        (
            "stages: [{technique: prune.magnitude, sparsity: 1.5}]",
            r"stage 1 \(prune.magnitude\): The 'sparsity' parameter of prune.magnitude must be a float in \[0, 1\). Got 1.5 instead.",
        ),
        ("stages: [{technique: quant.rtn, bitz: 4}]", r"did you mean 'bits'"),
        ("stages: [{technique: quant.rtn, granularity: group}]", r"needs 'group_size'"),
        ("stages: [{technique: train, epochs: 0}]", r"nothing would train"),
        ("stages: []", r"non-empty list"),
        ("stagez: []", r"unknown recipe key 'stagez' \(did you mean 'stages'\?\)"),
        ("version: 2\nstages: [{technique: train}]", r"version 2 is not supported"),
        ("[1, 2]", r"must be a mapping"),
        ("stages: [{sparsity: 0.5}]", r"stage 1 must be a mapping with a 'technique' key"),
        ("stages: [{technique: train}\n", r"not valid YAML"),
    ],
)
def test_bad_recipes_say_what_is_wrong(text, match):
    with pytest.raises(ConfigError, match=match):
        Recipe.from_yaml(text)


def test_unknown_builtin_and_missing_file():
    with pytest.raises(UnknownNameError, match="did you mean 'int8'"):
        Recipe.builtin("int9")
    with pytest.raises(ConfigError, match="not found"):
        Recipe.resolve("/nonexistent/recipe.yaml")
