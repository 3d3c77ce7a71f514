"""quant.ternary: TWN's threshold and scale, three values per channel, two bits per weight."""

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
from modelpress.parametrizations import find_parametrization
from modelpress.pipeline import compress
from modelpress.recipe import Stage
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.quantization.ternary import TernaryConfig, apply_ternary, ternarize

TRAIN = Stage.of("train", epochs=1, lr=1e-3)


def test_ternarize_matches_twn_on_a_hand_example():
    w = torch.tensor([[0.9, -0.05, 0.3, -0.6]], requires_grad=True)
    # Delta = 0.7 * mean|W| = 0.7 * 0.4625 = 0.32375: 0.9 and -0.6 survive, alpha = 0.75
    out, alpha = ternarize(w, 0.7)
    assert alpha.tolist() == [0.75]
    assert out.tolist() == [[0.75, 0.0, 0.0, -0.75]]
    (out * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert w.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]  # straight through


def test_trained_layers_hold_three_values_per_channel_and_load_exactly(mlp, digits, tmp_path):
    stages = [Stage.of("prune.magnitude", sparsity=0.5), Stage.of("quant.ternary"), TRAIN]
    result = compress(mlp, stages, data=digits)
    model = result.model.eval()
    # measured 93.3 % (fp32 96.1 %; unpruned, all layers: 93.1 %; fc1, fc3 kept: 96.4 %)
    assert result.final["eval"]["accuracy"] >= result.baseline["eval"]["accuracy"] - 0.05
    for layer in (model.fc1, model.fc2, model.fc3):
        w = layer.weight.detach()
        alpha = w.abs().amax(dim=1, keepdim=True)
        assert torch.all((w == 0) | (w.abs() == alpha))  # every weight is 0 or +-alpha_c
        pruned = ~find_parametrization(layer, "weight", Mask).mask
        assert torch.all(w[pruned] == 0)  # pruned weights stay zero
    loaded = mp.load(result.save(tmp_path / "a"))
    x = digits.test.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_two_bits_per_weight_on_disk(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False))
    apply_ternary(model, TernaryConfig(granularity="tensor"), Context())
    assert torch.unique(model[0].weight.detach()).numel() == 3
    path = save_artifact(model, tmp_path / "a")
    bpw = bits_per_weight(directory_bytes(path), 512 * 512)
    assert 2.0 < bpw < 2.1  # measured 2.02; its 35 % zeros would not pay for an index
    loaded = mp.load(path, model=nn.Sequential(nn.Linear(512, 512, bias=False)))
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_quantized_weights_are_refused(mlp, digits):
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized by an earlier"):
        compress(mlp, [Stage.of("quant.binary"), Stage.of("quant.ternary"), TRAIN], data=digits)
