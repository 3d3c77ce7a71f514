"""distill.attention: relations of a model with itself are 0, padding is ignored, students move
toward the teacher's attention (BERT and grouped-query Llama, other head counts and widths),
the shared contract on a tiny encoder, and every error path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.config import parse_config
from modelpress.context import Context, forward
from modelpress.errors import ConfigError, NoMatchingModulesError, UnsupportedModuleError
from modelpress.models import build_from_source
from modelpress.models.source import ModelSource
from modelpress.recipe import Stage
from modelpress.techniques.distillation.attention import (
    AttentionConfig,
    apply_attention,
    attention_layers,
    relation_kl,
    relation_log_probs,
    repeat_kv,
)
from modelpress.testing import check_technique

OWNER = "distill.attention"


def attention_cfg(**params):
    return parse_config(AttentionConfig, params, owner=OWNER)


def relation_loss(student, teacher, batch, **params) -> float:
    """The technique's relation loss of ``student`` against ``teacher`` on one batch."""
    ctx = Context(teacher=teacher, example_inputs=batch)
    apply_attention(student, attention_cfg(**params), ctx)
    callback = ctx.callbacks[0]
    callback.taps.attach()
    try:
        with torch.no_grad():
            return float(callback.distill_loss(batch, forward(student.eval(), batch)))
    finally:
        callback.taps.detach()


# --- pure functions -----------------------------------------------------------------------------


def test_relations_are_row_distributions_and_equal_relations_give_zero():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    log_p = relation_log_probs(q, k, heads=2)
    assert log_p.shape == (2, 2, 5, 5)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(2, 2, 5))
    assert relation_kl(log_p, log_p).item() == pytest.approx(0.0, abs=1e-7)
    other = relation_log_probs(k, q, heads=2)
    assert relation_kl(log_p, other).item() > 0.01


def test_padding_keys_and_queries_do_not_count():
    gen = torch.Generator().manual_seed(1)
    a_t, a_s = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()

    def loss(student):
        t = relation_log_probs(a_t, a_t, 2, mask)
        return relation_kl(t, relation_log_probs(student, student, 2, mask), mask)

    changed = a_s.clone()
    changed[0, 4:] = 30.0  # the padded positions of sequence 0
    assert loss(changed).item() == pytest.approx(loss(a_s).item(), rel=1e-6)
    probs = relation_log_probs(a_t, a_t, 2, mask).exp()
    assert float(probs[0, :, :, 4:].abs().max()) == 0.0  # no mass on padding keys


def test_causal_relations_put_no_mass_on_future_keys():
    x = torch.randn(1, 4, 6)
    probs = relation_log_probs(x, x, heads=3, causal=True).exp()
    assert float(probs.triu(1).abs().max()) == 0.0


def test_grouped_query_keys_are_repeated_per_query_head():
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 3, 8)  # 2 kv heads of width 4
    out = repeat_kv(k, repeat=2, heads=4).reshape(1, 3, 4, 4)
    heads = k.reshape(1, 3, 2, 4)
    assert torch.equal(out[:, :, 0], heads[:, :, 0]) and torch.equal(out[:, :, 1], heads[:, :, 0])
    assert torch.equal(out[:, :, 2], heads[:, :, 1])


# --- the technique on tiny transformers ---------------------------------------------------------


def test_layers_are_found_in_both_layouts(make_bert, make_llama):
    bert = attention_layers(make_bert(2, 32, 2))
    assert [a.name for a in bert] == [
        "encoder.layer.0.attention.self",
        "encoder.layer.1.attention.self",
    ]
    assert (bert[-1].heads, bert[-1].kv_repeat, bert[-1].causal) == (2, 1, False)
    llama = attention_layers(make_llama(2, 32, 4, 2))[-1]
    assert llama.name == "model.layers.1.self_attn"
    assert (llama.heads, llama.kv_repeat, llama.causal) == (4, 2, True)
    assert llama.projections[0] == "model.layers.1.self_attn.q_proj"


def test_a_model_against_itself_has_zero_relation_loss(make_bert, tokens):
    teacher = make_bert(2, 32, 2)
    batch = tokens(1)[0]
    rels = ["qk", "qq", "kk", "vv"]
    assert relation_loss(copy.deepcopy(teacher), teacher, batch, relations=rels) < 1e-6
    assert relation_loss(make_bert(2, 32, 2, seed=5), teacher, batch, relations=rels) > 1e-3


def test_a_student_with_other_heads_moves_toward_the_teachers_attention(make_bert, tokens):
    teacher, student = make_bert(2, 32, 2, seed=0), make_bert(1, 32, 4, seed=1)  # 4 vs 2 heads
    train, held_out = tokens(8, seed=0), tokens(1, seed=1)[0]
    before = relation_loss(copy.deepcopy(student), teacher, held_out)
    stages = [
        {"technique": OWNER, "task_weight": 0},
        {"technique": "train", "epochs": 5, "lr": 3e-3},
    ]
    result = mp.compress(student, stages, data=train, teacher=teacher, latency_runs=0)
    after = relation_loss(result.model, teacher, held_out)
    assert after < 0.5 * before, (before, after)
    report = result.stages[-1].learned["attention_loss"]
    assert report["last"] < report["first"]


def test_a_narrower_grouped_query_llama_student_learns_relations(make_llama, tokens):
    teacher = make_llama(2, 32, 4, 2, seed=0)  # 4 query heads sharing 2 key/value heads
    student = make_llama(1, 16, 2, 2, seed=1)  # narrower, 2 heads, no grouping
    train, held_out = tokens(10, batch=4, seq=10, vocab=50), tokens(1, 4, 10, 50, seed=3)[0]
    # the teacher's first layer: before the rotary embedding its relations depend on the
    # tokens alone, which a one-layer student can learn (deeper ones also need the context)
    params = {"relations": ["qk", "kk", "vv"], "relation_heads": 2,
              "teacher_layer": "model.layers.0.self_attn"}  # fmt: skip
    before = relation_loss(copy.deepcopy(student), teacher, held_out, **params)
    stages = [{"technique": OWNER, "task_weight": 0, **params},
              {"technique": "train", "epochs": 5, "lr": 2e-2}]  # fmt: skip
    result = mp.compress(student, stages, data=train, teacher=teacher, latency_runs=0)
    after = relation_loss(result.model, teacher, held_out, **params)
    assert after < 0.7 * before, (before, after)  # measured 1.20 -> 0.69


# --- the shared contract, on a tiny encoder that returns a tensor ------------------------------


class Encoder(nn.Module):
    """A tiny BERT returning ``last_hidden_state`` (the contract compares tensor outputs)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tiny_encoder(layers: int = 2) -> nn.Module:
    """An :class:`Encoder` around a random 2-head BERT (built by ``import:`` on load)."""
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 100,
              "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip
    torch.manual_seed(0)
    return Encoder(build_from_source(ModelSource("hf:/tiny-bert", {"config": config})))


def test_contract_on_a_tiny_encoder(tokens):
    model = tiny_encoder()
    spec = f"import:{__name__}:tiny_encoder"
    model = mp.models.tag_source(model, ModelSource(spec, {"layers": 2}))
    batches = tokens(4)
    report = check_technique(
        OWNER,
        {"task_weight": 0},  # as CASES in tests/techniques/test_contract.py
        model,
        batches,
        inputs=batches[0]["input_ids"],
        min_cosine=0.98,
        expect_smaller=False,
        targeted=False,
        followed_by=[Stage.of("train", max_steps=10, lr=1e-4)],
    )
    assert report["cosine"] >= 0.98


# --- errors -------------------------------------------------------------------------------------


def test_bad_configs_are_rejected():
    with pytest.raises(ConfigError, match="'relations' is empty"):
        attention_cfg(relations=[])
    with pytest.raises(ConfigError, match="'relations' repeats an entry"):
        attention_cfg(relations=["qk", "qk"])
    with pytest.raises(ConfigError, match="The 'relations' parameter of distill.attention must "
                       "be a list. Got 'qv' instead."):  # fmt: skip
        attention_cfg(relations="qv")


def test_relation_heads_must_divide_every_width(make_bert, tokens):
    teacher, student = make_bert(2, 32, 2), make_bert(1, 24, 2, seed=1)
    ctx = Context(teacher=teacher, example_inputs=tokens(1)[0])
    with pytest.raises(ConfigError, match="relation_heads=5 does not divide the student's q "
                       "projection width 24; set 'relation_heads' to a common divisor of the "
                       r"widths \[24, 32\]"):  # fmt: skip
        apply_attention(student, attention_cfg(relation_heads=5), ctx)
    assert ctx.callbacks == []


def test_layer_names_must_be_attention_modules(make_bert, tokens, trained):
    teacher, student = make_bert(2), make_bert(1, seed=1)
    ctx = Context(teacher=teacher, example_inputs=tokens(1)[0])
    with pytest.raises(NoMatchingModulesError, match=r"student module\(s\) 'encoder.layer.7' "
                       "not found"):  # fmt: skip
        apply_attention(student, attention_cfg(student_layer="encoder.layer.7"), ctx)
    with pytest.raises(UnsupportedModuleError, match="teacher module 'encoder.layer.0' is not a "
                       "self-attention module.*attention modules: encoder.layer.0.attention.self"):  # fmt: skip
        apply_attention(student, attention_cfg(teacher_layer="encoder.layer.0"), ctx)
    mlp, bundle = trained
    ctx = Context(teacher=mlp, example_inputs=bundle.test.tensors[0][:1])
    with pytest.raises(UnsupportedModuleError, match="the student has no self-attention module"):
        apply_attention(copy.deepcopy(mlp), attention_cfg(), ctx)
    assert ctx.callbacks == []


class Truncating(nn.Module):
    """A teacher that drops the last token: its relations do not line up with the student's."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask=None):
        return self.bert(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1])


def test_teacher_and_student_must_see_the_same_tokens(make_bert, tokens):
    teacher, student = Truncating(make_bert(2)), make_bert(1, seed=1)
    ctx = Context(teacher=teacher, example_inputs=tokens(1)[0])
    with pytest.raises(ConfigError, match=r"the student's queries have shape \(8, 12, 32\) and "
                       r"the teacher's \(8, 11, 32\)"):  # fmt: skip
        apply_attention(student, attention_cfg(), ctx)
