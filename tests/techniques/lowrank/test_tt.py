"""lowrank.tt: TT-matrix maths, TTLinear/TTEmbedding, the technique, artifacts and errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.models import ModelSource, build_from_source
from modelpress.techniques.lowrank.tt import (
    TTConfig,
    TTEmbedding,
    TTLinear,
    apply_tt,
    fit_error,
    layer_factors,
    tt_layer,
)
from modelpress.techniques.lowrank.tt_math import (
    accuracy_ranks,
    balanced_factors,
    contract_linear,
    full_ranks,
    gather_rows,
    tt_cores,
    tt_matrix,
    tt_params,
)

TINY_BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def tt(model: nn.Module, data=None, **params) -> mp.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "slower on this runtime"
        return mp.compress(model, [{"technique": "lowrank.tt", **params}], data=data,
                           latency_runs=0)  # fmt: skip


def smooth_matrix(rows: int, cols: int) -> torch.Tensor:
    """A matrix with quickly decaying TT spectra (a sampled smooth function) plus noise."""
    i = torch.linspace(0, 1, rows, dtype=torch.float64)[:, None]
    j = torch.linspace(0, 1, cols, dtype=torch.float64)[None, :]
    noise = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.sin(3 * i + 2 * j) + (i * j).exp() + 0.01 * noise


# ------------------------------------------------------------------------------------ maths


@pytest.mark.parametrize(("n", "cores"), [(1536, 3), (384, 3), (64, 3), (10, 3), (30522, 3),
                                          (97, 2), (4096, 4)])  # fmt: skip
def test_balanced_factors_multiply_back_and_are_balanced(n, cores):
    factors = balanced_factors(n, cores)
    assert len(factors) == cores and math.prod(factors) == n
    assert factors[0] == max(factors)  # large at the ends, where a core has one rank
    if n in (4096, 64):
        assert len(set(factors)) == 1


def test_full_ranks_reproduce_the_matrix_and_the_contractions_agree():
    a = torch.randn(24, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rows, cols = [2, 3, 4], [5, 3, 2]
    assert full_ranks(rows, cols) == [1, 10, 8, 1]
    cores = tt_cores(a, rows, cols, full_ranks(rows, cols))
    assert [tuple(c.shape) for c in cores] == [(1, 2, 5, 10), (10, 3, 3, 8), (8, 4, 2, 1)]
    assert torch.allclose(tt_matrix(cores), a, atol=1e-10)
    x = torch.randn(7, 30, dtype=torch.float64)
    assert torch.allclose(contract_linear(x, cores), x @ a.T, atol=1e-10)
    idx = torch.tensor([0, 23, 5, 5, 17])
    assert torch.allclose(gather_rows(idx, cores), a[idx], atol=1e-10)
    assert tt_params(rows, cols, [1, 10, 8, 1]) == 100 + 720 + 64


@pytest.mark.parametrize("eps", [0.3, 0.1, 0.03, 0.01])
def test_accuracy_ranks_bound_the_relative_error(eps):
    """Oseledets 2011, Thm 2.2: ranks from the unfoldings bound the TT-SVD error by eps."""
    a = smooth_matrix(48, 60)
    rows, cols = [4, 3, 4], [5, 4, 3]
    ranks = accuracy_ranks(a, rows, cols, eps)
    cores = tt_cores(a, rows, cols, ranks)
    error = float((tt_matrix(cores) - a).norm() / a.norm())
    assert error <= eps
    assert tt_params(rows, cols, ranks) < 48 * 60  # and the smooth matrix does compress


def test_accuracy_ranks_grow_as_the_bound_tightens():
    a = smooth_matrix(48, 60)
    sizes = [sum(accuracy_ranks(a, [4, 3, 4], [5, 4, 3], eps)) for eps in (0.3, 0.03, 1e-4)]
    assert sizes[0] < sizes[1] < sizes[2]


# ----------------------------------------------------------------------------------- modules


def test_tt_linear_and_embedding_at_full_rank_reproduce_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(24, 30)
    layer = tt_layer(linear, [2, 3, 4], [5, 3, 2])
    assert isinstance(layer, TTLinear) and fit_error(linear, layer) < 1e-6
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.allclose(layer(x), linear(x), atol=1e-5, rtol=0)
    emb = nn.Embedding(60, 12)
    layer = tt_layer(emb, [3, 4, 5], [2, 3, 2])
    assert isinstance(layer, TTEmbedding)
    idx = torch.randint(0, 60, (3, 7))
    with torch.no_grad():
        assert torch.allclose(layer(idx), emb(idx), atol=1e-5, rtol=0)


def test_max_rank_caps_every_rank():
    linear = nn.Linear(64, 64)
    layer = tt_layer(linear, [4, 4, 4], [4, 4, 4], max_rank=5)
    assert layer.ranks == [1, 5, 5, 1]
    assert [tuple(c.shape) for c in layer.cores] == [(1, 4, 4, 5), (5, 4, 4, 5), (5, 4, 4, 1)]


# --------------------------------------------------------------------------------- technique


def test_mlp_report_skip_and_reload(mlp, digits, tmp_path):
    result = tt(mlp, digits, max_rank=16)
    learned = result.stages[0].learned
    fc1 = learned["layers"]["fc1"]
    assert fc1["in_factors"] == [4, 4, 4] and fc1["out_factors"] == [8, 4, 4]
    assert fc1["ranks"] == [1, 16, 16, 1]
    assert fc1["params_after"] == 16 * 8 * 4 + 16 * 16 * 16 + 16 * 16 + 128
    assert 0 < fc1["fit_error"] < 1 and {"flops_after", "ms_after"} <= set(fc1)
    assert learned["skipped"]["fc3"].startswith("TT ranks [1, 16, 8, 1] need 896 weights")
    model = result.model
    assert isinstance(model.fc1, TTLinear) and isinstance(model.fc3, nn.Linear)
    x = digits.test.tensors[0][:64]
    loaded = mp.load(result.save(tmp_path / "tt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        cos = torch.nn.functional.cosine_similarity(model(x), mlp(x)).mean()
    assert cos > 0.9 and isinstance(loaded.fc2, TTLinear)


def test_accuracy_sets_the_ranks_layer_by_layer(mlp, digits):
    learned = tt(mlp, digits, accuracy=0.3, max_rank=None).stages[0].learned
    for rec in learned["layers"].values():
        assert rec["fit_error"] <= 0.3


def test_given_factors_and_the_bert_embedding(tmp_path):
    torch.manual_seed(0)
    bert = build_from_source(ModelSource("hf:/tiny-bert", {"config": TINY_BERT})).eval()
    result = tt(bert, None, targets=["embeddings.word_embeddings"], in_factors=[4, 4, 6],
                out_factors=[2, 4, 4], max_rank=4)  # fmt: skip
    word = result.model.embeddings.word_embeddings
    assert isinstance(word, TTEmbedding) and word.in_factors == [4, 4, 6]
    rec = result.stages[0].learned["layers"]["embeddings.word_embeddings"]
    assert rec["params_after"] == 4 * 2 * 4 + 4 * 4 * 4 * 4 + 4 * 6 * 4 < rec["params_before"]
    approx = tt_matrix([c.detach().double() for c in word.cores])  # (96, 32)
    ids = torch.tensor([[0, 5, 95, 17, 17, 40]])
    with torch.no_grad():
        assert torch.allclose(word(ids)[0].double(), approx[ids[0]], atol=1e-6)
    batch = {"input_ids": torch.randint(0, 96, (2, 9)), "attention_mask": torch.ones(2, 9)}
    loaded = mp.load(result.save(tmp_path / "bert-tt"))
    with torch.no_grad():
        out = result.model(**batch).last_hidden_state
        assert torch.equal(loaded(**batch).last_hidden_state, out)


# ------------------------------------------------------------------------------------ errors


def test_factors_that_do_not_multiply_to_the_width_name_the_layer(mlp):
    cfg = TTConfig(in_factors=[4, 4, 4], out_factors=[4, 4, 4])  # fc1 has 128 outputs
    with pytest.raises(UnsupportedModuleError, match=r"fc1: its out width 128 is not the "
                       r"product of out_factors \[4, 4, 4\] \(= 64\)"):  # fmt: skip
        apply_tt(mlp, cfg, Context())
    assert isinstance(mlp.fc1, nn.Linear)
    only_in = TTConfig(in_factors=[2, 4, 8])
    assert layer_factors("fc1", mlp.fc1, only_in) == ([2, 4, 8], [8, 4, 4])  # out: balanced


def test_factor_lists_of_different_lengths_are_a_config_error():
    with pytest.raises(ConfigError, match="'in_factors' and 'out_factors' need the same number"):
        parse_config(TTConfig, {"in_factors": [8, 8], "out_factors": [4, 4, 8]}, owner="lowrank.tt")
    with pytest.raises(ConfigError, match="need 2 to 8 factors each"):
        parse_config(TTConfig, {"in_factors": [64]}, owner="lowrank.tt")


def test_nothing_smaller_is_one_error_and_masks_are_refused(mlp, digits):
    with pytest.raises(UnsupportedModuleError, match="lowrank.tt: no selected layer has a "
                       r"smaller TT form; e.g. fc1: TT ranks \[1, 32, 16, 1\]"):  # fmt: skip
        apply_tt(copy.deepcopy(mlp), TTConfig(max_rank=None), Context())
    stages = [{"technique": "quant.rtn", "bits": 4}, {"technique": "lowrank.tt"}]
    with pytest.raises(UnsupportedModuleError, match="fc1: carries a mask or quantizer; run "
                       "lowrank.tt before"):  # fmt: skip
        mp.compress(mlp, stages, data=digits, latency_runs=0)
