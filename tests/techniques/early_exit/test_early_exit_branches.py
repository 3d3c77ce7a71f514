"""early_exit.branches on real data: calibration meets its target, batched = batch 1,
save -> load, joint training, and every user error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import (
    ConfigError,
    DataError,
    NoMatchingModulesError,
    UnsupportedModuleError,
)
from modelpress.registry import get_technique
from modelpress.techniques.early_exit import EarlyExitModel, exit_statistics
from modelpress.techniques.early_exit.heads import entropy
from modelpress.techniques.early_exit.model import exit_outputs
from modelpress.testing import tiny_convnet

NAME = "early_exit.branches"


def early_exit(model, data, epochs=5, lr=2e-3, seed=0, **params):
    recipe = [mp.Stage.of(NAME, **params), mp.Stage.of("train", epochs=epochs, lr=lr)]
    return mp.compress(model, recipe, data=data, seed=seed, latency_runs=0)


def apply(model, data, **params):
    stage = mp.Stage.of(NAME, **params)
    ctx = Context(data=data, example_inputs=data.test.tensors[0][:1])
    return get_technique(NAME).apply(model, stage.config, ctx)


@pytest.fixture(scope="module")
def two_exits(trained):
    """The digits MLP with exits after relu1 and relu2, trained jointly and calibrated."""
    model, bundle = trained
    return early_exit(copy.deepcopy(model), bundle, exits=["relu1", "relu2"])


def test_calibrated_exits_meet_the_target_on_val_exactly_and_on_test_closely(two_exits, digits):
    learned = two_exits.stages[-1].learned
    model = two_exits.model
    val = digits.with_validation(0.1, seed=0).loader("val", 64)
    stats = exit_statistics(model, val)
    assert stats["accuracy"] >= learned["target_accuracy"]  # the target: final exit's accuracy
    assert stats["accuracy"] == learned["cascade_accuracy"]
    assert stats["exit_fractions"] == pytest.approx(learned["exit_fractions"], abs=1e-6)
    assert stats["exit_fractions"][0] > 0.3  # most samples really leave early
    # the test split was never seen: the cascade stays within 2 points of the final output
    test = digits.loader("test", 128)
    final_only = copy.deepcopy(model)
    final_only.set_thresholds([None, None])
    cascade, alone = exit_statistics(model, test), exit_statistics(final_only, test)
    assert alone["exit_fractions"][-1] == 1.0
    assert cascade["accuracy"] >= alone["accuracy"] - 0.02


def test_absolute_target_accuracy_is_met_with_more_early_exits(trained, digits):
    model = copy.deepcopy(trained[0])
    result = early_exit(model, digits, exits=["relu1"], target_accuracy=0.9)
    learned = result.stages[-1].learned
    assert learned["target_met"] and learned["target_accuracy"] == 0.9
    val = digits.with_validation(0.1, seed=0).loader("val", 256)
    stats = exit_statistics(result.model, val)
    assert stats["accuracy"] >= 0.9 and stats["exit_fractions"][0] > 0.8


def _one_by_one(model, x):
    outs, used = [], []
    for row in x.split(1):
        outs.append(model(row))
        used.append(model.last_exit_index)
    return torch.cat(outs), torch.cat(used)


@torch.no_grad()
def test_batched_early_exit_equals_batch_one(two_exits, digits):
    model = two_exits.model.eval()
    x = digits.test.tensors[0][:200]
    batched = model(x)
    used = model.last_exit_index
    single, single_used = _one_by_one(model, x)
    assert sorted(set(used.tolist())) == [0, 1, 2]  # every exit takes some samples
    assert torch.equal(used, single_used)
    assert torch.equal(batched.argmax(1), single.argmax(1))
    assert torch.allclose(batched, single, atol=1e-5)


def test_conv_features_exit_and_batching_on_a_convnet(digits):
    result = early_exit(tiny_convnet(), digits, epochs=4, lr=1e-2, exits=["conv1"], hidden=16,
                        max_accuracy_drop=0.05)  # fmt: skip
    model = result.model.eval()
    assert model.heads[0].fc.in_features == 16 and model.heads[0].hidden.in_features == 8 * 4
    x = digits.test.tensors[0][:120]
    with torch.no_grad():
        batched, used = model(x), model.last_exit_index
        single, single_used = _one_by_one(model, x)
    assert 0 < int((used == 0).sum()) < len(x)
    assert torch.equal(used, single_used) and torch.equal(batched.argmax(1), single.argmax(1))


@torch.no_grad()
def test_save_load_keeps_exits_heads_and_thresholds(two_exits, digits, tmp_path):
    model = two_exits.model.eval()
    loaded = mp.load(two_exits.save(tmp_path / "ee"))
    assert isinstance(loaded, EarlyExitModel)
    assert loaded.exit_names == ["relu1", "relu2"] and loaded.criterion == "entropy"
    assert loaded.threshold_values() == model.threshold_values()
    assert all(v is not None for v in loaded.threshold_values())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = digits.test.tensors[0]
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.last_exit_index, model.last_exit_index)


def test_train_mode_returns_the_final_output_and_keeps_every_exit(two_exits, digits):
    model = copy.deepcopy(two_exits.model).train()
    x = digits.test.tensors[0][:16]
    out = model(x)
    assert torch.equal(out, model.backbone(x))
    assert [tuple(z.shape) for z in model.exit_logits] == [(16, 10), (16, 10)]
    assert model.exit_logits[0].requires_grad


@pytest.mark.parametrize("distill", [False, True])
def test_frozen_backbone_trains_the_heads_only(mlp, digits, distill):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    result = early_exit(mlp, digits, exits=["relu2"], freeze_backbone=True,
                        distill_from_final=distill, temperature=3.0)  # fmt: skip
    model = result.model
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after training
    x, y = digits.test.tensors
    head, final = exit_outputs(model, x)
    assert (head.argmax(1) == y).double().mean() > 0.85  # from 10% at initialisation
    assert torch.equal(final, mlp.eval()(x))


def test_deepcopy_rebinds_the_hooks_to_the_copy(two_exits, digits):
    model = two_exits.model.eval()
    clone = copy.deepcopy(model)
    clone.set_thresholds([None, None])
    x = digits.test.tensors[0][:50]
    with torch.no_grad():
        clone(x), model(x)
    assert (clone.last_exit_index == 2).all() and (model.last_exit_index < 2).any()


def test_fixed_thresholds_need_no_bundle(mlp, digits):
    loader = digits.loader("train", 64)
    recipe = [mp.Stage.of(NAME, exits=["relu1"], thresholds=[0.3]), mp.Stage.of("train")]
    result = mp.compress(mlp, recipe, data=loader, latency_runs=0)
    assert result.model.threshold_values() == pytest.approx([0.3])
    assert result.stages[-1].learned["thresholds"] == pytest.approx([0.3])


# ---------------------------------------------------------------------------- errors


def _no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_unknown_exit_module(mlp, digits):
    with pytest.raises(NoMatchingModulesError, match=r"exit 'relu9' is not a module of the"):
        apply(mlp, digits, exits=["relu9"])
    assert _no_hooks(mlp)


def test_exit_must_come_before_the_output(mlp, digits):
    with pytest.raises(ConfigError, match=r"exit 'fc3' is not before the model's output"):
        apply(mlp, digits, exits=["relu1", "fc3"])
    assert _no_hooks(mlp) and digits.val is None


def test_exits_must_be_in_forward_order(mlp, digits):
    with pytest.raises(ConfigError, match=r"in forward order: \['relu1', 'relu2'\]"):
        apply(mlp, digits, exits=["relu2", "relu1"])


def test_an_exit_must_run_once(digits):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), relu, nn.Linear(32, 32), relu,
                          nn.Linear(32, 10))  # fmt: skip
    with pytest.raises(UnsupportedModuleError, match=r"^2: runs 2 times per forward"):
        apply(model, digits, exits=["2"])
    assert _no_hooks(model)


def test_raw_batches_cannot_be_calibrated_on(mlp, digits):
    recipe = [mp.Stage.of(NAME, exits=["relu1"]), mp.Stage.of("train")]
    with pytest.raises(DataError, match=r"needs the data as a spec .* or a DataBundle"):
        mp.compress(mlp, recipe, data=digits.loader("train", 64), latency_runs=0)


def test_exits_are_applied_once(two_exits, digits):
    with pytest.raises(ConfigError, match=r"already has exits"):
        apply(copy.deepcopy(two_exits.model), digits, exits=["backbone.relu1"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"exits": ["relu1"], "criterion": "max_prob", "thresholds": [1.5]},
         r"threshold 1.5 is not a probability in \[0, 1\]"),
        ({"exits": ["relu1"], "thresholds": [-0.1]}, r"threshold -0.1 is not an entropy >= 0"),
        ({"exits": ["relu1"], "thresholds": [0.1, 0.2]}, r"one value per exit \(1\); got 2"),
        ({"exits": ["relu1"], "thresholds": [0.1], "target_accuracy": 0.9},
         r"either 'thresholds' or 'target_accuracy'"),
        ({"exits": ["relu1"], "weights": [1.0]}, r"'weights' needs 2 values"),
        ({"exits": ["relu1"], "weights": [0.0, 0.0]}, r"not all 0"),
        ({"exits": []}, r"The 'exits' parameter of early_exit.branches must be a list"),
        ({"exits": ["relu1", "relu1"]}, r"an exit is named twice"),
    ],
)  # fmt: skip
def test_bad_parameters_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        mp.Stage.of(NAME, **params)


def test_bad_thresholds_on_the_model_change_nothing(two_exits):
    model = copy.deepcopy(two_exits.model)
    before = model.threshold_values()
    for bad in ([float("nan"), 0.1], [0.1], [0.1, -1.0]):
        with pytest.raises(ConfigError, match=r"threshold|thresholds given"):
            model.set_thresholds(bad)
    assert model.threshold_values() == before


class _TokenNet(nn.Module):
    """(B, T, 8) tokens -> Linear -> ReLU -> mean over tokens -> Linear: 3-D exit features."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.act, self.out = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.embed(x)).mean(1))


@torch.no_grad()
def test_token_features_exit_batched_like_batch_one():
    torch.manual_seed(0)
    x = torch.randn(64, 6, 8)
    stage = mp.Stage.of(NAME, exits=["act"], thresholds=[0.5])
    model = get_technique(NAME).apply(_TokenNet(), stage.config, Context(example_inputs=x[:1]))
    assert model.heads[0].rank == 3 and model.heads[0].fc.in_features == 16
    model.eval()
    head_logits = exit_outputs(model, x)[0]
    model.set_thresholds([float(entropy(head_logits).median())])  # half the samples leave
    batched, used = model(x), model.last_exit_index
    single, single_used = _one_by_one(model, x)
    assert 0 < int((used == 0).sum()) < len(x)  # a mix of exits
    assert torch.equal(used, single_used) and torch.allclose(batched, single, atol=1e-6)
    assert torch.equal(batched[used == 1], model.backbone(x[used == 1]))
