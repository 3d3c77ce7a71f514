"""prune.nm, prune.random and prune.gradual: exact patterns, seeds, the cubic schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.registry import get_technique
from modelpress.techniques.pruning.gradual import cubic_sparsity
from modelpress.techniques.pruning.nm import nm_mask


def apply(name, model, seed=0, **params):
    stage = mp.Stage.of(name, **params)
    return get_technique(name).apply(model, stage.config, Context(seed=seed))


def test_nm_mask_keeps_n_largest_per_group_of_inputs():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_nm_on_conv_groups_along_input_channels():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 3, 3)
    mask = nm_mask(w.abs(), 2, 4)
    per_group = mask.movedim(1, -1).reshape(-1, 4).sum(1)  # (out * kh * kw * in/4)
    assert (per_group == 2).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_pattern_on_a_model(mlp, n, m):
    model = apply("prune.nm", mlp, n=n, m=m)
    for layer in (model.fc1, model.fc2):
        kept = (layer.weight != 0).reshape(-1, m).sum(1)
        assert (kept <= n).all() and float(kept.float().mean()) > n - 0.01


def test_nm_refuses_indivisible_inputs_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(
        UnsupportedModuleError, match=r"^2: 2 inputs per output are not a multiple of m=4"
    ):
        apply("prune.nm", model, n=2, m=4)
    assert not any(hasattr(layer, "parametrizations") for layer in model)


def test_nm_config_checks_n_below_m():
    with pytest.raises(ConfigError, match=r"'n' \(4\) must be smaller than 'm' \(4\)"):
        mp.Stage.of("prune.nm", n=4, m=4)


def test_random_pruning_is_exact_and_seeded(mlp):
    import copy

    a = apply("prune.random", copy.deepcopy(mlp), seed=1, sparsity=0.6, scope="layer")
    b = apply("prune.random", copy.deepcopy(mlp), seed=1, sparsity=0.6, scope="layer")
    c = apply("prune.random", copy.deepcopy(mlp), seed=2, sparsity=0.6, scope="layer")
    assert float((a.fc1.weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)
    assert torch.equal(a.fc1.weight, b.fc1.weight) and not torch.equal(a.fc1.weight, c.fc1.weight)


def test_random_after_magnitude_counts_the_pruned_weights(mlp):
    model = apply("prune.magnitude", mlp, sparsity=0.5, scope="layer")
    model = apply("prune.random", model, sparsity=0.7, scope="layer")
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.7, abs=1e-3)


def test_cubic_schedule():
    assert cubic_sparsity(0, 0, 100, 0.0, 0.8) == 0.0
    assert cubic_sparsity(100, 0, 100, 0.0, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(50, 0, 100, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(500, 0, 100, 0.0, 0.8) == pytest.approx(0.8)  # clamped after t1


def test_gradual_reaches_the_target_on_schedule(mlp, digits):
    recipe = [
        mp.Stage.of("prune.gradual", sparsity=0.8, scope="layer", frequency=5, end_fraction=0.5),
        mp.Stage.of("train", max_steps=40, epochs=5, lr=1e-3),
    ]
    result = mp.compress(mlp, recipe, data=digits, latency_runs=0)
    for layer in (result.model.fc1, result.model.fc2, result.model.fc3):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
    schedule = result.stages[1].learned["schedule"]
    steps, levels = zip(*schedule, strict=True)
    assert steps[0] == 0 and steps[-1] == 20 and list(levels) == sorted(levels)
    assert levels[-1] == 0.8 and result.stages[0].metrics["nonzeros"] == result.baseline["nonzeros"]
    assert result.stages[1].learned["sparsity"] == {"fc1": 0.8, "fc2": 0.8, "fc3": 0.8}


def test_gradual_to_2_of_4(mlp, digits):
    recipe = [
        mp.Stage.of("prune.gradual", n=2, m=4, frequency=4),
        mp.Stage.of("train", max_steps=24),
    ]
    result = mp.compress(mlp, recipe, data=digits, latency_runs=0)
    kept = (result.model.fc2.weight != 0).reshape(-1, 4).sum(1)
    assert (kept <= 2).all()


def test_gradual_needs_a_train_stage_after_it(mlp, digits):
    with pytest.raises(ConfigError, match=r"stage 1 \(prune.gradual\) acts during training"):
        mp.compress(mlp, [mp.Stage.of("prune.gradual"), mp.Stage.of("quant.rtn")], data=digits)
