"""Tests for modelpress.cli: every command, and user errors as exit code 2 with one line.

Successful runs go through ``typer.testing.CliRunner`` against ``app``. User errors go
through the real entry point ``main()``, which is where a ``ModelpressError`` becomes
``error: ...`` on stderr and exit code 2 (under CliRunner such errors surface as
``result.exception``). ``demo`` takes several seconds, so it runs once per module and the
other tests reuse its artifact.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from modelpress.artifact import is_artifact
from modelpress.cli import app, main
from modelpress.errors import ModelError, UnknownNameError
from modelpress.recipe import Recipe, builtin_recipes

runner = CliRunner()

COMMANDS = [
    "demo", "train", "compress", "inspect", "eval", "bench", "export", "techniques", "recipes"
]  # fmt: skip
ACCURACY = re.compile(r"^accuracy: (\d\.\d{4})", re.MULTILINE)


@dataclass
class DemoRun:
    exit_code: int
    exception: BaseException | None
    stdout: str
    path: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    path = tmp_path_factory.mktemp("cli") / "demo"
    result = runner.invoke(app, ["demo", "--out", str(path)])
    return DemoRun(result.exit_code, result.exception, result.stdout, path)


@pytest.fixture()
def demo_copy(demo: DemoRun, tmp_path: Path) -> Path:
    """A private copy of the demo artifact, for tests that damage it."""
    return Path(shutil.copytree(demo.path, tmp_path / "demo-copy"))


def invoke(*args: str) -> str:
    """Run the app through CliRunner, assert success, return stdout."""
    result = runner.invoke(app, list(args))
    assert result.exception is None and result.exit_code == 0, (result.output, result.exception)
    return result.stdout


MainRunner = Callable[..., tuple[object, str, str]]


@pytest.fixture()
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> MainRunner:
    """Run the real entry point ``main()`` with argv; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[object, str, str]:
        monkeypatch.setattr(sys, "argv", ["modelpress", *args])
        with pytest.raises(SystemExit) as info:
            main()
        captured = capsys.readouterr()
        return info.value.code, captured.out, captured.err

    return run


def one_error_line(err: str) -> str:
    """The single line of stderr, which must start with 'error: '."""
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def write_recipe(path: Path, *stages: dict) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "name": path.stem, "stages": list(stages)}))
    return path


def compress_args(model: Path, recipe: str | Path, out: Path) -> list[str]:
    return ["compress", str(model), "--data", "digits", "--recipe", str(recipe), "--out", str(out)]


# --- demo, inspect, eval ------------------------------------------------------------------


def test_demo_trains_compresses_saves_and_reloads_identically(demo: DemoRun) -> None:
    assert demo.exception is None and demo.exit_code == 0
    assert "baseline" in demo.stdout and "quant.rtn" in demo.stdout
    assert "prune.magnitude" in demo.stdout and "recipe demo" in demo.stdout
    assert re.search(r"reloaded accuracy 0\.9\d{3} vs in-memory 0\.9\d{3}: identical", demo.stdout)
    assert f"saved {demo.path}" in demo.stdout
    assert (demo.path / "manifest.json").is_file()
    assert (demo.path / "tensors.safetensors").is_file()
    manifest = json.loads((demo.path / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "demo"
    assert manifest["recipe"] == Recipe.builtin("demo").to_dict()
    techniques = [s["technique"] for s in manifest["stages"]]
    assert techniques == [s.technique for s in Recipe.builtin("demo").stages]
    assert {"prune.magnitude", "train", "quant.rtn"} <= set(techniques)


def test_inspect_lists_tensors_layouts_and_codecs(demo: DemoRun) -> None:
    out = invoke("inspect", str(demo.path))
    assert "fc1.weight" in out and "fc3.bias" in out
    assert "delta" in out or "bitmask" in out  # pruned to 20% density: a sparse layout
    assert "int4" in out
    assert "manifest.json" in out and "tensors.safetensors" in out


def test_eval_reproduces_demo_reloaded_accuracy(demo: DemoRun) -> None:
    reported = re.search(r"reloaded accuracy (\d\.\d{4})", demo.stdout)
    assert reported is not None
    out = invoke("eval", str(demo.path), "--data", "digits")
    assert out.strip() == f"accuracy: {reported.group(1)}"
    assert float(reported.group(1)) >= 0.9


# --- compress -----------------------------------------------------------------------------


def test_compress_from_artifact_with_builtin_recipe(demo: DemoRun, tmp_path: Path) -> None:
    dest = tmp_path / "int8"
    out = invoke(*compress_args(demo.path, "int8", dest))  # default --latency-runs 20
    assert "recipe int8" in out and "baseline" in out and "1. quant.rtn" in out
    assert re.search(r"1\. quant\.rtn .* \d+\.\d{3} . +none .$", out, re.MULTILINE)  # latency ms
    assert f"saved {dest}" in out
    assert is_artifact(dest) and (dest / "tensors.safetensors").is_file()
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["recipe"] == Recipe.builtin("int8").to_dict()
    assert "latency_ms" in manifest["metrics"]["final"]
    assert manifest["source"]["spec"] == "zoo:mlp"  # carried over from the demo artifact
    assert ACCURACY.search(invoke("eval", str(dest), "--data", "digits"))


def test_compress_with_yaml_recipe_file(demo: DemoRun, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "mine.yaml",
        {"technique": "prune.magnitude", "sparsity": 0.5, "scope": "layer"},
        {"technique": "quant.rtn", "bits": 4, "group_size": 32},
    )
    dest = tmp_path / "out"
    out = invoke(
        "compress",
        str(demo.path),
        "-d",
        "digits",
        "-r",
        str(recipe),
        "--out",
        str(dest),
        "--latency-runs",
        "0",
    )
    assert "recipe mine" in out and "1. prune.magnitude" in out and "2. quant.rtn" in out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "mine"
    stages = manifest["stages"]
    assert [s["technique"] for s in stages] == ["prune.magnitude", "quant.rtn"]
    steps = manifest["recipe"]["stages"]
    assert steps[0]["sparsity"] == 0.5 and steps[1]["bits"] == 4


# --- train --------------------------------------------------------------------------------


def test_train_then_eval_gives_the_same_accuracy(tmp_path: Path) -> None:
    dest = tmp_path / "lenet"
    out = invoke(
        "train", "zoo:lenet-300-100", "--data", "digits", "--out", str(dest), "--epochs", "1"
    )
    trained = ACCURACY.search(out)
    assert trained is not None and "(test split of digits;" in out
    assert f"saved {dest}" in out and is_artifact(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["source"]["spec"] == "zoo:lenet-300-100"
    assert manifest["training"]["steps"] > 0
    assert f"{manifest['metrics']['baseline']['eval']['accuracy']:.4f}" == trained.group(1)
    evaluated = ACCURACY.search(invoke("eval", str(dest), "--data", "digits"))
    assert evaluated is not None and evaluated.group(1) == trained.group(1)


# --- techniques, recipes, help ------------------------------------------------------------


def test_techniques_lists_each_with_its_fields() -> None:
    out = invoke("techniques")
    flat = " ".join(out.split())  # long field descriptions may wrap
    assert re.search(r"^prune\.magnitude: ", out, re.MULTILINE)
    assert re.search(r"^quant\.rtn: ", out, re.MULTILINE)
    assert re.search(r"^train \(needs training\): ", out, re.MULTILINE)
    assert "sparsity = 0.5: a float in [0, 1). Fraction of weights to zero." in flat
    assert "scope = 'global': one of 'global', 'layer'." in flat
    assert "bits = 8: an int in [2, 8]. Bits per weight." in flat
    assert "group_size = None: an int >= 1 or null." in flat
    assert "epochs = 1: an int >= 0." in flat
    assert "lr = 0.001: a float > 0." in flat


def test_recipes_lists_builtins_with_descriptions() -> None:
    out = " ".join(invoke("recipes").split())
    names = builtin_recipes()
    assert {"demo", "int4", "int8", "prune-finetune-int4"} <= set(names)
    for name in names:
        assert f"{name}: {Recipe.builtin(name).description}" in out


def test_recipes_show_prints_parseable_yaml() -> None:
    out = invoke("recipes", "--show", "int4")
    assert out.startswith("version: 1\nname: int4\n")
    assert Recipe.from_yaml(out) == Recipe.builtin("int4")
    assert yaml.safe_load(out)["stages"][0] == {
        "technique": "quant.rtn",
        "bits": 4,
        "granularity": "group",
        "group_size": 64,
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_shows_an_example(command: str) -> None:
    out = invoke(command, "--help")
    assert "Example: modelpress " + command in " ".join(out.split())


def test_top_level_help_shows_an_example() -> None:
    assert "Example: modelpress demo" in " ".join(invoke("--help").split())


# --- user errors through main(): exit 2, one line ------------------------------------------


def test_main_unknown_recipe_suggests(demo: DemoRun, tmp_path: Path, run_main: MainRunner) -> None:
    dest = tmp_path / "never"
    code, out, err = run_main(*compress_args(demo.path, "int9", dest))
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith("error: Unknown recipe 'int9' (did you mean 'int8'")
    assert "built-in recipes: demo, int4, int8" in line
    assert not dest.exists()


def test_main_yaml_unknown_technique_suggests(
    demo: DemoRun, tmp_path: Path, run_main: MainRunner
) -> None:
    recipe = write_recipe(tmp_path / "typo.yaml", {"technique": "prune.magnitud", "sparsity": 0.5})
    code, _, err = run_main(*compress_args(demo.path, recipe, tmp_path / "o"))
    assert code == 2
    line = one_error_line(err)
    assert f"{recipe}: stage 1 (prune.magnitud)" in line
    assert "Unknown technique 'prune.magnitud' (did you mean 'prune.magnitude'?)" in line


def test_main_yaml_out_of_range_value(demo: DemoRun, tmp_path: Path, run_main: MainRunner) -> None:
    recipe = write_recipe(tmp_path / "big.yaml", {"technique": "prune.magnitude", "sparsity": 1.5})
    code, _, err = run_main(*compress_args(demo.path, recipe, tmp_path / "o"))
    assert code == 2
    assert one_error_line(err) == (
        f"error: {recipe}: stage 1 (prune.magnitude): The 'sparsity' parameter of "
        "prune.magnitude must be a float in [0, 1). Got 1.5 instead."
    )


def test_main_missing_data_dir_names_path(
    demo: DemoRun, tmp_path: Path, run_main: MainRunner
) -> None:
    missing = tmp_path / "nonexistent"
    code, _, err = run_main("eval", str(demo.path), "--data", f"mnist:{missing}")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("error: mnist: ") and str(missing) in line


def test_export_writes_an_onnx_file_that_matches_the_artifact(
    demo: DemoRun, tmp_path: Path
) -> None:
    import torch

    from modelpress.data import load_data
    from modelpress.runtime import OrtModule
    from modelpress.runtime.artifact import load_quantized

    dest = tmp_path / "onnx" / "demo.onnx"
    stdout = invoke("export", str(demo.path), str(dest), "--mode", "fp32")
    assert f"wrote {dest}: {dest.stat().st_size:,} bytes (fp32" in stdout
    x = load_data("digits").test.tensors[0][:16]
    with torch.no_grad():
        expected = load_quantized(demo.path).eval()(x)
    assert torch.allclose(OrtModule(dest)(x), expected, atol=1e-5)  # batch axis dynamic


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "int3"], "The 'mode' parameter of export_onnx must be one of"),
        (["--input-shape", "1x8x8"], "--input-shape must be integers separated by commas"),
        (["--opset", "12"], "The 'opset' parameter of export_onnx must be an int in [17, 20]"),
    ],
)
def test_main_export_bad_options_write_nothing(
    demo: DemoRun, tmp_path: Path, run_main: MainRunner, args: list[str], message: str
) -> None:
    code, _, err = run_main("export", str(demo.path), str(tmp_path / "m.onnx"), *args)
    assert code == 2 and message in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_main_export_onto_a_directory_names_it(
    demo: DemoRun, tmp_path: Path, run_main: MainRunner
) -> None:
    code, _, err = run_main("export", str(demo.path), str(tmp_path))
    assert code == 2
    assert one_error_line(err) == (
        f"error: {tmp_path} is a directory; give the file to write, e.g. {tmp_path}/model.onnx."
    )


def test_main_unknown_model_scheme_suggests(run_main: MainRunner) -> None:
    code, _, err = run_main("eval", "zooo:lenet5", "--data", "digits")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("error: Unknown model spec scheme 'zooo:' (did you mean 'zoo'?)")


def test_main_non_artifact_directory_as_model(tmp_path: Path, run_main: MainRunner) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.pt").write_bytes(b"not an artifact")
    code, _, err = run_main("eval", str(plain), "--data", "digits")
    assert code == 2
    line = one_error_line(err)
    assert f"'{plain}' is not a model spec or an artifact directory" in line


def test_main_refuses_out_onto_non_artifact_directory(
    demo: DemoRun, tmp_path: Path, run_main: MainRunner
) -> None:
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    (dest / "sub").mkdir()
    (dest / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    code, _, err = run_main(*compress_args(demo.path, "int8", dest), "--latency-runs", "0")
    assert code == 2
    # compress reports stage progress on stderr before it reaches the save; the error is
    # the one line that starts with 'error:' and it comes last
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]]
    assert f"{dest.resolve()} exists and is not a modelpress artifact" in errors[0]
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert (dest / "notes.txt").read_text() == "keep me"
    assert (dest / "sub" / "data.bin").read_bytes() == b"\x00\x01\x02"
    assert not any(p.name.startswith(f".{dest.name}.") for p in tmp_path.iterdir())


def test_main_corrupted_artifact_fails_sha256(demo_copy: Path, run_main: MainRunner) -> None:
    tensors = demo_copy / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    for args in (["eval", str(demo_copy), "--data", "digits"], ["inspect", str(demo_copy)]):
        code, _, err = run_main(*args)
        assert code == 2
        line = one_error_line(err)
        assert str(tensors) in line and "sha256" in line


def test_main_truncated_artifact_reports_bytes(demo_copy: Path, run_main: MainRunner) -> None:
    tensors = demo_copy / "tensors.safetensors"
    size = tensors.stat().st_size
    tensors.write_bytes(tensors.read_bytes()[: size - 100])
    code, _, err = run_main("eval", str(demo_copy), "--data", "digits")
    assert code == 2
    line = one_error_line(err)
    assert f"has {size - 100} bytes but the manifest records {size}" in line


def test_main_success_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["modelpress", "recipes"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert "int8: " in captured.out and captured.err == ""


def test_main_usage_error_exits_2(demo: DemoRun, run_main: MainRunner) -> None:
    code, _, err = run_main("eval", str(demo.path))
    assert code == 2 and "--data" in err


def test_main_demo_mismatch_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import modelpress
    import modelpress.measure
    import modelpress.train

    # make the demo cheap (no training, int8 only) and force a reloaded-accuracy mismatch
    int8 = Recipe.builtin("int8")
    monkeypatch.setattr(modelpress.Recipe, "builtin", staticmethod(lambda name: int8))
    monkeypatch.setattr(modelpress.train, "train_model", lambda *a, **k: {"steps": 0})
    monkeypatch.setattr(modelpress.measure, "accuracy", lambda model, loader: -1.0)
    monkeypatch.setattr(sys, "argv", ["modelpress", "demo", "--out", str(tmp_path / "d")])
    code: object = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    assert "DIFFERENT" in capsys.readouterr().out
    assert code == 1


# --- the same errors under CliRunner surface as exceptions ---------------------------------


def test_runner_surfaces_modelpress_errors_as_exceptions(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "zooo:lenet5", "--data", "digits"])
    assert isinstance(result.exception, UnknownNameError)
    assert "did you mean 'zoo'" in str(result.exception)
    result = runner.invoke(app, ["eval", str(tmp_path), "--data", "digits"])
    assert isinstance(result.exception, ModelError)


def test_runner_usage_error_is_exit_2() -> None:
    result = runner.invoke(app, ["eval", "zoo:mlp"])
    assert result.exit_code == 2 and "Missing option '--data'" in result.output


def test_import_builder_without_shape_kwargs_trains_and_reloads(tmp_path: Path) -> None:
    # tiny_convnet takes num_classes only: the CLI passes just the kwargs it accepts
    dest = tmp_path / "conv"
    out = invoke(
        "train", "import:modelpress.testing.models:tiny_convnet", "--data", "digits",
        "--out", str(dest), "--epochs", "1",
    )  # fmt: skip
    trained = ACCURACY.search(out)
    evaluated = ACCURACY.search(invoke("eval", str(dest), "--data", "digits"))
    assert trained is not None and evaluated is not None
    assert trained.group(1) == evaluated.group(1)


def test_train_is_seeded(tmp_path: Path) -> None:
    runs = [
        invoke(
            "train",
            "zoo:mlp",
            "--data",
            "digits",
            "--out",
            str(tmp_path / f"m{i}"),
            "--epochs",
            "1",
        )
        for i in range(2)
    ]
    a, b = (ACCURACY.search(r) for r in runs)
    assert a is not None and b is not None and a.group(1) == b.group(1)
    assert (tmp_path / "m0" / "tensors.safetensors").read_bytes() == (
        tmp_path / "m1" / "tensors.safetensors"
    ).read_bytes()
