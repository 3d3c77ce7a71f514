"""ONNX export: every kind of exported layer gives the outputs of the torch compressed model.

Tolerances (relative to ``max |torch output|``):

* fp32, weight-only (MatMulNBits, GatherBlockQuantized, DequantizeLinear) and dynamic int8:
  ``1e-5`` — the same integer codes and scales, only the float accumulation order differs;
* static QDQ: ``5e-3`` max and ``2e-4`` mean — onnxruntime's fused QGemm / QLinearConv
  requantize a layer's output in integer arithmetic and its Conv/Gemm kernels round in a
  different order, so an activation a hair from a rounding boundary can land one code away
  (measured: at most ``2e-3``, all top-1 predictions equal).

Tests also check that the graph onnxruntime runs holds the integer ops, and that the file is
smaller than the fp32 export.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.models import ModelSource, build_from_source
from modelpress.parametrizations import add_parametrization
from modelpress.runtime import OrtModule, export_onnx, optimized_op_types
from modelpress.techniques.quantization.activation import quantize_inputs
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant
from modelpress.testing import tiny_convnet

EXACT, QDQ_MAX, QDQ_MEAN = 1e-5, 5e-3, 2e-4
TINY_BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def compress(model: nn.Module, technique: str, data=None, **params) -> nn.Module:
    stage = mp.Stage.of(technique, **params)
    return mp.compress(model, [stage], data=data, latency_runs=0).model


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run_both(model: nn.Module, x, path) -> tuple[torch.Tensor, torch.Tensor, object]:
    result = export_onnx(model, x[:4], path)
    with torch.no_grad():
        expected = model(x)
    return OrtModule(result.path)(x), expected, result


@pytest.fixture(scope="module")
def images(digits) -> torch.Tensor:
    return digits.test.tensors[0][:128]


@pytest.fixture(scope="module")
def fp32_bytes(trained, images, tmp_path_factory) -> int:
    return export_onnx(trained[0], images, tmp_path_factory.mktemp("fp") / "m.onnx").bytes


def test_fp32_export_of_a_pruned_mlp_matches(mlp, images, tmp_path):
    pruned = compress(mlp, "prune.magnitude", sparsity=0.5)
    result = export_onnx(pruned, images, tmp_path / "p.onnx", mode="fp32")
    with torch.no_grad():
        expected = pruned(images)
    assert rel_max(OrtModule(result.path)(images), expected) <= EXACT
    assert result.layers == {} and result.input_names == ["x"]  # MLP.forward(x)
    assert not any(f.name.endswith(".tmp") for f in tmp_path.iterdir())


def test_int8_dynamic_mlp_runs_dynamic_quantize_matmul(mlp, images, tmp_path, fp32_bytes):
    model = compress(mlp, "quant.int8_dynamic")
    got, expected, result = run_both(model, images, tmp_path / "d.onnx")
    assert rel_max(got, expected) <= EXACT
    assert set(result.layers.values()) == {"int8_dynamic"}
    ops = optimized_op_types(result.path)
    assert ops["DynamicQuantizeMatMul"] == 3 and ops["MatMul"] + ops["Gemm"] == 0
    assert result.bytes < fp32_bytes / 3


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_static_mlp_fuses_integer_gemm(mlp, digits, images, tmp_path, symmetric):
    model = compress(mlp, "quant.int8_static", digits, observer="minmax", n_samples=64,
                     symmetric=symmetric)  # fmt: skip
    got, expected, result = run_both(model, images, tmp_path / "s.onnx")
    assert rel_max(got, expected) <= QDQ_MAX
    assert float((got - expected).abs().mean() / expected.abs().mean()) <= QDQ_MEAN
    assert torch.equal(got.argmax(1), expected.argmax(1))
    ops = optimized_op_types(result.path)
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 1
    if not symmetric:  # ReLU then a zero-point-0 grid: onnxruntime drops the ReLU and fuses
        assert ops["QGemm"] == 2


def test_int8_static_convnet_runs_qlinearconv(digits, tmp_path):
    model = compress(tiny_convnet(), "quant.int8_static", digits, observer="minmax",
                     n_samples=64)  # fmt: skip
    x = digits.test.tensors[0][:64].reshape(-1, 1, 8, 8)
    got, expected, result = run_both(model, x, tmp_path / "c.onnx")
    assert rel_max(got, expected) <= QDQ_MAX
    assert result.layers == {"conv1": "qdq_static", "conv2": "qdq_static", "fc": "qdq_static"}
    assert optimized_op_types(result.path)["QLinearConv"] == 1


def test_int8_dynamic_convolution_runs_convinteger(digits, tmp_path):
    model = compress(tiny_convnet(), "quant.int8_dynamic", targets=["Conv2d"])
    x = digits.test.tensors[0][:64].reshape(-1, 1, 8, 8)
    got, expected, result = run_both(model, x, tmp_path / "c.onnx")
    assert rel_max(got, expected) <= EXACT
    assert optimized_op_types(result.path)["ConvInteger"] == 2


@pytest.mark.parametrize(
    "params",
    [
        {"bits": 4, "group_size": 16},
        {"bits": 4, "group_size": 32, "symmetric": True},
        {"bits": 3},  # per channel, 4-bit container, one block per row
        {"bits": 8, "symmetric": True},
        {"bits": 2, "group_size": 16},
    ],
)
def test_weight_only_linear_runs_matmulnbits(mlp, images, tmp_path, fp32_bytes, params):
    model = compress(mlp, "quant.rtn", **params)
    got, expected, result = run_both(model, images, tmp_path / "n.onnx")
    assert rel_max(got, expected) <= EXACT
    assert optimized_op_types(result.path)["MatMulNBits"] == 3
    assert result.bytes < fp32_bytes / (2.5 if params["bits"] == 8 else 4)


@pytest.mark.parametrize("params", [{"bits": 2}, {"bits": 2, "group_size": 512}, {"bits": 4}])
def test_groups_wider_than_256_are_split_into_matmulnbits_blocks(tmp_path, params):
    # onnxruntime's 2-bit MatMulNBits refuses blocks over 256: a per-channel grid on 1000
    # inputs (one 1024 block) or 512-wide groups must export as 256-wide blocks
    linear = nn.Sequential(nn.Linear(1000, 24))
    model = compress(linear, "quant.rtn", **params)
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    got, expected, result = run_both(model, x, tmp_path / "w.onnx")
    assert rel_max(got, expected) <= EXACT
    assert optimized_op_types(result.path)["MatMulNBits"] == 1


def test_weight_only_convolutions_dequantize_their_weights(tmp_path, digits):
    model = compress(tiny_convnet(), "quant.rtn", bits=4, targets=["Conv2d"])
    x = digits.test.tensors[0][:64].reshape(-1, 1, 8, 8)
    got, expected, result = run_both(model, x, tmp_path / "w.onnx")
    assert rel_max(got, expected) <= EXACT
    assert result.layers == {"conv1": "dq_weight", "conv2": "dq_weight"}


def test_float_zero_points_and_input_scales_match(mlp, images, tmp_path):
    """HQQ's real-valued zero points and AWQ's per-column scales, on hand-made grids."""
    gen = torch.Generator().manual_seed(0)
    for name, module in [("fc1", mlp.fc1), ("fc2", mlp.fc2)]:
        w = module.weight.detach()
        groups = w.shape[0] * w.shape[1] // 16
        in_scale = torch.rand(w.shape[1], generator=gen) + 0.5
        fq = AffineFakeQuant(
            w, 4, symmetric=False, granularity="group", group_size=16, scale_dtype="float16",
            in_scale=in_scale if name == "fc1" else None,
            scale=torch.rand(groups, generator=gen) * 0.02 + 0.01,
            zero_point=torch.rand(groups, generator=gen) * 15, zero_dtype="float16",
        )  # fmt: skip
        add_parametrization(module, "weight", fq)
    got, expected, result = run_both(mlp, images, tmp_path / "hqq.onnx")
    assert rel_max(got, expected) <= EXACT
    assert result.layers == {"fc1": "nbits", "fc2": "nbits"}


def test_hqq_model_exports_to_matmulnbits(mlp, images, tmp_path):
    model = compress(mlp, "quant.hqq", bits=4, group_size=16)
    got, expected, _ = run_both(model, images, tmp_path / "h.onnx")
    assert rel_max(got, expected) <= EXACT


def test_quantized_embedding_runs_gather_block_quantized(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 8))
    model = compress(model, "quant.rtn", bits=4, group_size=16)
    ids = torch.randint(0, 50, (3, 7))
    got, expected, result = run_both(model, ids, tmp_path / "e.onnx")
    assert rel_max(got, expected) <= EXACT
    assert result.layers == {"0": "gather_nbits", "1": "nbits"}
    assert optimized_op_types(result.path)["GatherBlockQuantized"] == 1


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    return build_from_source(ModelSource("hf:/tiny-bert", {"config": TINY_BERT}))


def tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # padding in the first sequence
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("technique", ["none", "quant.int8_dynamic", "quant.rtn"])
def test_hf_encoder_matches_at_other_batch_and_sequence_sizes(bert, tmp_path, technique):
    model = bert if technique == "none" else compress(bert, technique, bits=4, group_size=16) \
        if technique == "quant.rtn" else compress(bert, technique)  # fmt: skip
    mode = "fp32" if technique == "none" else "quant"
    result = export_onnx(model, tokens(2, 8, 0), tmp_path / "b.onnx", mode=mode)
    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.output_names[0] == "last_hidden_state"
    session = OrtModule(result.path)
    for batch, seq in [(2, 8), (3, 24)]:
        inputs = tokens(batch, seq, 1)
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
        got = session(**inputs).last_hidden_state
        assert got.shape == (batch, seq, 32)
        assert rel_max(got, expected) <= EXACT


def test_fp16_export_is_half_precision(trained, images, tmp_path, fp32_bytes):
    model = trained[0]
    result = export_onnx(model, images, tmp_path / "h.onnx", mode="fp16")
    got = OrtModule(result.path)(images)
    with torch.no_grad():
        expected = model(images)
    assert got.dtype == torch.float16
    assert rel_max(got.float(), expected) <= 5e-3
    assert result.bytes < fp32_bytes * 0.6


def test_export_leaves_the_model_unchanged(mlp, images, tmp_path):
    model = compress(mlp, "quant.int8_dynamic")
    before = copy.deepcopy(model.state_dict())
    model.train()
    export_onnx(model, images, tmp_path / "u.onnx")
    assert model.training and all(model.training for model in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_group_size_not_a_power_of_two_names_the_layer(mlp, images, tmp_path):
    model = compress(mlp, "quant.rtn", bits=4, group_size=24)
    with pytest.raises(UnsupportedModuleError, match=r"^fc1: group_size 24 cannot be exported"):
        export_onnx(model, images, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())  # nothing written


def test_group_wise_weight_with_quantized_inputs_is_refused(mlp, images, tmp_path):
    model = compress(mlp, "quant.rtn", bits=8, group_size=16)
    quantize_inputs(model, ["fc2"], bits=8, dynamic=True)
    with pytest.raises(UnsupportedModuleError, match=r"^fc2: a group-wise weight with integer"):
        export_onnx(model, images, tmp_path / "x.onnx")


def test_quantized_input_with_float_weight_is_refused(mlp, images, tmp_path):
    quantize_inputs(mlp, ["fc3"], bits=8, dynamic=True)
    with pytest.raises(UnsupportedModuleError, match=r"^fc3: a quantized input with a float"):
        export_onnx(mlp, images, tmp_path / "x.onnx")
    # fp32 mode exports it (input quantizer as QuantizeLinear/DequantizeLinear)
    result = export_onnx(mlp, images, tmp_path / "f.onnx", mode="fp32")
    with torch.no_grad():
        assert rel_max(OrtModule(result.path)(images), mlp(images)) <= EXACT
    with pytest.raises(UnsupportedModuleError, match=r"^fc3: its input is quantized"):
        export_onnx(mlp, images, tmp_path / "h.onnx", mode="fp16")


def test_dynamic_convolution_with_per_channel_zero_points_is_refused(digits, tmp_path):
    model = compress(tiny_convnet(), "quant.rtn", bits=8, targets=["conv2"])
    quantize_inputs(model, ["conv2"], bits=8, dynamic=True)
    with pytest.raises(UnsupportedModuleError, match=r"^conv2: a dynamic int8 convolution"):
        export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "x.onnx")


def test_bad_arguments_are_config_and_data_errors(mlp, images, tmp_path):
    with pytest.raises(ConfigError, match="'mode' parameter of export_onnx"):
        export_onnx(mlp, images, tmp_path / "x.onnx", mode="int3")
    with pytest.raises(ConfigError, match="'opset' parameter of export_onnx"):
        export_onnx(mlp, images, tmp_path / "x.onnx", opset=11)
    with pytest.raises(DataError, match="example_inputs must be a Tensor"):
        export_onnx(mlp, [images.numpy()], tmp_path / "x.onnx")
