"""compress(): the original stays untouched, every stage is measured, data needs are checked."""

from __future__ import annotations

import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError, DataError
from modelpress.measure import accuracy


def test_demo_recipe_end_to_end(mlp, digits, tmp_path):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    result = mp.compress(mlp, "demo", data=digits, latency_runs=3)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert [s.technique for s in result.stages] == [
        "prune.magnitude",
        "train",
        "quant.rtn",
        "train",
    ]
    for metrics in [result.baseline] + [s.metrics for s in result.stages]:
        assert {"eval", "params", "nonzeros", "flops", "bytes", "latency_ms"} <= set(metrics)
    assert result.final["bytes"] * 5 < result.baseline["bytes"]
    assert result.final["eval"]["accuracy"] >= result.baseline["eval"]["accuracy"] - 0.03
    assert result.stages[0].learned["sparsity"]
    table = result.table()
    assert "baseline" in table and "3. quant.rtn" in table and "4. train" in table
    path = result.save(tmp_path / "run")
    reloaded = mp.load(path)
    assert accuracy(reloaded, digits.loader("test", 256)) == result.final["eval"]["accuracy"]
    manifest = mp.artifact.read_manifest(path)
    assert manifest["recipe"]["name"] == "demo" and len(manifest["stages"]) == 4


def test_training_stage_without_data_fails_before_any_work(mlp):
    with pytest.raises(DataError, match=r"stage 2 \(train\) needs training data"):
        mp.compress(
            mlp,
            [mp.Stage.of("quant.rtn"), mp.Stage.of("train")],
            example_inputs=torch.zeros(1, 1, 8, 8),
        )


def test_data_as_a_spec_string_and_as_a_loader(mlp, digits):
    by_spec = mp.compress(mlp, "int8", data="digits", latency_runs=0)
    loader = digits.loader("train", batch_size=32, shuffle=True)
    by_loader = mp.compress(
        mlp,
        [mp.Stage.of("train", max_steps=3)],
        data=loader,
        latency_runs=0,
        evaluate=lambda m: {"accuracy": accuracy(m, digits.loader("test", 256))},
    )
    assert by_spec.final["eval"]["accuracy"] > 0.9
    assert by_loader.stages[0].learned["steps"] == 3


def test_recipe_argument_forms(mlp, digits):
    with pytest.raises(ConfigError, match="recipe must be"):
        mp.compress(mlp, [], data=digits)
    with pytest.raises(ConfigError, match="recipe must be"):
        mp.compress(mlp, ["quant.rtn"], data=digits)
    with pytest.raises(ConfigError, match="stage 2 .*'bits'"):
        mp.compress(mlp, [mp.Stage.of("train"), {"technique": "quant.rtn", "bits": 99}])
    r = mp.compress(mlp, mp.Recipe.builtin("int4"), data=digits, latency_runs=0)
    assert r.recipe.name == "int4"
    mixed = [mp.Stage.of("prune.magnitude", sparsity=0.5), {"technique": "quant.rtn", "bits": 4}]
    r = mp.compress(mlp, mixed, data=digits, latency_runs=0)
    assert [s.technique for s in r.recipe.stages] == ["prune.magnitude", "quant.rtn"]
    assert r.recipe.stages[1].config.bits == 4


def test_same_seed_same_model(mlp, digits):
    runs = [mp.compress(mlp, "demo", data=digits, seed=3, latency_runs=0) for _ in range(2)]
    for a, b in zip(
        runs[0].model.state_dict().values(), runs[1].model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_saved_size_is_recorded_exactly(mlp, digits, tmp_path):
    result = mp.compress(mlp, "int4", data=digits, latency_runs=0)
    path = result.save(tmp_path / "a")
    size = mp.measure.directory_bytes(path)
    assert result.final["bytes"] == size
    assert mp.artifact.read_manifest(path)["metrics"]["final"]["bytes"] == size
