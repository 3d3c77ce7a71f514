"""quant.rtn on models: grids per config, one quantizer per weight, after pruning, data-free."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import UnsupportedModuleError
from modelpress.pipeline import compress
from modelpress.recipe import Stage
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant


@pytest.mark.parametrize(
    ("params", "groups"),
    [
        ({"bits": 8}, 128),
        ({"bits": 4, "group_size": 16}, 128 * 4),
        ({"bits": 3, "granularity": "tensor"}, 1),
    ],
)
def test_grid_granularity(mlp, digits, params, groups):
    result = compress(mlp, [Stage.of("quant.rtn", **params)], data=digits, latency_runs=0)
    fq = result.model.fc1.parametrizations.weight[0]
    assert isinstance(fq, AffineFakeQuant) and fq.scale.numel() == groups
    levels = torch.unique(result.model.fc1.weight.detach()).numel()
    assert levels <= groups * 2 ** params["bits"]


def test_no_data_needed(mlp):
    x = torch.randn(3, 1, 8, 8)
    result = compress(mlp, "int8", example_inputs=x, latency_runs=0)
    # 8-bit codes, fp16 scales, fp32 biases and the manifest, on a 17k-parameter model
    assert result.baseline["bytes"] > 3 * result.final["bytes"]


def test_accuracy_holds_at_8_and_4_bits(mlp, digits):
    for stage, max_drop in (
        (Stage.of("quant.rtn", bits=8), 0.005),
        (Stage.of("quant.rtn", bits=4, group_size=16), 0.03),
    ):
        result = compress(mlp, [stage], data=digits, latency_runs=0)
        drop = result.baseline["eval"]["accuracy"] - result.final["eval"]["accuracy"]
        assert drop <= max_drop


def test_quantizing_twice_is_refused(mlp, digits):
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized"):
        compress(mlp, [Stage.of("quant.rtn"), Stage.of("quant.rtn")], data=digits, latency_runs=0)


def test_pruned_then_quantized_stays_sparse_and_small(mlp, digits):
    result = compress(mlp, "prune-finetune-int4", data=digits, latency_runs=0)
    pruned, quantized = result.stages[0].metrics, result.stages[2].metrics
    assert quantized["nonzeros"] <= pruned["nonzeros"]
    assert quantized["bytes"] < pruned["bytes"] / 1.5
