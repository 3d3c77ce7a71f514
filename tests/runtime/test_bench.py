"""``modelpress bench DIR``: four measured rows with the right structure (never speeds)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import modelpress as mp
from modelpress.cli import app, main
from modelpress.errors import ConfigError
from modelpress.models import ModelSource
from modelpress.runtime.bench import bench_artifact, example_inputs
from modelpress.testing import tiny_convnet

runner = CliRunner()
ROWS = [
    ("torch fp32 (uncompressed)", "torch"),
    ("torch eager (compressed)", "torch"),
    ("onnxruntime fp32 (uncompressed)", "onnxruntime"),
    ("onnxruntime (compressed)", "onnxruntime"),
]


def test_an_early_exit_artifact_reports_the_share_leaving_early(trained, tmp_path):
    model, digits = trained
    recipe = [mp.Stage.of("early_exit.branches", exits=["relu1"], thresholds=[1e9]),  # all leave
              mp.Stage.of("train", epochs=1)]  # fmt: skip
    path = mp.compress(copy.deepcopy(model), recipe, data=digits, latency_runs=0).save(
        tmp_path / "ee"
    )
    report = bench_artifact(path, batch_size=4, runs=1, warmup=1)
    assert report.left_early == 1.0
    assert [(r.name, r.runtime) for r in report.rows] == ROWS
    result = runner.invoke(app, ["bench", str(path), "--runs", "1", "--warmup", "1"])
    assert result.exit_code == 0 and "100% of these random inputs left at an exit" in result.stdout


@pytest.fixture(scope="module")
def artifact(trained, tmp_path_factory) -> Path:
    model, _ = trained
    result = mp.compress(model, [mp.Stage.of("quant.int8_dynamic")], latency_runs=0)
    return result.save(tmp_path_factory.mktemp("bench") / "int8")


def test_bench_json_has_four_rows_against_torch_fp32(artifact):
    result = runner.invoke(app, ["bench", str(artifact), "--runs", "2", "--warmup", "1",
                                 "--batch-size", "3", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"] == {"input": [3, 1, 8, 8]}  # zoo:mlp records its input shape
    assert report["threads"] == 1 and report["runs"] == 2
    assert [(r["name"], r["runtime"]) for r in report["rows"]] == ROWS
    assert report["rows"][0]["speedup"] == 1.0
    for row in report["rows"]:
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] and row["median_ms"] > 0
        ratio = report["rows"][0]["median_ms"] / row["median_ms"]
        assert row["speedup"] == pytest.approx(ratio)
        assert (row["onnx_bytes"] is None) == (row["runtime"] == "torch")
    fp32_bytes, int8_bytes = report["rows"][2]["onnx_bytes"], report["rows"][3]["onnx_bytes"]
    assert int8_bytes < fp32_bytes / 3
    assert report["onnx_layers"] == {f"fc{i}": "int8_dynamic" for i in (1, 2, 3)}


def test_bench_prints_a_table(artifact):
    result = runner.invoke(app, ["bench", str(artifact), "--runs", "1", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    for name, _ in ROWS:
        assert name in result.stdout
    assert "speedup" in result.stdout and "1.00x" in result.stdout


def test_models_without_a_recorded_shape_take_input_shape(trained, tmp_path):
    path = mp.compress(tiny_convnet(), [mp.Stage.of("quant.rtn", bits=4)],
                       latency_runs=0).save(tmp_path / "conv")  # fmt: skip
    with pytest.raises(ConfigError, match="cannot tell the input shape of import:"):
        bench_artifact(path, runs=1, warmup=1)
    report = bench_artifact(path, runs=1, warmup=1, input_shape=(1, 8, 8), batch_size=2)
    assert report.inputs == {"input": [2, 1, 8, 8]}
    assert report.onnx_layers == {"conv1": "dq_weight", "conv2": "dq_weight", "fc": "nbits"}


def test_hf_sources_get_token_inputs():
    source = ModelSource("hf:/x", {"config": {"model_type": "bert", "vocab_size": 30}})
    inputs = example_inputs(source, torch.nn.Identity(), batch_size=2, seq_len=5)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].shape == (2, 5) and int(inputs["input_ids"].max()) < 30
    again = example_inputs(source, torch.nn.Identity(), batch_size=2, seq_len=5)
    assert torch.equal(inputs["input_ids"], again["input_ids"])  # seeded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "The 'runs' parameter of bench must be an int >= 1. Got 0 instead."),
        (["--input-shape", "1,x"], "--input-shape must be integers separated by commas"),
    ],
)
def test_bad_options_exit_2_with_one_line(artifact, monkeypatch, capsys, args, message):
    monkeypatch.setattr(sys, "argv", ["modelpress", "bench", str(artifact), *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and message in err


def test_not_an_artifact_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["modelpress", "bench", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2 and "no modelpress artifact" in capsys.readouterr().err
