"""OrtModule: an onnxruntime session called like the module; and load_quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ArtifactError, ConfigError, DataError
from modelpress.measure import embeddings, measure_latency
from modelpress.models import ModelSource, build_from_source
from modelpress.runtime import OrtModule, export_onnx
from modelpress.runtime.artifact import load_quantized
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant


class TwoInTwoOut(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": a + b, "product": a * b}


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> OrtModule:
    path = tmp_path_factory.mktemp("ort") / "two.onnx"
    x = torch.ones(2, 3)
    return OrtModule(export_onnx(TwoInTwoOut(), (x, x), path).path)


def test_positional_and_keyword_inputs_give_named_outputs(two):
    a, b = torch.arange(6.0).reshape(2, 3), torch.full((2, 3), 2.0)
    for out in (two(a, b), two(a, b=b), two(a=a, b=b)):
        assert torch.equal(out.total, a + b) and torch.equal(out["product"], a * b)
        assert torch.equal(out[1], a * b) and list(out) == ["total", "product"]
    assert two(a.double(), b).total.dtype == torch.float32  # cast to the graph's dtype
    assert two(a[:1], b[:1]).total.shape == (1, 3)  # dynamic batch


def test_bad_inputs_are_data_errors(two):
    x = torch.ones(2, 3)
    with pytest.raises(DataError, match=r"takes inputs \['a', 'b'\]; .*missing"):
        two(x)
    with pytest.raises(DataError, match=r"unknown or repeated \['c'\]"):
        two(x, x, c=x)
    with pytest.raises(DataError, match=r"unknown or repeated \['a'\]"):
        two(x, a=x, b=x)
    with pytest.raises(DataError, match="takes 2 inputs"):
        two(x, x, x)
    with pytest.raises(DataError, match="must be a torch Tensor"):
        two(x, [1.0])


def test_bad_threads_and_missing_file(tmp_path, two):
    with pytest.raises(ConfigError, match="'threads' parameter of OrtModule"):
        OrtModule(two.path, threads=0)
    with pytest.raises(ArtifactError, match="no such ONNX file"):
        OrtModule(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ArtifactError, match="onnxruntime cannot load it"):
        OrtModule(tmp_path / "junk.onnx")


def test_measure_latency_and_embeddings_run_an_ort_module(tmp_path):
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 50,
              "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32}  # fmt: skip
    torch.manual_seed(0)
    bert = build_from_source(ModelSource("hf:/tiny", {"config": config}))
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6)}
    batch["attention_mask"][1, 3:] = 0
    session = OrtModule(export_onnx(bert, batch, tmp_path / "b.onnx").path)
    with torch.no_grad():
        expected = embeddings(bert, batch)
    assert torch.allclose(embeddings(session, batch), expected, atol=1e-5)
    latency = measure_latency(session, batch, runs=2, warmup=1)
    assert latency.median_ms > 0 and latency.batch_size == 2


def test_load_quantized_restores_the_grid_and_exports_like_the_original(trained, tmp_path):
    model, digits = trained
    x = digits.test.tensors[0][:32]
    stages = [mp.Stage.of("prune.magnitude", sparsity=0.5),
              mp.Stage.of("quant.rtn", bits=4, group_size=16)]  # fmt: skip
    result = mp.compress(model, stages, latency_runs=0)
    path = result.save(tmp_path / "art")
    loaded = load_quantized(path)
    fq = loaded.fc1.parametrizations.weight[0]
    assert isinstance(fq, AffineFakeQuant) and fq.bits == 4 and fq.layout.group_size == 16
    with torch.no_grad():
        assert torch.equal(loaded(x), mp.load(path)(x))
    from_memory = export_onnx(result.model, x, tmp_path / "a.onnx")
    from_disk = export_onnx(loaded, x, tmp_path / "b.onnx")
    assert from_disk.layers == from_memory.layers == {f"fc{i}": "nbits" for i in (1, 2, 3)}
    assert torch.equal(OrtModule(from_disk.path)(x), OrtModule(from_memory.path)(x))
