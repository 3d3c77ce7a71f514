"""architecture.shrink: dropping transformer layers and residual blocks, narrowing width."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.models import build_from_source
from modelpress.models.source import ModelSource
from modelpress.techniques.architecture.blocks import find_containers
from modelpress.techniques.architecture.shrink import ShrinkConfig, apply_shrink, kept_indices

TINY_BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 100,
             "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
              "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64}  # fmt: skip
TINY_QWEN2 = {**TINY_LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
              "use_sliding_window": True, "sliding_window": 3,
              "layer_types": ["full_attention", "sliding_attention"] * 2}  # fmt: skip


def hf(config: dict) -> nn.Module:
    torch.manual_seed(0)
    return build_from_source(ModelSource(f"hf:/tiny-{config['model_type']}", {"config": config}))


def shrink(model: nn.Module, example_inputs=None, **params) -> mp.Result:
    stage = {"technique": "architecture.shrink", **params}
    return mp.compress(model, [stage], example_inputs=example_inputs, latency_runs=0)


def reload(result: mp.Result, tmp_path) -> nn.Module:
    return mp.load(result.save(tmp_path / "student"))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = mp.load_model("zoo:resnet20", input_shape=[1, 8, 8], num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


IMAGES = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ which blocks stay


def test_kept_indices_keep_every_is_per_container_and_lists_are_global():
    stages = {"layer1": 3, "layer2": 3, "layer3": 3}
    assert kept_indices({"layers": 6}, 2, None, None) == {"layers": [0, 2, 4]}
    assert kept_indices(stages, 2, None, None) == {c: [0, 2] for c in stages}
    assert kept_indices({"a": 3, "b": 3}, None, [0, 1, 4], None) == {"a": [0, 1], "b": [1]}
    assert kept_indices({"a": 3, "b": 3}, None, None, [2, 3]) == {"a": [0, 1], "b": [1, 2]}


@pytest.mark.parametrize(
    ("sizes", "keep", "drop", "message"),
    [
        ({"l": 6}, [0, 6], None, r"keep index 6 is out of range; the model has 6 blocks \(0..5\)"),
        ({"l": 6}, None, [-1], "drop index -1 is out of range"),
        ({"l": 6}, [1, 1], None, "keep lists an index twice"),
        ({"l": 6}, None, [], "keeps all 6 blocks; drop at least one"),
        ({"l": 6}, None, list(range(6)), r"drops every block of l \(6\)"),
        ({"a": 3, "b": 3}, [0, 1], None, r"drops every block of b \(3\); keep at least one"),
    ],
)
def test_kept_indices_errors(sizes, keep, drop, message):
    with pytest.raises(ConfigError, match=message):
        kept_indices(sizes, None, keep, drop)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "nothing to shrink: set 'keep_every', 'keep' or 'drop', or 'width'"),
        ({"keep_every": 2, "drop": [1]}, "give one of 'keep_every', 'keep', 'drop'"),
        ({"keep_every": 2, "targets": ["Linear"]}, "'targets'/'ignore' choose the layers"),
        ({"width": 0.5, "blocks": "layer1"}, "'blocks' names where to drop blocks"),
        ({"keep_every": 1}, "The 'keep_every' parameter of architecture.shrink must be an int "
                            "in \\[2, 64\\] or null. Got 1 instead."),
        ({"width": 1.0}, "The 'width' parameter of architecture.shrink must be a float in "
                         "\\(0, 1\\) or null. Got 1.0 instead."),
    ],
)  # fmt: skip
def test_bad_configs_are_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        mp.Stage.of("architecture.shrink", **params)


# ---------------------------------------------------------------------------- transformers


def test_bert_keep_every_two_keeps_teacher_layers(tmp_path):
    teacher = hf(TINY_BERT)
    result = shrink(teacher, keep_every=2)
    student = result.model
    learned = result.stages[0].learned
    assert (learned["layers_before"], learned["layers_after"]) == (6, 3)
    assert learned["dropped_blocks"] == ["encoder.layer.1", "encoder.layer.3", "encoder.layer.5"]
    assert (
        learned["params_after"]
        < learned["params_before"]
        == sum(p.numel() for p in teacher.parameters())
    )
    assert student.config.num_hidden_layers == 3 and len(student.encoder.layer) == 3
    assert [b.attention.self.layer_idx for b in student.encoder.layer] == [0, 1, 2]
    for new, old in enumerate((0, 2, 4)):  # DistilBERT initialisation: exact teacher weights
        assert same_weights(student.encoder.layer[new], teacher.encoder.layer[old])
    assert same_weights(student.embeddings, teacher.embeddings)
    assert len(teacher.encoder.layer) == 6 and teacher.config.num_hidden_layers == 6
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = student(input_ids=ids).last_hidden_state
        loaded = reload(result, tmp_path)
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, out)
    assert out.shape == (2, 9, 32)
    assert loaded.config.num_hidden_layers == 3


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2], ids=["llama", "qwen2"])
def test_decoder_generates_with_cache_after_dropping(config, tmp_path):
    teacher = hf(config)
    result = shrink(teacher, drop=[1, 2])
    student = result.model
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]
    if "layer_types" in config:
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 11) and torch.equal(cached, plain)
    loaded = reload(result, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=prompt).logits, student(input_ids=prompt).logits)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), cached)


def test_bert_width_and_depth_together(tmp_path):
    teacher = hf(TINY_BERT)
    result = shrink(teacher, keep=[0, 5], width=0.5)
    student = result.model
    assert len(student.encoder.layer) == 2
    assert student.encoder.layer[1].intermediate.dense.out_features == 32  # 64 FFN neurons
    assert student.encoder.layer[0].attention.self.num_attention_heads == 1
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            reload(result, tmp_path)(input_ids=ids).last_hidden_state,
            student(input_ids=ids).last_hidden_state,
        )


# ------------------------------------------------------------------------------- ResNets


def test_resnet_blocks_are_found_per_stage(resnet):
    assert find_containers(resnet) == ["layer1", "layer2", "layer3"]


def test_resnet_keep_every_drops_identity_blocks(resnet, tmp_path):
    result = shrink(resnet, IMAGES[:1], keep_every=2)
    student = result.model
    assert result.stages[0].learned["dropped_blocks"] == ["layer1.1", "layer2.1", "layer3.1"]
    assert [len(getattr(student, f"layer{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    assert same_weights(student.layer2[1], resnet.layer2[2])
    with torch.no_grad():
        out = student(IMAGES)
        assert torch.equal(reload(result, tmp_path)(IMAGES), out)
    assert out.shape == (4, 10)


def test_resnet_refuses_a_downsampling_block_and_changes_nothing(resnet):
    model = copy.deepcopy(resnet)
    cfg = ShrinkConfig(drop=[2, 3])
    with pytest.raises(
        UnsupportedModuleError, match=r"layer2\.0: maps shape \[1, 16, 8, 8\] to \[1, 32, 4, 4\]"
    ):
        apply_shrink(model, cfg, Context(example_inputs=IMAGES[:1]))
    assert same_weights(model, resnet) and len(model.layer1) == 3


def test_resnet_width_and_depth(resnet, tmp_path):
    result = shrink(resnet, IMAGES[:1], drop=[2, 8], width=0.5, importance="l1")
    learned = result.stages[0].learned
    assert learned["channels"]["layer1.0.conv1"] == "8/16"
    assert learned["params_after"] < learned["params_before"] / 3
    with torch.no_grad():
        assert torch.equal(reload(result, tmp_path)(IMAGES), result.model(IMAGES))


def test_resnet_without_example_inputs_is_a_data_error(resnet):
    with pytest.raises(DataError, match="checks block shapes on example inputs"):
        apply_shrink(copy.deepcopy(resnet), ShrinkConfig(keep_every=2), Context())


# ---------------------------------------------------------------------------- other errors


class Unused(nn.Module):
    """Two blocks in a ModuleList, of which forward only runs the first."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_a_block_that_does_not_run_is_refused():
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.1: did not run on the example"):
        apply_shrink(Unused(), ShrinkConfig(drop=[1]), Context(example_inputs=torch.ones(1, 4)))


def test_model_without_blocks_is_refused(mlp):
    with pytest.raises(UnsupportedModuleError, match="MLP has no repeated blocks"):
        apply_shrink(mlp, ShrinkConfig(keep_every=2), Context())


def test_blocks_must_name_a_container(resnet):
    with pytest.raises(ConfigError, match=r"'blocks' 'layer9' is not a ModuleList/Sequential.*"
                       r"found: \['layer1', 'layer2', 'layer3'\]"):  # fmt: skip
        apply_shrink(resnet, ShrinkConfig(keep_every=2, blocks="layer9"), Context())


def test_named_container_indices_are_local(resnet, tmp_path):
    result = shrink(resnet, IMAGES[:1], blocks="layer3", drop=[1, 2])
    assert result.stages[0].learned["kept_blocks"] == {"layer3": [0]}
    assert len(result.model.layer1) == 3 and len(result.model.layer3) == 1


def test_width_targets_that_match_nothing_name_the_owner(mlp):
    with pytest.raises(ConfigError, match="architecture.shrink: target selector 're:nope'"):
        apply_shrink(mlp, ShrinkConfig(width=0.5, targets=["re:nope"]), Context())
