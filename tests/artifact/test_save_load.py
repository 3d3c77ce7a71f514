"""Artifacts: atomic writes, exact reload, integrity checks, edits, aliases, no-source models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.artifact import load_artifact, read_manifest, save_artifact
from modelpress.artifact.nm_index import code_bits
from modelpress.context import Context
from modelpress.edits import edit_op, edits_of, record_edit
from modelpress.errors import ArtifactError
from modelpress.models.source import ModelSource, tag_source
from modelpress.recipe import Stage
from modelpress.registry import get_technique
from modelpress.testing import tiny_convnet


def compressed_convnet():
    model = tiny_convnet()
    ctx = Context()
    for stage in (
        Stage.of("prune.magnitude", sparsity=0.7),
        Stage.of("quant.rtn", bits=4, group_size=8),
    ):
        model = get_technique(stage.technique).apply(model, stage.config, ctx)
    return model


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = compressed_convnet()
    x = torch.randn(4, 1, 8, 8)
    path = save_artifact(model, tmp_path / "art")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "tensors.safetensors"]
    loaded = load_artifact(path)
    assert torch.equal(loaded(x), model(x))
    manifest = read_manifest(path)
    assert manifest["source"]["spec"] == "import:modelpress.testing.models:tiny_convnet"
    assert manifest["tensors"]["conv1.weight"]["codec"]["bits"] == 4


def test_overwrite_replaces_an_artifact_but_refuses_other_dirs(tmp_path):
    model = compressed_convnet()
    save_artifact(model, tmp_path / "art")
    save_artifact(model, tmp_path / "art")  # replacing an artifact is fine
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="is not a modelpress artifact; choose another"):
        save_artifact(model, other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import modelpress.artifact.save as save_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(OSError):
        save_artifact(compressed_convnet(), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def artifact(tmp_path):
    return save_artifact(compressed_convnet(), tmp_path / "art")


def test_flipped_byte_is_caught(artifact):
    f = artifact / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        load_artifact(artifact)


def test_truncated_file_is_caught(artifact):
    f = artifact / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"has \d+ bytes but the manifest records \d+"):
        load_artifact(artifact)


def test_corrupt_manifest_missing_dir_and_future_version(artifact, tmp_path):
    m = artifact / "manifest.json"
    text = m.read_text()
    m.write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        load_artifact(artifact)
    data = json.loads(text)
    data["format_version"] = 99
    m.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(artifact)
    with pytest.raises(ArtifactError, match="no modelpress artifact at"):
        load_artifact(tmp_path / "nothing")


def test_missing_tensor_file(artifact):
    (artifact / "tensors.safetensors").unlink()
    with pytest.raises(ArtifactError, match="is missing; the artifact is incomplete"):
        load_artifact(artifact)


def test_model_without_source_loads_into_a_given_instance(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    path = save_artifact(model, tmp_path / "art")
    with pytest.raises(ArtifactError, match="records no model source"):
        load_artifact(path)
    fresh = nn.Sequential(nn.Linear(3, 2))
    loaded = load_artifact(path, model=fresh)
    assert torch.equal(loaded[0].weight, model[0].weight)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight


def tied() -> nn.Module:
    return Tied()


def test_tied_weights_are_stored_once(tmp_path):
    model = tag_source(Tied(), ModelSource(f"import:{__name__}:tied"))
    path = save_artifact(model, tmp_path / "art")
    records = read_manifest(path)["tensors"]
    assert records["out.weight"] == {"alias_of": "emb.weight"}
    loaded = load_artifact(path)
    assert torch.equal(loaded.out.weight, model.emb.weight)


@edit_op("test.widen")
def _widen(model: nn.Module, edit: dict) -> None:
    setattr(model, edit["module"], nn.Linear(3, edit["width"]))


def small() -> nn.Module:
    return nn.Sequential()


def test_structural_edits_are_replayed_on_load(tmp_path):
    model = tag_source(nn.Sequential(), ModelSource(f"import:{__name__}:small"))
    model.add_module("fc", nn.Linear(3, 7))
    record_edit(model, "test.widen", module="fc", width=7)
    path = save_artifact(model, tmp_path / "art")
    loaded = load_artifact(path)
    assert loaded.fc.out_features == 7 and edits_of(loaded) == [
        {"op": "test.widen", "module": "fc", "width": 7}
    ]
    manifest = read_manifest(path)
    manifest["edits"] = [{"op": "test.unknown"}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="structural edit 'test.unknown'"):
        load_artifact(path)


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.scale = inner, nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


@edit_op("test.wrap")
def _wrap(model: nn.Module, edit: dict) -> nn.Module:
    return _Wrapped(model)


def test_an_edit_that_wraps_the_model_is_replayed_with_its_log_and_source(tmp_path):
    from modelpress.edits import adopt
    from modelpress.models.source import source_of

    inner = tag_source(nn.Sequential(), ModelSource(f"import:{__name__}:small"))
    inner.add_module("fc", nn.Linear(3, 7))
    record_edit(inner, "test.widen", module="fc", width=7)
    model = adopt(_Wrapped(inner), inner)
    record_edit(model, "test.wrap")
    with torch.no_grad():
        model.scale.fill_(2.0)
    path = save_artifact(model, tmp_path / "art")
    loaded = load_artifact(path)
    assert isinstance(loaded, _Wrapped) and source_of(loaded) == source_of(inner)
    assert [e["op"] for e in edits_of(loaded)] == ["test.widen", "test.wrap"]
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), model(x))


def test_same_model_same_bytes(tmp_path):
    a = save_artifact(compressed_convnet(), tmp_path / "a")
    b = save_artifact(compressed_convnet(), tmp_path / "b")
    assert (a / "tensors.safetensors").read_bytes() == (b / "tensors.safetensors").read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pruned_model_saves_nm_layouts_and_loads_exactly(tmp_path, n, m, bits):
    stages = [Stage.of("prune.nm", n=n, m=m, targets=["conv2", "fc"])]  # conv1 has 1 input
    if bits:
        stages.append(Stage.of("quant.rtn", bits=bits, group_size=8))
    result = mp.compress(tiny_convnet(), stages, latency_runs=0)
    path = result.save(tmp_path / "art")
    records = read_manifest(path)["tensors"]
    for name in ("conv2.weight", "fc.weight"):
        assert records[name]["layout"] == {"format": "nm", "n": n, "m": m, "bits": code_bits(n, m)}
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(mp.load(path)(x), result.model(x))
