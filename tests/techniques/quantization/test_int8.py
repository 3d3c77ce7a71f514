"""quant.int8_dynamic and quant.int8_static: onnxruntime's arithmetic, small output errors,
exact reloads, SmoothQuant on outlier channels, and clear errors."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn.utils import parametrize

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.parametrizations import find_parametrization
from modelpress.recipe import Stage
from modelpress.techniques.quantization.activation import (
    InputQuantizer,
    input_quantizer,
    quantize_inputs,
)
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant
from modelpress.techniques.quantization.int8_static import Int8StaticConfig, apply_int8_static
from modelpress.techniques.quantization.smoothquant import smoothing_factors


def _session(nodes, inputs, outputs) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _value(name: str, dtype: int, shape) -> object:
    return helper.make_tensor_value_info(name, dtype, shape)


def test_dynamic_quantizer_matches_onnxruntime_dynamic_quantize_linear():
    sess = _session(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        [_value("x", TensorProto.FLOAT, [None, None])],
        [_value("q", TensorProto.UINT8, None), _value("s", TensorProto.FLOAT, None),
         _value("z", TensorProto.UINT8, None)],
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    quantizer = InputQuantizer(8, dynamic=True)
    for shift, spread in ((0.0, 1.0), (3.0, 0.5), (-2.0, 7.0), (0.0, 0.0)):
        x = shift + spread * torch.randn(32, 77, generator=g)
        codes, scale, zero = sess.run(None, {"x": x.numpy()})
        s, z = quantizer.qparams(x)
        assert s.item() == scale and z.item() == zero  # the same grid, bit for bit
        ours = quantizer(x)
        theirs = (codes.astype(np.float32) - np.float32(zero)) * np.float32(scale)
        np.testing.assert_array_equal(ours.numpy(), theirs)  # every code equal


@pytest.mark.parametrize("symmetric", [False, True])
def test_static_quantizer_matches_onnxruntime_qdq(symmetric):
    zp_type = TensorProto.INT8 if symmetric else TensorProto.UINT8
    sess = _session(
        [helper.make_node("Div", ["x", "smooth"], ["xs"]),
         helper.make_node("QuantizeLinear", ["xs", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        [_value("x", TensorProto.FLOAT, [None, 16]), _value("smooth", TensorProto.FLOAT, [16]),
         _value("s", TensorProto.FLOAT, []), _value("z", zp_type, [])],
        [_value("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    quantizer = InputQuantizer(8, dynamic=False, symmetric=symmetric)
    quantizer.add_smoothing(16)
    for _ in range(5):
        x = 3 * torch.randn(64, 16, generator=g)
        quantizer.smooth.copy_(0.5 + torch.rand(16, generator=g))
        quantizer.scale.fill_(0.002 + 0.05 * torch.rand((), generator=g).item())
        zero = 128 if symmetric else int(torch.randint(0, 256, (), generator=g))
        quantizer.zero_point.fill_(zero)
        # int8 codes are the uint8 codes minus 128
        z = np.array(zero - 128, np.int8) if symmetric else np.array(zero, np.uint8)
        feeds = {"x": x.numpy(), "smooth": quantizer.smooth.numpy(),
                 "s": quantizer.scale.numpy(), "z": z}  # fmt: skip
        (theirs,) = sess.run(None, feeds)
        np.testing.assert_array_equal(quantizer(x).numpy(), theirs)


def _relative_error(model: nn.Module, result: mp.Result, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = model.eval()(x), result.model.eval()(x)
    return float((out - ref).square().mean() / ref.square().mean())


def test_dynamic_on_the_digits_mlp(mlp, digits):
    result = mp.compress(mlp, [Stage.of("quant.int8_dynamic")], data=digits, latency_runs=0)
    for name in ("fc1", "fc2", "fc3"):
        layer = result.model.get_submodule(name)
        fq = find_parametrization(layer, "weight", AffineFakeQuant)
        assert fq.bits == 8 and fq.symmetric and fq.scale.numel() == layer.out_features
        assert input_quantizer(layer).dynamic
    assert _relative_error(mlp, result, digits.test.tensors[0]) < 1e-4  # measured 1.6e-5
    assert result.final["eval"]["accuracy"] >= result.baseline["eval"]["accuracy"] - 0.003
    assert result.final["bytes"] < 0.34 * result.baseline["bytes"]  # 8-bit codes + manifest


@pytest.mark.parametrize("technique", ["quant.int8_dynamic", "quant.int8_static"])
def test_reduce_range_keeps_weight_codes_within_seven_bits(mlp, digits, technique):
    result = mp.compress(mlp, [Stage.of(technique, reduce_range=True)], data=digits,
                         latency_runs=0)  # fmt: skip
    for name in ("fc1", "fc2", "fc3"):
        fq = find_parametrization(result.model.get_submodule(name), "weight", AffineFakeQuant)
        codes = torch.round(fq.layout.to_groups(result.model.get_submodule(name).weight)
                            / fq.scale[:, None])  # fmt: skip
        assert fq.bits == 7 and int(codes.abs().max()) <= 63  # q - z in [-63, 63]
    assert result.stages[0].learned["bits"]["fc1"] == 7
    assert result.final["eval"]["accuracy"] >= result.baseline["eval"]["accuracy"] - 0.006


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse", "kl"])
def test_static_observers_on_the_digits_mlp(mlp, digits, observer):
    stage = Stage.of("quant.int8_static", observer=observer, n_samples=256)
    result = mp.compress(mlp, [stage], data=digits, latency_runs=0)
    quantizer = input_quantizer(result.model.fc2)
    assert not quantizer.dynamic and quantizer.scale != 1  # calibrated, not the placeholder
    assert _relative_error(mlp, result, digits.test.tensors[0]) < 1e-4  # measured 1.6-1.8e-5
    assert result.final["eval"]["accuracy"] >= result.baseline["eval"]["accuracy"] - 0.003


@pytest.mark.parametrize(
    "params", [{"symmetric": True, "observer": "percentile"}, {"smoothquant_alpha": 0.5}]
)
def test_save_load_reproduces_static_outputs_exactly(mlp, digits, tmp_path, params):
    result = mp.compress(mlp, [Stage.of("quant.int8_static", **params)], data=digits,
                         latency_runs=0)  # fmt: skip
    loaded = mp.load(result.save(tmp_path / "a"))
    x = digits.test.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    for name in ("fc1", "fc2", "fc3"):
        before = input_quantizer(result.model.get_submodule(name))
        after = input_quantizer(loaded.get_submodule(name))
        assert torch.equal(before.scale, after.scale)
        assert torch.equal(before.zero_point, after.zero_point)
        assert (after.smooth is None) == ("smoothquant_alpha" not in params)


def _outlier_model_and_data(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """Two Linears; a few input channels are 50x larger than the rest (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = OrderedDict(fc1=nn.Linear(64, 64), act=nn.ReLU(), fc2=nn.Linear(64, 16))
    model = nn.Sequential(layers)
    gain = torch.ones(64)
    gain[[3, 17, 40]] = 50.0
    batches = [torch.randn(32, 64, generator=g) * gain for _ in range(8)]
    return model, batches


def test_smoothquant_lowers_w8a8_error_on_outlier_channels():
    model, batches = _outlier_model_and_data()
    x = torch.cat(batches[6:])  # held out from calibration
    with torch.no_grad():
        ref_hidden, ref = model.fc1(x), model(x)
    errors, work = {}, model
    for alpha in (None, 0.5):
        work = copy.deepcopy(model)
        cfg = Int8StaticConfig(observer="minmax", smoothquant_alpha=alpha)
        apply_int8_static(work, cfg, Context(batches=batches[:6]))
        with torch.no_grad():
            errors[alpha] = [
                float((out - r).square().mean() / r.square().mean())
                for out, r in ((work.fc1(x), ref_hidden), (work(x), ref))
            ]
    # measured: fc1 1.2e-3 -> 6.3e-5, the whole model 1.0e-3 -> 8.1e-5
    assert errors[0.5][0] < 0.25 * errors[None][0]
    assert errors[0.5][1] < 0.5 * errors[None][1]
    smooth = input_quantizer(work.fc1).smooth
    assert smooth[[3, 17, 40]].min() > 3 * smooth.median()  # the outlier channels divided down


def test_smoothing_keeps_the_float_function_and_follows_the_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, weight, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # dead channels: 1
    model, batches = _outlier_model_and_data(1)
    work = copy.deepcopy(model)
    apply_int8_static(work, Int8StaticConfig(smoothquant_alpha=0.8), Context(batches=batches))
    for layer in (work.fc1, work.fc2):
        input_quantizer(layer).enabled = False  # the division by s stays, the rounding goes
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert not torch.allclose(work.fc1.weight, model.fc1.weight)  # W diag(s) ...
    with torch.no_grad():  # ... times x / s is x W^T again
        assert torch.allclose(work(batches[0]), model(batches[0]), rtol=1e-4, atol=1e-4)


def test_convolutions_are_calibrated(digits):
    from modelpress.testing import tiny_convnet

    model = tiny_convnet()
    result = mp.compress(model, [Stage.of("quant.int8_static", smoothquant_alpha=0.5)],
                         data=digits, latency_runs=0)  # fmt: skip
    for name in ("conv1", "conv2", "fc"):
        assert input_quantizer(result.model.get_submodule(name)).scale != 1
    assert input_quantizer(result.model.conv1).smooth is None  # only Linears are smoothed
    assert input_quantizer(result.model.fc).smooth is not None
    x = digits.test.tensors[0][:128]
    with torch.no_grad():
        ref, out = model(x), result.model(x)
    assert float((out - ref).square().mean() / ref.square().mean()) < 1e-4  # measured 9.5e-6


def test_bad_configs_are_rejected():
    with pytest.raises(
        ConfigError, match="'observer' parameter of quant.int8_static must be one of"
    ):
        Stage.of("quant.int8_static", observer="minimax")
    with pytest.raises(
        ConfigError, match=r"'percentile' parameter .* must be a float in \[50, 100\]"
    ):
        Stage.of("quant.int8_static", observer="percentile", percentile=100.5)
    with pytest.raises(ConfigError, match="'percentile' does not apply to observer 'mse'"):
        Stage.of("quant.int8_static", percentile=99.0)
    with pytest.raises(ConfigError, match="'smoothquant_alpha' parameter .* in \\[0, 1\\]"):
        Stage.of("quant.int8_static", smoothquant_alpha=1.5)


def test_inputs_are_quantized_once(mlp, digits):
    stages = [Stage.of("quant.int8_dynamic", targets=["fc2"]),
              Stage.of("quant.int8_static", ignore=["fc1"])]  # fmt: skip
    with pytest.raises(UnsupportedModuleError, match="fc2: already quantized by an earlier stage"):
        mp.compress(mlp, stages, data=digits, latency_runs=0)
    stages = [Stage.of("quant.int8_dynamic"), Stage.of("quant.rtn", targets=["fc1"])]
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized"):
        mp.compress(mlp, stages, data=digits, latency_runs=0)


def test_input_quantized_without_weight_is_refused():
    model, batches = _outlier_model_and_data()
    quantize_inputs(model, ["fc1"], bits=8, dynamic=True)
    with pytest.raises(UnsupportedModuleError, match="fc1: its input is already quantized"):
        apply_int8_static(model, Int8StaticConfig(), Context(batches=batches))


def test_nan_activations_are_a_data_error_and_change_nothing():
    model, batches = _outlier_model_and_data()
    with torch.no_grad():
        model.fc1.weight[5, 0] = float("nan")  # fc1's inputs are fine, fc2's hold NaN
    state = copy.deepcopy(model.state_dict())
    for alpha in (None, 0.5):
        with pytest.raises(DataError, match="fc2: the calibration activations reaching it contain"):
            apply_int8_static(model, Int8StaticConfig(smoothquant_alpha=alpha),
                              Context(batches=batches))  # fmt: skip
        assert model.state_dict().keys() == state.keys()  # no quantizer attached
        for key, value in model.state_dict().items():  # no weight smoothed
            assert torch.allclose(value, state[key], rtol=0, atol=0, equal_nan=True)
        assert model.training  # the training flag is restored
