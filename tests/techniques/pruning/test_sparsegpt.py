"""prune.sparsegpt: lower reconstruction error than magnitude pruning, better accuracy on a
trained MLP, exact row and N:M sparsity, dead inputs, updates written under earlier masks,
asymmetric calibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError
from modelpress.measure import accuracy
from modelpress.registry import get_technique
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.pruning.sparsegpt import sparsegpt_prune
from modelpress.techniques.pruning.unstructured import keep_mask
from modelpress.testing import tiny_convnet


def apply(name, model, data, **params):
    stage = mp.Stage.of(name, **params)
    ctx = Context(data=data) if isinstance(data, mp.DataBundle) else Context(batches=data)
    return get_technique(name).apply(model, stage.config, ctx), ctx


def correlated_inputs(n=512, cols=64, rank=8, seed=0):
    """Inputs ``(n, cols)`` mostly in a rank-``rank`` subspace, columns of unequal size."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return (low + 0.3 * torch.randn(n, cols, generator=g)) * torch.logspace(-0.5, 0.5, cols)


def reconstruction_error(weight, pruned, x):
    return float(((weight - pruned) @ x.T).norm())  # ||W X - W' X||


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstruction_error_is_well_below_magnitude_pruning(sparsity):
    x = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    hessian = 2 / len(x) * x.T @ x
    pruned, keep = sparsegpt_prune(weight, hessian, sparsity)
    magnitude = weight * torch.stack([keep_mask(row.abs(), sparsity) for row in weight])
    ratio = reconstruction_error(weight, pruned, x) / reconstruction_error(weight, magnitude, x)
    assert ratio < 0.3  # measured 0.13 at 50%, 0.16 at 70% (Wanda: 0.50, 0.55)
    assert (pruned[~keep] == 0).all() and (keep.sum(1) == round((1 - sparsity) * 64)).all()


def test_exact_per_row_sparsity_across_blocks():
    x = correlated_inputs(cols=40)
    weight = torch.randn(6, 40)
    _, keep = sparsegpt_prune(weight, x.T @ x, 0.3, blocksize=16)  # blocks 16, 16, 8
    assert (keep.sum(1) == 40 - 12).all()  # round(0.3 * 40) per row, not per block


def test_dead_inputs_get_zero_weights():
    x = correlated_inputs(cols=16)
    x[:, 3] = 0.0
    _, keep = sparsegpt_prune(torch.randn(4, 16), x.T @ x, 0.25)
    assert not keep[:, 3].any()


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_trained_mlp_keeps_more_accuracy_than_magnitude(trained, sparsity):
    model, digits = trained
    test = digits.loader("test", batch_size=512)
    magnitude, _ = apply("prune.magnitude", copy.deepcopy(model), digits, sparsity=sparsity)
    sparsegpt, _ = apply("prune.sparsegpt", copy.deepcopy(model), digits, sparsity=sparsity)
    acc_magnitude, acc_sparsegpt = accuracy(magnitude, test), accuracy(sparsegpt, test)
    # measured (dense 0.961): 50% 0.958 vs 0.956; 60% 0.958 vs 0.939 (global magnitude)
    assert acc_sparsegpt >= acc_magnitude
    assert acc_sparsegpt >= accuracy(model, test) - 0.02


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_exact_nm_pattern_on_linear_and_conv(digits, n, m):
    model = tiny_convnet()
    batches = [digits.train.tensors[0][:32]]
    _, ctx = apply("prune.sparsegpt", model, batches, n=n, m=m, ignore=["conv1"], blocksize=16)
    for layer in (model.conv2, model.fc):
        mask = layer.parametrizations.weight[0].mask
        assert (mask.movedim(1, -1).reshape(-1, m).sum(1) == n).all()
        assert (layer.weight[~mask] == 0).all()
    assert ctx.reports["sparsity"] == {"conv2": 1 - n / m, "fc": 1 - n / m}


def test_blocksize_must_hold_whole_groups():
    with pytest.raises(ConfigError, match=r"'blocksize' \(6\) must be a multiple of 'm' \(4\)"):
        mp.Stage.of("prune.sparsegpt", n=2, m=4, blocksize=6)


def test_update_goes_under_the_earlier_mask(mlp, digits):
    x = [digits.train.tensors[0][:64]]
    model, _ = apply("prune.magnitude", mlp, x, sparsity=0.6, scope="layer")
    earlier = model.fc2.weight == 0
    original = model.fc2.parametrizations.weight.original.detach().clone()
    model, ctx = apply("prune.sparsegpt", model, x, sparsity=0.5)
    assert ((model.fc2.weight == 0) | ~earlier).all()  # nothing revived
    assert ctx.reports["sparsity"]["fc2"] == pytest.approx(0.6, abs=0.01)
    assert [type(p) for p in model.fc2.parametrizations.weight] == [Mask]
    kept = model.fc2.weight != 0
    assert not torch.equal(model.fc2.parametrizations.weight.original[kept], original[kept])


def test_a_layer_without_a_parametrization_gets_its_weight_updated():
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 4), correlated_inputs(n=64, cols=16)
    before = layer.weight.detach().clone()
    apply("prune.sparsegpt", nn.Sequential(layer), [x], sparsity=0.5)
    kept = layer.weight != 0
    assert int(kept.sum()) == 32 and not torch.equal(layer.weight[kept], before[kept])


def test_asymmetric_calibration_undoes_the_drift_of_earlier_layers():
    torch.manual_seed(0)
    dense = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.Tanh())])
    x = correlated_inputs(2048, 32)
    calib, held_out = x[:1024], x[1024:]
    errors = {}
    for asymmetric in (False, True):
        pruned, _ = apply("prune.sparsegpt", copy.deepcopy(dense), [calib[:512], calib[512:]],
                          sparsity=0.6, n_samples=1024, sequential=True, asymmetric=asymmetric)  # fmt: skip
        with torch.no_grad():
            errors[asymmetric] = float(((pruned(held_out) - dense(held_out)) ** 2).mean())
    assert errors[True] < 0.6 * errors[False]  # measured 0.39 (0.43-0.44 at other seeds)
