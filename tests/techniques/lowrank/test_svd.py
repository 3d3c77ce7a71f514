"""lowrank.svd on models: rank rules, budgets, whitening, reports, artifacts and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.models import ModelSource, build_from_source
from modelpress.parametrizations import parametrizations_of
from modelpress.registry import technique_names
from modelpress.techniques.lowrank.svd import LowRank, SVDConfig, apply_svd

TINY_BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
FFN = ["re:.*intermediate\\.dense", "re:.*layer\\.\\d+\\.output\\.dense"]


def svd(model: nn.Module, data=None, **params) -> mp.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "slower on this runtime"
        return mp.compress(model, [{"technique": "lowrank.svd", **params}], data=data,
                           latency_runs=0)  # fmt: skip


def outputs(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**x) if isinstance(x, dict) else model.eval()(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    return build_from_source(ModelSource("hf:/tiny-bert", {"config": TINY_BERT})).eval()


def tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # padding in the first sequence
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------- rank rules, report


def test_energy_rule_report_and_the_layer_it_skips(mlp, digits):
    result = svd(mlp, digits, energy=0.95)
    learned = result.stages[0].learned
    fc1 = learned["layers"]["fc1"]
    assert isinstance(result.model.fc1, LowRank) and result.model.fc1.rank == fc1["rank"]
    assert fc1["energy_kept"] >= 0.95 and fc1["whitened"] is False
    assert fc1["params_after"] == fc1["rank"] * (64 + 128) + 128 < fc1["params_before"]
    # the lowest rank with 95 % of the energy: one less keeps less
    s = torch.linalg.svdvals(mlp.fc1.weight.detach().double()).square()
    assert float(s[: fc1["rank"] - 1].sum() / s.sum()) < 0.95 <= fc1["energy_kept"]
    assert {"flops_before", "flops_after", "ms_before", "ms_after", "speedup"} <= set(fc1)
    assert fc1["flops_after"] == 2 * fc1["rank"] * (64 + 128)  # one digits sample
    assert learned["skipped"]["fc3"].startswith("rank ")  # a 10-output layer: never smaller
    assert isinstance(result.model.fc3, nn.Linear)


def test_rank_rules_round_to_and_the_slower_warning(mlp):
    ctx = Context(example_inputs=torch.randn(1, 64))
    with pytest.warns(RuntimeWarning, match="lowrank.svd: the factorized layer is slower"):
        apply_svd(copy.deepcopy(mlp), SVDConfig(rank=3, round_to=4), ctx)
    assert {n: r["rank"] for n, r in ctx.reports["layers"].items()} == {"fc1": 4, "fc2": 4,
                                                                         "fc3": 4}  # fmt: skip
    ctx = Context()  # no example inputs: no cost records
    apply_svd(copy.deepcopy(mlp), SVDConfig(rank_ratio=0.25), ctx)
    layers = ctx.reports["layers"]
    assert [layers[n]["rank"] for n in ("fc1", "fc2", "fc3")] == [16, 16, 3]
    assert "flops_before" not in layers["fc1"] and ctx.reports["skipped"] == {}


def test_params_budget_is_met_and_beats_uniform_ranks(mlp, digits):
    shapes = {"fc1": (128, 64), "fc2": (64, 128), "fc3": (10, 64)}
    learned = svd(mlp, digits, params_ratio=0.3).stages[0].learned
    ranks = {n: r["rank"] for n, r in learned["layers"].items()}
    assert set(ranks) | set(learned["skipped"]) == set(shapes)
    energy = {n: torch.linalg.svdvals(getattr(mlp, n).weight.detach().double()).square()
              for n in shapes}  # fmt: skip

    def cost_and_discard(rank_of: dict[str, int | None]) -> tuple[int, float]:
        cost, discard = 0, 0.0
        for n, (out_f, in_f) in shapes.items():
            r = rank_of.get(n)
            if r is None or r * (in_f + out_f) >= in_f * out_f:  # dense
                cost += in_f * out_f
            else:
                cost += r * (in_f + out_f)
                discard += float(energy[n][r:].sum() / energy[n].sum())
        return cost, discard

    budget = 0.3 * sum(a * b for a, b in shapes.values())
    cost, discard = cost_and_discard(ranks)
    assert budget - 192 < cost <= budget  # within one rank step of fc1/fc2
    # the best single rank for every layer within the same budget discards more energy
    uniform = [c for r in range(1, 64) if (c := cost_and_discard(dict.fromkeys(shapes, r)))[0]
               <= budget]  # fmt: skip
    assert discard < min(d for _, d in uniform)


def test_flops_budget_counts_the_flops_of_each_layer(mlp, digits):
    learned = svd(mlp, digits, flops_ratio=0.4).stages[0].learned
    layers = learned["layers"]
    dense = {"fc1": 2 * 64 * 128, "fc2": 2 * 128 * 64, "fc3": 2 * 64 * 10}  # one sample
    assert all(layers[n]["flops_before"] == dense[n] for n in layers)
    after = sum(r["flops_after"] for r in layers.values())
    after += sum(dense[n] for n in learned["skipped"])  # left dense by the budget
    assert 0.35 * sum(dense.values()) < after <= 0.4 * sum(dense.values())


# --------------------------------------------------------------------------- activation-aware


def test_whitening_lowers_the_output_error_on_the_mlp(mlp, digits):
    x = digits.test.tensors[0][:256]
    ref = outputs(mlp, x)
    errors = {}
    for whiten in (False, True):
        model = svd(mlp, digits, rank=8, whiten=whiten, n_samples=512).model
        errors[whiten] = float((outputs(model, x) - ref).norm() / ref.norm())
    assert errors[True] < 0.5 * errors[False]


def test_whitened_bert_ffn_saves_and_loads_exactly(bert, tmp_path):
    calib = [tokens(4, 12, s) for s in range(4)]
    test = tokens(3, 10, 99)
    ref = outputs(bert, test)
    errors = {}
    for whiten in (False, True):
        result = svd(bert, calib, targets=FFN, ignore=["re:.*attention.*"], rank=8, whiten=whiten)
        out = outputs(result.model, test)
        errors[whiten] = float((out - ref).norm() / ref.norm())
        loaded = mp.load(result.save(tmp_path / f"w{whiten}"))
        assert torch.equal(outputs(loaded, test), out)
        assert isinstance(loaded.encoder.layer[1].output.dense, LowRank)
    assert errors[True] < errors[False]


def test_embeddings_are_factored_plainly_under_whitening(bert, tmp_path):
    calib = [tokens(4, 12, s) for s in range(2)]
    result = svd(bert, calib, targets=["Embedding", FFN[0]], rank=4, whiten=True)
    layers = result.stages[0].learned["layers"]
    assert layers["embeddings.word_embeddings"]["whitened"] is False
    assert layers["encoder.layer.0.intermediate.dense"]["whitened"] is True
    word = result.model.embeddings.word_embeddings
    assert isinstance(word.first, nn.Embedding) and word.first.padding_idx == 0
    loaded = mp.load(result.save(tmp_path / "emb"))
    test = tokens(2, 9, 5)
    assert torch.equal(outputs(loaded, test), outputs(result.model, test))


# ----------------------------------------------------------------------------- composability


def test_svd_then_rtn_saves_and_loads(mlp, digits, tmp_path):
    stages = [{"technique": "lowrank.svd", "params_ratio": 0.4},
              {"technique": "quant.rtn", "bits": 8}]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = mp.compress(mlp, stages, data=digits, latency_runs=0)
    model = result.model
    assert parametrizations_of(model.fc1.first, "weight")
    assert parametrizations_of(model.fc1.second, "weight")
    x = digits.test.tensors[0][:64]
    loaded = mp.load(result.save(tmp_path / "svd-int8"))
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    cos = torch.nn.functional.cosine_similarity(outputs(model, x), outputs(mlp, x)).mean()
    assert cos > 0.99


@pytest.mark.skipif("encode.ans" not in technique_names(), reason="encode.ans not registered")
def test_svd_rtn_and_entropy_coding_round_trip(mlp, digits, tmp_path):
    stages = [{"technique": "lowrank.svd", "rank": 16}, {"technique": "quant.rtn", "bits": 4},
              {"technique": "encode.ans"}]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = mp.compress(mlp, stages, data=digits, latency_runs=0)
    x = digits.test.tensors[0][:64]
    loaded = mp.load(result.save(tmp_path / "svd-int4-ans"))
    assert torch.equal(outputs(loaded, x), outputs(result.model, x))
    assert isinstance(loaded.fc1, LowRank)
    assert parametrizations_of(result.model.fc1.second, "weight")  # quantized factors


def test_tied_weights_are_left_dense_and_said_so():
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 40, bias=False))
    model[1].weight = model[0].weight  # tied input and output embeddings
    ctx = Context()
    with pytest.raises(UnsupportedModuleError, match=r"0: its weight is shared with 1 \(tied\)"):
        apply_svd(model, SVDConfig(rank=2), ctx)
    model.append(nn.Linear(40, 40))
    apply_svd(model, SVDConfig(rank=2), ctx)
    assert set(ctx.reports["skipped"]) == {"0", "1"} and isinstance(model[2], LowRank)


# ------------------------------------------------------------------------------------ errors


def test_masked_or_quantized_layers_are_refused_unchanged(mlp, digits):
    for first in ({"technique": "prune.magnitude", "sparsity": 0.5},
                  {"technique": "quant.rtn", "bits": 4}):  # fmt: skip
        stages = [first, {"technique": "lowrank.svd", "rank": 4}]
        with pytest.raises(UnsupportedModuleError, match="fc1: carries a mask or quantizer; "
                           "run lowrank.svd before"):  # fmt: skip
            mp.compress(mlp, stages, data=digits, latency_runs=0)
    stage = {"technique": "prune.magnitude", "sparsity": 0.5, "targets": ["fc2"]}
    pruned = mp.compress(mlp, [stage], latency_runs=0).model
    before = copy.deepcopy(pruned.state_dict())
    with pytest.raises(UnsupportedModuleError, match="fc2: carries"):
        apply_svd(pruned, SVDConfig(rank=4), Context())
    assert isinstance(pruned.fc1, nn.Linear) and parametrize.is_parametrized(pruned.fc2)
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())


def test_nan_activations_name_the_layer(mlp):
    batches = [torch.full((4, 64), float("nan"))]
    with pytest.raises(DataError, match="fc1: the calibration activations reaching it contain "
                       "NaN or inf, so lowrank.svd cannot use them"):  # fmt: skip
        apply_svd(copy.deepcopy(mlp), SVDConfig(rank=4, whiten=True), Context(batches=batches))


def test_whitening_without_data_is_a_data_error(mlp):
    with pytest.raises(DataError, match="this stage needs calibration data"):
        apply_svd(mlp, SVDConfig(rank=4, whiten=True), Context())
    assert isinstance(mlp.fc1, nn.Linear)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rank": 4, "energy": 0.9}, "set one rank rule, not 'energy' and 'rank'"),
        (
            {"params_ratio": 1.0},
            "The 'params_ratio' parameter of lowrank.svd must be a float "
            "in (0, 1) or null. Got 1.0 instead.",
        ),
        (
            {"rank": 0},
            "The 'rank' parameter of lowrank.svd must be an int in [1, 1000000] or "
            "null. Got 0 instead.",
        ),
    ],
)
def test_bad_configs_are_config_errors(params, message):
    from modelpress.config import parse_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):  # fmt: skip
        parse_config(SVDConfig, params, owner="lowrank.svd")


def test_a_budget_below_every_layer_at_round_to(mlp):
    with pytest.raises(ConfigError, match=r"The 'params_ratio' parameter of lowrank.svd must be "
                       r"at least 0\.2152 here \(every layer at rank 8\)\. Got 0\.05 instead\."):  # fmt: skip
        apply_svd(mlp, SVDConfig(params_ratio=0.05, round_to=8), Context())
    assert isinstance(mlp.fc1, nn.Linear)


def test_nothing_factorizable_is_one_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(UnsupportedModuleError, match="lowrank.svd: no selected layer can be "
                       "factorized with fewer parameters; e.g. 0: rank 3 needs 21 weights"):  # fmt: skip
        apply_svd(model, SVDConfig(rank=3), Context())


def test_embedding_options_that_cannot_be_kept():
    model = nn.Sequential(nn.Embedding(50, 16, max_norm=1.0))
    with pytest.raises(UnsupportedModuleError, match="0: an Embedding with max_norm=1.0"):
        apply_svd(model, SVDConfig(rank=2), Context())
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
    with pytest.raises(UnsupportedModuleError, match="0: an Embedding lookup has no FLOPs"):
        apply_svd(model, SVDConfig(flops_ratio=0.5), Context())
