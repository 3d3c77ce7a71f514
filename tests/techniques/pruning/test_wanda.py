"""prune.wanda: the mask is the per-row top-k of |W| x ||X||, exact N:M patterns, config and
module errors with nothing changed, earlier masks kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.registry import get_technique
from modelpress.techniques.pruning.mask import Mask
from modelpress.testing import tiny_convnet


def apply(name, model, batches, **params):
    stage = mp.Stage.of(name, **params)
    ctx = Context(batches=batches)
    return get_technique(name).apply(model, stage.config, ctx), ctx


def linear_and_inputs(rows=8, cols=16, n=64):
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows)
    x = torch.randn(n, cols) * torch.logspace(-1, 1, cols)  # inputs of very different size
    return layer, x


def one_layer(layer):
    return nn.Sequential(layer)  # a model whose layer "0" can be selected


def test_mask_is_the_brute_force_top_k_of_weight_times_input_norm():
    layer, x = linear_and_inputs()
    weight = layer.weight.detach().clone()
    apply("prune.wanda", one_layer(layer), [x[:32], x[32:]], sparsity=0.25, batch_size=32)
    scores = weight.abs() * x.norm(dim=0)  # |W_ij| * ||X_j||
    for i in range(weight.shape[0]):
        lowest = set(scores[i].argsort()[:4].tolist())  # 25% of 16 per row
        assert set((layer.weight[i] == 0).nonzero().flatten().tolist()) == lowest
    assert torch.equal(layer.weight[layer.weight != 0], weight[layer.weight != 0])  # no update


def test_an_input_that_is_always_zero_loses_its_weights_first():
    layer, x = linear_and_inputs()
    x[:, 0] = 0.0
    with torch.no_grad():
        layer.weight[:, 0] = 100.0  # the largest weights, but they never matter
    apply("prune.wanda", one_layer(layer), [x], sparsity=0.1)
    assert (layer.weight[:, 0] == 0).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_exact_nm_pattern_on_linear(n, m):
    layer, x = linear_and_inputs()
    _, ctx = apply("prune.wanda", one_layer(layer), [x], n=n, m=m)
    mask = layer.parametrizations.weight[0].mask
    assert (mask.reshape(-1, m).sum(1) == n).all()
    assert ctx.reports["sparsity"] == {"0": pytest.approx(1 - n / m)}


def test_nm_on_a_convnet_groups_input_channels(digits):
    model = tiny_convnet()
    apply("prune.wanda", model, [digits.train.tensors[0][:32]], n=2, m=4, ignore=["conv1"])
    mask = model.conv2.parametrizations.weight[0].mask  # (16, 8, 3, 3)
    assert (mask.movedim(1, -1).reshape(-1, 4).sum(1) == 2).all()


def test_config_checks_n_and_m():
    with pytest.raises(ConfigError, match=r"'n' and 'm' must be set together"):
        mp.Stage.of("prune.wanda", n=2)
    with pytest.raises(ConfigError, match=r"'n' \(4\) must be smaller than 'm' \(4\)"):
        mp.Stage.of("prune.wanda", n=4, m=4)
    with pytest.raises(ConfigError, match=r"set either 'sparsity' or 'n' and 'm', not both"):
        mp.Stage.of("prune.wanda", sparsity=0.5, n=2, m=4)


def test_grouped_conv_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"^1: groups=2 is not supported by prune"):
        apply("prune.wanda", model, [torch.randn(2, 4, 8, 8)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(layer, "parametrizations") for layer in model)


def test_indivisible_inputs_are_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    with pytest.raises(UnsupportedModuleError, match=r"^1: 6 inputs per output are not a multiple"):
        apply("prune.wanda", model, [torch.randn(4, 8)], n=2, m=4)
    assert not any(hasattr(layer, "parametrizations") for layer in model)


def test_weights_pruned_before_stay_pruned(mlp, digits):
    x = [digits.train.tensors[0][:64]]
    model, _ = apply("prune.magnitude", mlp, x, sparsity=0.7, scope="layer")
    before = model.fc2.weight == 0
    model, _ = apply("prune.wanda", model, x, sparsity=0.5)
    assert ((model.fc2.weight == 0) | ~before).all()
    assert [type(p) for p in model.fc2.parametrizations.weight] == [Mask]
