"""quant.binary: XNOR-Net's scale and gradient, two values per channel, one bit per weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.artifact import save_artifact
from modelpress.context import Context
from modelpress.errors import UnsupportedModuleError
from modelpress.measure import directory_bytes
from modelpress.measure.size import bits_per_weight
from modelpress.pipeline import compress
from modelpress.recipe import Stage
from modelpress.techniques.quantization.binary import BinaryConfig, apply_binary, binarize

TRAIN = Stage.of("train", epochs=1, lr=1e-3)


def test_binarize_matches_xnor_net_on_a_hand_example():
    w = torch.tensor([[0.5, -1.5, 0.25, -0.25]], requires_grad=True)
    out, alpha = binarize(w)
    assert alpha.tolist() == [0.625]  # ||W||_1 / n
    assert out.tolist() == [[0.625, -0.625, 0.625, -0.625]]
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (out * upstream).sum().backward()
    # alpha * g_i * 1_{|w_i| <= 1}  +  sign(w_i) / n * sum_j g_j sign(w_j)   (sum = -2)
    assert torch.allclose(w.grad, torch.tensor([[0.125, 0.5, 1.375, 3.0]]))


def test_trained_layers_hold_two_values_per_channel_and_load_exactly(mlp, digits, tmp_path):
    result = compress(mlp, [Stage.of("quant.binary", ignore=["fc3"]), TRAIN], data=digits)
    model = result.model.eval()
    # measured 94.7 % (fp32 96.1 %; all three layers binary: 93.3 %)
    assert result.final["eval"]["accuracy"] >= result.baseline["eval"]["accuracy"] - 0.03
    for layer in (model.fc1, model.fc2):
        w = layer.weight.detach()
        alpha = w.abs().amax(dim=1, keepdim=True)
        assert torch.equal(w.abs(), alpha.expand_as(w))  # every weight is +-alpha_c
        assert torch.equal(alpha[:, 0], alpha[:, 0].half().float())  # alpha as stored (fp16)
    loaded = mp.load(result.save(tmp_path / "a"))
    x = digits.test.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_one_bit_per_weight_on_disk(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False))
    apply_binary(model, BinaryConfig(), Context())
    path = save_artifact(model, tmp_path / "a")
    bpw = bits_per_weight(directory_bytes(path), 512 * 512)
    assert 1.0 < bpw < 1.1  # measured 1.053: 1 sign bit, a 16-bit alpha per 512 weights, manifest
    loaded = mp.load(path, model=nn.Sequential(nn.Linear(512, 512, bias=False)))
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_pruned_or_quantized_weights_are_refused(mlp, digits):
    with pytest.raises(UnsupportedModuleError, match="fc1: pruned by an earlier stage"):
        compress(mlp, [Stage.of("prune.magnitude"), Stage.of("quant.binary"), TRAIN], data=digits)
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized by an earlier"):
        compress(mlp, [Stage.of("quant.ternary"), Stage.of("quant.binary"), TRAIN], data=digits)


@pytest.mark.parametrize("later", ["quant.rtn", "quant.hqq", "quant.int8_dynamic"])
def test_later_quantizers_refuse_binary_weights(mlp, digits, later):
    stages = [Stage.of("quant.binary"), Stage.of(later), TRAIN]
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized by an earlier"):
        compress(mlp, stages, data=digits)
