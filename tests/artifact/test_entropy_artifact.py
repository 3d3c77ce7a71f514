"""Entropy-coded artifacts: recipes that code, exact reloads, the mark, corruption, inspect."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from rich.console import Console

import modelpress as mp
from modelpress.artifact import load_artifact, read_manifest, save_artifact
from modelpress.artifact.manifest import sha256_file
from modelpress.artifact.packing import EntropyCoding, entropy_coding_of, set_entropy_coding
from modelpress.context import Context
from modelpress.errors import ArtifactError
from modelpress.measure import directory_bytes
from modelpress.registry import get_technique
from modelpress.report.inspect import entropy_rows, inspect_table
from modelpress.runtime.artifact import load_quantized

PRUNE_QUANT = [
    {"technique": "prune.magnitude", "sparsity": 0.9},
    {"technique": "quant.rtn", "bits": 5},
]
X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lenet():
    """LeNet-300-100 at random init (its source is recorded, so artifacts reload)."""
    torch.manual_seed(0)
    return mp.load_model("zoo:lenet-300-100", input_shape=[1, 28, 28], num_classes=10)


@pytest.fixture(scope="module")
def runs(lenet, tmp_path_factory):
    """The same prune + quantize recipe saved plain, Huffman-coded and ANS-coded (the ANS one
    through a recipe ending in ``encode.ans``, the Huffman one by applying the stage)."""
    root = tmp_path_factory.mktemp("entropy")
    plain = mp.compress(lenet, PRUNE_QUANT, latency_runs=0)
    ans = mp.compress(lenet, [*PRUNE_QUANT, {"technique": "encode.ans"}], latency_runs=0)
    spec = get_technique("encode.huffman")
    huffman = spec.apply(copy.deepcopy(plain.model), spec.config_cls(), Context())
    return {
        "plain": (plain.model, plain.save(root / "plain"), plain),
        "ans": (ans.model, ans.save(root / "ans"), ans),
        "huffman": (huffman, save_artifact(huffman, root / "huffman"), None),
    }


def test_a_recipe_ending_in_an_encode_stage_writes_a_coded_smaller_artifact(runs) -> None:
    plain = directory_bytes(runs["plain"][1])
    for coder in ("huffman", "ans"):
        manifest = read_manifest(runs[coder][1])
        assert manifest["entropy"] == {"coder": coder, "payloads": "all"}
        assert manifest["format_version"] == 2
        kinds = [rec.get("packing", {}).get("kind") for rec in manifest["tensors"].values()]
        assert coder in kinds
        assert directory_bytes(runs[coder][1]) < plain
    assert runs["ans"][2].stages[-1].metrics["bytes"] == directory_bytes(runs["ans"][1])
    payload = {c: (runs[c][1] / "tensors.safetensors").stat().st_size for c in ("ans", "huffman")}
    assert payload["ans"] < payload["huffman"]
    assert read_manifest(runs["plain"][1])["format_version"] == 1
    assert "entropy" not in read_manifest(runs["plain"][1])


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_coded_artifacts_reload_to_identical_outputs(runs, coder) -> None:
    model, path, _ = runs[coder]
    x = X
    loaded = load_artifact(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
        assert torch.equal(load_quantized(path)(x), loaded(x))  # the integer-export loader too
    assert entropy_coding_of(loaded) == EntropyCoding(coder)  # a re-save codes it the same way


def test_resaving_a_loaded_coded_artifact_gives_the_same_tensor_bytes(runs, tmp_path) -> None:
    _, path, _ = runs["ans"]  # load_quantized: the weights keep their integer grid
    again = save_artifact(load_quantized(path), tmp_path / "again")
    assert (again / "tensors.safetensors").read_bytes() == (
        path / "tensors.safetensors"
    ).read_bytes()


def test_the_mark_survives_deepcopy_and_later_stages(lenet, runs, tmp_path) -> None:
    first = [{"technique": "encode.ans"}, *PRUNE_QUANT]  # marked before anything is integer
    result = mp.compress(lenet, first, latency_runs=0)
    assert entropy_coding_of(copy.deepcopy(result.model)) == EntropyCoding("ans")
    path = result.save(tmp_path / "first")
    assert (path / "tensors.safetensors").read_bytes() == (
        runs["ans"][1] / "tensors.safetensors"
    ).read_bytes()


def test_an_unmarked_model_saves_exactly_as_before(runs, tmp_path) -> None:
    model = copy.deepcopy(runs["ans"][0])
    set_entropy_coding(model, None)
    path = save_artifact(model, tmp_path / "unmarked")
    plain = runs["plain"][1]
    assert (path / "tensors.safetensors").read_bytes() == (
        plain / "tensors.safetensors"
    ).read_bytes()
    assert read_manifest(path)["tensors"] == read_manifest(plain)["tensors"]


def test_the_same_model_gives_the_same_bytes(runs, tmp_path) -> None:
    model, path, _ = runs["huffman"]
    again = save_artifact(model, tmp_path / "again")
    assert (again / "tensors.safetensors").read_bytes() == (
        path / "tensors.safetensors"
    ).read_bytes()


# --- corruption -------------------------------------------------------------------------


def payload_span(path: Path, key: str) -> tuple[int, int]:
    """Byte range of payload ``key`` inside tensors.safetensors."""
    raw = (path / "tensors.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + header_len])[key]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def corrupt(path: Path, key: str, *, fix_sha: bool) -> None:
    """Flip a byte in the middle of payload ``key``; optionally re-sign the file."""
    begin, end = payload_span(path, key)
    f = path / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[(begin + end) // 2] ^= 0x24
    f.write_bytes(bytes(data))
    if fix_sha:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["tensors.safetensors"]["sha256"] = sha256_file(f)
        (path / "manifest.json").write_text(json.dumps(manifest))


def coded_key(path: Path, coder: str) -> tuple[str, str]:
    """A tensor with an entropy-coded codes payload, and that payload's key."""
    for name, rec in read_manifest(path)["tensors"].items():
        if rec.get("packing", {}).get("kind") == coder:
            return name, rec["payloads"]["codes"]
    raise AssertionError("no coded tensor")


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_a_corrupt_stream_is_caught_by_the_decoder_when_the_sha_is_fixed_up(
    runs, tmp_path, coder
) -> None:
    path = save_artifact(runs[coder][0], tmp_path / coder)
    name, key = coded_key(path, coder)
    corrupt(path, key, fix_sha=True)
    with pytest.raises(ArtifactError, match=rf"^{name}: "):
        load_artifact(path)


def test_a_corrupt_stream_fails_the_sha_check_first(runs, tmp_path) -> None:
    path = save_artifact(runs["ans"][0], tmp_path / "ans")
    corrupt(path, coded_key(path, "ans")[1], fix_sha=False)
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        load_artifact(path)


def test_an_unknown_coding_in_the_manifest_is_an_artifact_error(runs, tmp_path) -> None:
    path = save_artifact(runs["ans"][0], tmp_path / "ans")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["entropy"] = {"coder": "arithmetic"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unknown entropy coding"):
        load_artifact(path)


# --- inspect ---------------------------------------------------------------------------


def test_inspect_reports_each_stream_against_its_entropy(runs) -> None:
    rows = {(r["tensor"], r["stream"]): r for r in entropy_rows(runs["ans"][1])}
    plain = {(r["tensor"], r["stream"]): r for r in entropy_rows(runs["plain"][1])}
    assert rows.keys() == plain.keys() and ("fc1.weight", "codes") in rows
    for key, r in rows.items():
        assert r["bits_per_symbol"] == pytest.approx(8 * r["bytes"] / r["symbols"])
        assert r["stream_bits_per_symbol"] <= r["bits_per_symbol"]
        if r["coder"] == "ans":
            assert r["entropy_bits"] <= r["stream_bits_per_symbol"]
            assert r["bits_per_symbol"] < plain[key]["bits_per_symbol"]
        if key[1] == "codes":  # the same symbols, stored differently
            assert r["entropy_bits"] == pytest.approx(plain[key]["entropy_bits"])
    fc1 = rows[("fc1.weight", "codes")]
    assert fc1["coder"] == "ans" and fc1["symbols"] == plain[("fc1.weight", "codes")]["symbols"]
    assert fc1["alphabet"] <= 32 and plain[("fc1.weight", "codes")]["bits_per_symbol"] > 5
    console = Console(width=160, record=True)
    console.print(inspect_table(runs["huffman"][1]))
    text = console.export_text()
    assert "integer streams" in text and "huffman" in text and "entropy b/sym" in text
