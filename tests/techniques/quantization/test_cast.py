"""quant.cast: 16-bit storage, exact reloads, overflow refused, quantized weights left as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.artifact import load_artifact
from modelpress.artifact.save import encode_model
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import ConfigError, NoMatchingModulesError, UnsupportedModuleError
from modelpress.parametrizations import parametrized_tensors
from modelpress.pipeline import compress
from modelpress.recipe import Stage
from modelpress.report.inspect import tensor_rows
from modelpress.techniques.quantization.cast import (
    CastConfig,
    apply_cast,
    flushed_to_zero,
    overflowing,
    round_to_dtype,
)
from modelpress.techniques.quantization.rtn import WeightQuantConfig, apply_rtn
from modelpress.testing import tiny_convnet


def payload_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in encode_model(model)[1].values())


def test_rounding_underflow_and_overflow():
    w = torch.tensor([1.0, 1 + 2**-12, 1e-9, 0.0, -70000.0, 65504.0])
    half = round_to_dtype(w, torch.float16)
    assert half.dtype == torch.float32
    assert half[:4].tolist() == [1.0, 1.0, 0.0, 0.0]  # 1 + 2^-12 is below fp16's half-ulp
    assert torch.equal(round_to_dtype(half[:4], torch.float16), half[:4])  # idempotent
    assert round_to_dtype(w, torch.bfloat16)[4] == -70144.0  # 8 mantissa bits
    assert flushed_to_zero(w, torch.float16) == 1  # 1e-9; the stored 0.0 does not count
    assert overflowing(w, torch.float16) == 70000.0
    assert overflowing(w[:4], torch.float16) is None
    assert overflowing(w, torch.bfloat16) is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_the_payload_and_exact_reload(mlp, digits, tmp_path, dtype):
    result = compress(mlp, [Stage.of("quant.cast", dtype=dtype)], data=digits, latency_runs=0)
    assert payload_bytes(result.model) * 2 == payload_bytes(mlp)  # every tensor is a parameter
    torch_dtype = getattr(torch, dtype)
    for name, param in mlp.named_parameters():
        module, _, pname = name.rpartition(".")
        cast = getattr(result.model.get_submodule(module), pname)
        assert torch.equal(cast, param.detach().to(torch_dtype).float())
    path = result.save(tmp_path / dtype)
    assert {r["codec"] for r in tensor_rows(path)} == {dtype}
    x = digits.test.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(load_artifact(path)(x), result.model(x))
    assert result.final["eval"]["accuracy"] == pytest.approx(result.baseline["eval"]["accuracy"])
    assert set(result.stages[0].learned["dtype"]) == {n for n, _ in mlp.named_parameters()}


def test_overflow_names_the_layer_suggests_bfloat16_and_changes_nothing(mlp):
    with torch.no_grad():
        mlp.fc2.weight[3, 5] = 1.0e5
    cfg = parse_config(CastConfig, {}, owner="quant.cast")
    with pytest.raises(
        ConfigError,
        match=r"fc2.weight: \|w\| reaches 100000, beyond float16's largest value 65504; "
        r"use dtype 'bfloat16' or ignore 'fc2'",
    ):
        apply_cast(mlp, cfg, Context())
    assert not parametrized_tensors(mlp)  # fc1 came first and was not cast either
    cfg = parse_config(CastConfig, {"dtype": "bfloat16"}, owner="quant.cast")
    assert apply_cast(mlp, cfg, Context()).fc2.weight[3, 5] == 99840.0  # bf16's nearest


def test_after_rtn_weights_stay_int_and_the_rest_goes_16_bit(mlp, digits, tmp_path):
    recipe = [Stage.of("quant.rtn", bits=4, group_size=16), Stage.of("quant.cast")]
    result = compress(mlp, recipe, data=digits, latency_runs=0)
    learned, sizes = result.stages[1].learned, [s.metrics["bytes"] for s in result.stages]
    assert sizes[1] == sizes[0] - 202 * 2  # the 202 biases: 2 bytes each instead of 4
    assert learned["already_stored"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert set(learned["dtype"]) == {"fc1.bias", "fc2.bias", "fc3.bias"}
    codecs = {r["name"]: r["codec"] for r in tensor_rows(result.save(tmp_path / "a"))}
    assert codecs == {
        **{f"fc{i}.weight": "int4 asym g16" for i in (1, 2, 3)},
        **{f"fc{i}.bias": "float16" for i in (1, 2, 3)},
    }


def test_nothing_left_to_cast_is_an_error():
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    apply_rtn(model, parse_config(WeightQuantConfig, {}, owner="quant.rtn"), Context())
    with pytest.raises(
        UnsupportedModuleError,
        match=r"quant.cast: every selected parameter is already stored by an earlier stage "
        r"\(e.g. 0.weight\)",
    ):
        apply_cast(model, parse_config(CastConfig, {}, owner="quant.cast"), Context())


def test_norms_and_convs_are_cast_by_default():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(144))
    cfg = parse_config(CastConfig, {}, owner="quant.cast")
    apply_cast(model, cfg, Context())
    cast = {q for q, _, _ in parametrized_tensors(model)}
    assert cast == {f"{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    assert model[1].running_mean.dtype == torch.float32  # buffers are not parameters


def test_a_target_without_parameters_is_an_error():
    model = tiny_convnet()
    cfg = parse_config(CastConfig, {"targets": ["pool"]}, owner="quant.cast")
    with pytest.raises(NoMatchingModulesError, match="own no floating parameter"):
        apply_cast(model, cfg, Context())
