"""prune.magnitude: exact sparsity, global vs layer-wise, masks kept through training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.context import Context
from modelpress.pipeline import compress
from modelpress.recipe import Stage
from modelpress.registry import get_technique
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.pruning.unstructured import keep_mask


def prune(model, **params):
    stage = Stage.of("prune.magnitude", **params)
    ctx = Context()
    return get_technique(stage.technique).apply(model, stage.config, ctx), ctx


def test_keep_mask_keeps_the_largest_exactly():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert keep_mask(scores, 0.4).tolist() == [True, False, True, False, True]
    assert keep_mask(scores, 0.0).all()
    ties = torch.ones(10)
    assert int(keep_mask(ties, 0.3).sum()) == 7  # ties broken by position, count exact


def two_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        net[1].weight.mul_(10)  # layer 1 has much larger weights
    return net


def test_layer_scope_prunes_each_layer_to_the_target():
    net, ctx = prune(two_layers(), sparsity=0.6, scope="layer")
    for layer in net:
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.6)
    assert ctx.reports["sparsity"] == {"0": 0.6, "1": 0.6}


def test_global_scope_ranks_across_layers():
    net, _ = prune(two_layers(), sparsity=0.5, scope="global")
    zero = [float((layer.weight == 0).float().mean()) for layer in net]
    assert sum(zero) / 2 == pytest.approx(0.5)
    assert zero[0] > 0.8 and zero[1] < 0.2  # the small-weight layer takes the cuts


def test_layer_sparsity_override_and_ignore():
    net, _ = prune(two_layers(), sparsity=0.5, layer_sparsity={"0": 0.2}, ignore=["1"])
    assert float((net[0].weight == 0).float().mean()) == pytest.approx(0.2)
    assert not (net[1].weight == 0).any()


def test_pruning_again_never_revives_weights():
    net, _ = prune(two_layers(), sparsity=0.8, scope="layer")
    before = net[0].weight != 0
    net, _ = prune(net, sparsity=0.3, scope="layer")
    assert not ((net[0].weight != 0) & ~before).any()
    assert len(list(net[0].parametrizations.weight)) == 1  # the mask was updated, not stacked
    assert isinstance(net[0].parametrizations.weight[0], Mask)


def test_masks_survive_fine_tuning(mlp, digits):
    result = compress(
        mlp,
        [Stage.of("prune.magnitude", sparsity=0.9), Stage.of("train", max_steps=20, lr=1e-2)],
        data=digits,
        latency_runs=0,
    )
    pruned = result.stages[0].metrics["nonzeros"]
    assert result.stages[1].metrics["nonzeros"] == pruned
    total = result.baseline["params"]
    biases = sum(m.bias.numel() for m in result.model.modules() if isinstance(m, nn.Linear))
    assert pruned == pytest.approx(biases + 0.1 * (total - biases), abs=2)


def test_bad_layer_sparsity_is_rejected():
    from modelpress.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"'layer_sparsity' parameter of prune.magnitude must be a mapping\. Got \{'0': 1\.0\} instead \(layer_sparsity\['0'\] = 1\.0 is not in \[0, 1\)\)\.",
    ):
        prune(two_layers(), layer_sparsity={"0": 1.0})
