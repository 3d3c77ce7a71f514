"""quant.mixed on models: budgets kept to the byte, better than uniform bits, exact reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.artifact import load_artifact
from modelpress.artifact.save import encode_model
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError
from modelpress.parametrizations import add_parametrization, parametrized_tensors
from modelpress.pipeline import compress
from modelpress.recipe import Stage
from modelpress.report.inspect import tensor_rows
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant
from modelpress.techniques.quantization.mixed import MixedConfig, apply_mixed, sensitivity
from modelpress.techniques.quantization.mixed.budget import fp32_bytes
from modelpress.techniques.quantization.mixed.replay import BlockReplay
from modelpress.techniques.quantization.mixed.sensitivity import (
    mean_kl,
    output_rows,
    relative_mse,
    replaced_weight,
)

GRID = {"group_size": 16, "n_samples": 64}


def payload_bytes(model: nn.Module) -> int:
    """Bytes of every payload tensor the artifact of ``model`` writes."""
    return sum(t.numel() * t.element_size() for t in encode_model(model)[1].values())


def held_out_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """Relative output MSE of ``model`` against ``reference`` on ``x``."""
    with torch.no_grad():
        ref, out = reference(x), model(x)
    return float((out - ref).square().sum() / ref.square().sum())


def agreement(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """Fraction of samples where ``model`` and ``reference`` predict the same class."""
    with torch.no_grad():
        return float((model(x).argmax(1) == reference(x).argmax(1)).float().mean())


def mixed(model, digits, **params):
    return compress(model, [Stage.of("quant.mixed", **GRID, **params)], data=digits, latency_runs=0)


def test_beats_uniform_rtn_at_the_same_budget(mlp, digits):
    result = mixed(mlp, digits, ratio=6)
    learned = result.stages[0].learned
    budget = learned["budget_bytes"]
    assert budget == fp32_bytes(mlp) // 6 == 17226 * 4 // 6
    # the prediction is the artifact's payload to the byte, and within the budget
    assert learned["payload_bytes"] == payload_bytes(result.model) <= budget
    uniform = {
        bits: compress(mlp, [Stage.of("quant.rtn", bits=bits, group_size=16)], latency_runs=0)
        for bits in (2, 3, 4)
    }
    fits = max(b for b, r in uniform.items() if payload_bytes(r.model) <= budget)
    assert fits == 3 and payload_bytes(uniform[4].model) > budget
    x = digits.test.tensors[0]  # held out: the sensitivity pass saw training samples only
    err_mixed = held_out_error(result.model, mlp, x)
    err_uniform = held_out_error(uniform[fits].model, mlp, x)
    assert err_mixed < err_uniform / 5  # measured: 4.9e-4 vs 7.6e-3
    # and it agrees with the fp32 model's top-1 more often (measured: 99.2 % vs 98.3 %)
    assert agreement(result.model, mlp, x) > agreement(uniform[fits].model, mlp, x)


def test_tighter_budget_gives_fewer_bits(mlp, digits):
    numel = {n: m.weight.numel() for n, m in mlp.named_modules() if isinstance(m, nn.Linear)}
    mean_bits = []
    for ratio in (4, 6, 8):
        learned = mixed(mlp, digits, ratio=ratio).stages[0].learned
        assert learned["payload_bytes"] <= learned["budget_bytes"]
        bits = learned["bits"]
        mean_bits.append(sum(bits[n] * numel[n] for n in numel) / sum(numel.values()))
    assert mean_bits[0] > mean_bits[1] > mean_bits[2]


def test_sensitivity_is_the_output_error_of_that_layer_alone(mlp, digits):
    learned = mixed(mlp, digits, ratio=6).stages[0].learned
    batches = digits.calibration(64, seed=0).split(32)  # what the stage calibrated on
    alone = compress(
        mlp, [Stage.of("quant.rtn", bits=2, group_size=16, targets=["fc3"])], latency_runs=0
    ).model
    with torch.no_grad():
        ref = [mlp(b) for b in batches]
        out = [alone(b) for b in batches]
    expected = relative_mse(ref, out)
    assert learned["sensitivity"]["fc3"]["2"] == pytest.approx(expected, rel=1e-5)
    for row in learned["sensitivity"].values():  # more bits, less error, for every layer
        assert row["2"] > row["3"] > row["4"] > row["8"]


def test_save_load_is_exact_and_stores_the_chosen_bits(mlp, digits, tmp_path):
    result = mixed(mlp, digits, budget_bytes=10_000, metric="kl")
    path = result.save(tmp_path / "mixed")
    x = digits.test.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(load_artifact(path)(x), result.model(x))
    codecs = {r["name"]: r["codec"] for r in tensor_rows(path)}
    for name, bits in result.stages[0].learned["bits"].items():
        assert codecs[f"{name}.weight"] == f"int{bits} asym g16"


def test_infeasible_budget_says_the_smallest_size_and_changes_nothing(mlp, digits):
    ctx = Context(data=digits)
    cfg = parse_config(MixedConfig, {"budget_bytes": 5000, **GRID}, owner="quant.mixed")
    with pytest.raises(
        ConfigError,
        match=r"the budget of 5,000 bytes \(budget_bytes\) is below the smallest reachable "
        r"payload, 7,458 bytes \(every selected layer at its lowest width, 808 for the rest\)",
    ):
        apply_mixed(mlp, cfg, ctx)
    assert not parametrized_tensors(mlp)
    cfg = parse_config(MixedConfig, {"ratio": 12, **GRID}, owner="quant.mixed")
    with pytest.raises(ConfigError, match=r"5,742 bytes \(ratio 12\)"):
        apply_mixed(mlp, cfg, ctx)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "give exactly one of 'budget_bytes' and 'ratio'"),
        ({"ratio": 4, "budget_bytes": 10**5}, "give exactly one of 'budget_bytes' and 'ratio'"),
        ({"ratio": 4, "candidate_bits": [4, 4]}, r"Got \[4, 4\] instead \(a width is repeated\)"),
        ({"ratio": 4, "candidate_bits": [9]}, r"each width must be in \[2, 8\]; got 9"),
        ({"ratio": 4, "candidate_bits": []}, "give at least one width"),
        ({"ratio": 4, "granularity": "group"}, "granularity 'group' needs 'group_size'"),
        ({"ratio": 0.5}, r"The 'ratio' parameter of quant.mixed must be a float in \(1, 32\]"),
        ({"ratio": 4, "metric": "l1"}, "The 'metric' parameter of quant.mixed must be one of"),
    ],
)
def test_bad_config_is_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(MixedConfig, params, owner="quant.mixed")


def test_no_calibration_data_is_a_data_error(mlp):
    with pytest.raises(DataError, match="needs calibration data"):
        compress(mlp, [Stage.of("quant.mixed", ratio=4)], latency_runs=0)


def test_pruned_weights_are_priced_by_their_sparse_layout(mlp, digits):
    recipe = [
        Stage.of("prune.magnitude", sparsity=0.5),
        Stage.of("quant.mixed", ratio=8, **GRID),
    ]
    result = compress(mlp, recipe, data=digits, latency_runs=0)
    learned = result.stages[1].learned
    assert learned["payload_bytes"] == payload_bytes(result.model) <= learned["budget_bytes"]
    dense_mixed = mixed(mlp, digits, ratio=8).stages[0].learned
    # the sparse layout makes every width cheaper, so the same budget buys more bits
    assert sum(learned["bits"].values()) > sum(dense_mixed["bits"].values())
    pruned = ~result.model.fc1.parametrizations.weight[0].mask
    assert (result.model.fc1.weight[pruned] == 0).all()  # pruned weights stay exactly zero


def test_gptq_method_keeps_the_budget_and_lowers_the_error(mlp, digits):
    rtn = mixed(mlp, digits, ratio=6)
    gptq = mixed(mlp, digits, ratio=6, method="gptq")
    learned = gptq.stages[0].learned
    assert learned["bits"] == rtn.stages[0].learned["bits"]  # the same sensitivities
    assert payload_bytes(gptq.model) <= learned["payload_bytes"] <= learned["budget_bytes"]
    x = digits.test.tensors[0]
    assert held_out_error(gptq.model, mlp, x) < held_out_error(rtn.model, mlp, x) / 2


class EmbedNet(nn.Module):
    """Token ids ``(B, T)`` -> an Embedding -> a Linear -> mean over tokens ``(B, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x)).mean(1)


def test_gptq_method_rounds_embeddings():
    torch.manual_seed(0)
    net = EmbedNet()
    data = [torch.randint(0, 64, (8, 12)) for _ in range(4)]
    stage = Stage.of("quant.mixed", ratio=5, method="gptq", n_samples=32, batch_size=8)
    result = compress(net, [stage], data=data, latency_runs=0)
    learned = result.stages[0].learned
    assert set(learned["bits"]) == {"emb", "fc"}
    for module in (result.model.emb, result.model.fc):
        assert isinstance(module.parametrizations.weight[-1], AffineFakeQuant)
    assert payload_bytes(result.model) <= learned["budget_bytes"]


def test_metrics_and_rows():
    ref = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    out = [torch.tensor([[1.0, 1.0], [0.0, 2.0]])]
    assert relative_mse(ref, out) == pytest.approx(1 / 5)
    assert mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(ref[0], -1)
    kl = (p * (p.log() - torch.log_softmax(out[0], -1))).sum(-1).mean()
    assert mean_kl(ref, out) == pytest.approx(float(kl))
    hidden = torch.arange(12.0).reshape(2, 3, 2)  # (B, T, C)
    batch = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    assert output_rows(hidden, batch).tolist() == [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
    assert output_rows(hidden, torch.zeros(2, 3)).shape == (6, 2)


def test_replaced_weight_restores_plain_and_parametrized_weights(mlp):
    model = copy.deepcopy(mlp)
    x = torch.randn(4, 1, 8, 8)
    value = torch.zeros_like(model.fc3.weight)
    with torch.no_grad():
        before = model(x)
        for module in (model.fc3, model.fc2):
            with replaced_weight(module, torch.zeros_like(module.weight)):
                assert torch.equal(module.weight, torch.zeros_like(module.weight))
            assert torch.equal(model(x), before)
        add_parametrization(model.fc3, "weight", Mask(torch.ones_like(value, dtype=torch.bool)))
        with replaced_weight(model.fc3, value):
            assert torch.equal(model.fc3.weight, value)
        assert len(model.fc3.parametrizations.weight) == 1
        assert torch.equal(model(x), before)


class Block(nn.Module):
    """A residual block returning a tuple, as Hugging Face blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return h + torch.relu(self.fc(h)), None


class Stack(nn.Module):
    """Linear -> three blocks -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)[0]
        return self.head(h)


def test_replaying_earlier_blocks_gives_the_same_table_for_less_compute(monkeypatch):
    torch.manual_seed(0)
    model = Stack()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    batches = list(torch.randn(3, 5, 8))
    scale = torch.linspace(0.5, 0.9, 4)

    def quantized(i: int, k: int) -> torch.Tensor:  # any change of the weight will do
        return layers[i][1].weight.detach() * scale[k]

    calls = []
    model.blocks[0].fc.register_forward_hook(lambda *_: calls.append(1))
    replayed = sensitivity.sensitivity_table(model, batches, layers, quantized, 4, "mse")
    replayed_calls = len(calls)
    calls.clear()
    monkeypatch.setattr(sensitivity, "find_blocks", lambda *_: None)
    full = sensitivity.sensitivity_table(model, batches, layers, quantized, 4, "mse")
    assert torch.equal(replayed, full) and (full > 0).all()
    # block 0 runs for the reference, for inp and for its own layer only: (1 + 2 * 4) * 3
    assert replayed_calls == 27 and len(calls) == (1 + len(layers) * 4) * 3
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(model(x), Stack.forward(model, x))  # nothing left patched


def test_replay_records_nothing_beyond_its_byte_cap():
    torch.manual_seed(0)
    model = Stack()
    replay = BlockReplay(list(model.blocks), [model.inp, model.blocks[2].fc, model.head], limit=0)
    with replay.recording(), torch.no_grad():
        model(torch.randn(5, 8))
    assert replay.before == [0, 2, 3]
    assert replay.recorded == 0 and replay.skippable(2) == 0
