"""Tests for modelpress.models: model spec strings, their errors, and build_from_source."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import modelpress
from modelpress.errors import ModelError, UnknownNameError
from modelpress.models import ModelSource, build_from_source, load_model, source_of, tag_source
from modelpress.testing.models import TinyConvNet

TINY = "import:modelpress.testing.models:tiny_convnet"


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- zoo: ---------------------------------------------------------------------------------


def test_zoo_spec_builds_tagged_eval_model() -> None:
    model = load_model("zoo:lenet-300-100", input_shape=[1, 28, 28], num_classes=10)
    assert not model.training
    assert model.fc1.in_features == 784 and model.fc3.out_features == 10
    assert source_of(model) == ModelSource(
        "zoo:lenet-300-100", {"input_shape": [1, 28, 28], "num_classes": 10}
    )


def test_zoo_spec_needs_input_shape_and_num_classes() -> None:
    with pytest.raises(ModelError, match="zoo:lenet5: missing a required argument: 'input_shape'"):
        load_model("zoo:lenet5")
    with pytest.raises(ModelError, match="missing a required argument: 'num_classes'"):
        load_model("zoo:lenet5", input_shape=[1, 28, 28])


def test_zoo_spec_unknown_name_suggests() -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown zoo model 'lenet6' \(did you mean 'lenet5'"
    ):
        load_model("zoo:lenet6", input_shape=[1, 28, 28], num_classes=10)


# --- import: ------------------------------------------------------------------------------


def test_import_spec_calls_function_with_kwargs() -> None:
    model = load_model(TINY, num_classes=3)
    assert isinstance(model, TinyConvNet) and not model.training
    assert model.fc.out_features == 3
    assert source_of(model) == ModelSource(TINY, {"num_classes": 3})
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_import_spec_bad_module() -> None:
    with pytest.raises(
        ModelError, match=r"import:no_such_pkg\.mod:fn: cannot import it \(No module"
    ):
        load_model("import:no_such_pkg.mod:fn")


def test_import_spec_missing_function() -> None:
    with pytest.raises(ModelError, match="cannot import it .*has no attribute 'nope'"):
        load_model("import:modelpress.testing.models:nope")


def test_import_spec_returning_non_module() -> None:
    with pytest.raises(ModelError, match=r"import:os:getcwd returned str, not an nn\.Module\."):
        load_model("import:os:getcwd")


def test_import_spec_bad_kwargs() -> None:
    with pytest.raises(ModelError, match="unexpected keyword argument 'input_shape'"):
        load_model(TINY, input_shape=[1, 8, 8])


@pytest.mark.parametrize("spec", ["import:x", "import:", "import::fn", "import:pkg.mod:"])
def test_import_spec_malformed(spec: str) -> None:
    with pytest.raises(ModelError, match="write import:package.module:function"):
        load_model(spec)


# --- schemes, paths, artifacts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "nearest"),
    [
        ("zooo:lenet5", "zoo"),
        ("hff:/x", "hf"),
        ("ggufs:/x.gguf", "gguf"),
        ("imports:a:b", "import"),
    ],
)
def test_unknown_scheme_suggests_nearest(spec: str, nearest: str) -> None:
    scheme = spec.partition(":")[0]
    with pytest.raises(UnknownNameError) as info:
        load_model(spec)
    msg = str(info.value)
    assert f"Unknown model spec scheme '{scheme}:' (did you mean '{nearest}'?)" in msg
    assert "zoo:, hf:, gguf:, import: or an artifact directory" in msg
    assert isinstance(info.value, ValueError)


def test_plain_directory_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ModelError, match="is not a model spec or an artifact directory") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("spec", ["no/such/dir", "", "c:/windows-like/path"])
def test_other_strings_are_not_models(spec: str) -> None:
    with pytest.raises(ModelError, match="not a model spec or an artifact directory"):
        load_model(spec)


def test_artifact_directory_spec_loads_the_artifact(tmp_path: Path) -> None:
    model = load_model(TINY, num_classes=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # "trained": differs from a fresh build
    path = modelpress.save(model, tmp_path / "art")
    loaded = load_model(str(path))
    assert isinstance(loaded, TinyConvNet) and not loaded.training
    assert source_of(loaded) == ModelSource(TINY, {"num_classes": 4})
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# --- ModelSource and build_from_source ----------------------------------------------------


def test_source_survives_deepcopy_and_untagged_is_none() -> None:
    model = load_model(TINY, num_classes=2)
    assert source_of(copy.deepcopy(model)) == source_of(model)
    assert source_of(TinyConvNet()) is None
    tagged = tag_source(TinyConvNet(), ModelSource("zoo:mlp"))
    assert source_of(tagged) == ModelSource("zoo:mlp", {})


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [
        ("zoo:lenet-300-100", {"input_shape": (1, 28, 28), "num_classes": 10}),
        ("zoo:lenet5", {"input_shape": [1, 8, 8], "num_classes": 10}),
        ("zoo:mlp", {"input_shape": [64], "num_classes": 10, "hidden": [32, 16]}),
        (TINY, {"num_classes": 5}),
    ],
)
def test_build_from_source_round_trip(spec: str, kwargs: dict) -> None:
    model = load_model(spec, **kwargs)
    stored = json.loads(json.dumps(source_of(model).to_dict()))  # as in the manifest
    source = ModelSource.from_dict(stored)
    assert source.spec == spec
    fresh = build_from_source(source)
    assert fresh is not model
    assert type(fresh) is type(model)
    assert shapes(fresh) == shapes(model)
    assert source_of(fresh) == source
    assert ModelSource.from_dict(source.to_dict()) == source


def test_build_from_source_then_load_state_gives_same_outputs() -> None:
    model = load_model("zoo:mlp", input_shape=[64], num_classes=10)
    fresh = build_from_source(source_of(model))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_from_dict_without_kwargs() -> None:
    assert ModelSource.from_dict({"spec": "zoo:mlp"}) == ModelSource("zoo:mlp", {})
    assert ModelSource.from_dict({"spec": "zoo:mlp", "kwargs": None}).kwargs == {}


def test_build_from_source_unknown_scheme() -> None:
    with pytest.raises(
        ModelError, match="cannot rebuild a model from source 'torchvision:resnet18'"
    ):
        build_from_source(ModelSource("torchvision:resnet18", {}))


def test_build_from_source_reports_bad_kwargs() -> None:
    with pytest.raises(ModelError, match=f"{TINY}: .*unexpected keyword argument 'width'"):
        build_from_source(ModelSource(TINY, {"width": 3}))
    with pytest.raises(ModelError, match="zoo:mlp: .*accepted kwargs are"):
        build_from_source(ModelSource("zoo:mlp", {"input_shape": [64]}))
