"""prune.structured: coupled groups found by tracing, exact outputs, replay on load, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.measure.flops import count_flops
from modelpress.models.source import ModelSource, tag_source
from modelpress.techniques.pruning.structured.apply import (
    StructuredConfig,
    apply_structured,
    find_groups,
)
from modelpress.techniques.pruning.structured.graph import Group, build_graph
from modelpress.techniques.pruning.structured.importance import group_scores, taylor_scores
from modelpress.techniques.pruning.structured.plan import channel_costs, layer_flops, round_counts


class Residual(nn.Module):
    """conv-bn-relu, conv-bn + identity, relu, pool, fc: the residual add couples channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))  # (B, 8, H, W)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))  # (B, 8, H, W)
        x = torch.relu(x + y)
        return self.fc(x.mean(dim=(2, 3)))  # (B, 5)


class Concat(nn.Module):
    """Two branches concatenated on channels, then a conv, flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)  # (B, 10, H, W)
        x = torch.relu(self.c(x))  # (B, 6, H, W)
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, 3)


class Depthwise(nn.Module):
    """Pointwise -> depthwise -> BN -> pointwise -> flatten (C·H·W) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.dw(torch.relu(self.expand(x)))))  # (B, 8, 6, 6)
        x = torch.relu(self.project(x))  # (B, 4, 6, 6)
        return self.fc(x.view(x.size(0), -1))  # (B, 3)


class SqueezeExcite(nn.Module):
    """Conv-BN, channel gating by a bottleneck MLP (``x * w[:, :, None, None]``), conv, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.squeeze = nn.Linear(16, 4)
        self.excite = nn.Linear(4, 16)
        self.project = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))  # (B, 16, H, W)
        w = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3))))))  # (B, 16)
        x = torch.relu(self.project(x * w[:, :, None, None]))  # (B, 8, H, W)
        return self.fc(x.mean((2, 3)))


class TokenMLP(nn.Module):
    """Tokens ``(B, T, F)``: an embedding Linear, a residual MLP, mean over tokens, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, 16)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))  # (B, 2)


class Branchy(nn.Module):
    """Data-dependent control flow: cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


class Grouped(nn.Module):
    """A grouped conv (groups=2): its input and output channels are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.g(torch.relu(self.a(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _members(group: Group) -> set[tuple[str, str]]:
    return {(m.module, m.role) for m in group.members}


def _zero_weakest(model: nn.Module, groups: list[Group], sparsity: float) -> None:
    """Zero ``round(sparsity · C)`` channels of each prunable group in every producer, bias
    and norm, so they contribute exactly nothing downstream."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in groups:
            if g.pinned or not g.producers:
                continue
            drop = torch.randperm(g.size, generator=gen)[: round(sparsity * g.size)]
            for m in g.members:
                if m.role == "in":
                    continue
                for name in ("weight", "bias"):
                    t = getattr(modules[m.module], name, None)
                    if t is None:
                        continue
                    rows = t.narrow(0, m.offset, g.size * m.expand).view(g.size, -1)
                    rows[drop] = 0


def _prune_zeroed(model: nn.Module, x: object, sparsity: float = 0.5) -> tuple[nn.Module, Context]:
    """Zero channels, check pruning exactly those leaves the outputs unchanged."""
    model.eval()
    ctx = Context(example_inputs=x)
    groups, _ = find_groups(model, ctx)
    _zero_weakest(model, groups, sparsity)
    before = _call(model, x)
    pruned = copy.deepcopy(model)
    apply_structured(pruned, StructuredConfig(sparsity=sparsity), ctx)
    torch.testing.assert_close(_call(pruned, x), before, rtol=1e-5, atol=1e-5)
    return pruned, ctx


def _call(model: nn.Module, x: object) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the dependency graph --------------------------------------------------------------------


def test_residual_add_couples_stem_conv2_and_their_norms():
    groups = build_graph(Residual().eval(), torch.randn(1, 3, 8, 8)).groups()
    stage = next(g for g in groups if ("stem", "out") in _members(g))
    assert _members(stage) >= {("stem", "out"), ("bn0", "norm"), ("conv2", "out")}
    assert {("bn2", "norm"), ("conv1", "in"), ("fc", "in")} <= _members(stage)
    assert stage.pinned is None
    inner = next(g for g in groups if ("conv1", "out") in _members(g))
    assert _members(inner) == {("conv1", "out"), ("bn1", "norm"), ("conv2", "in")}


def test_concat_offsets_the_consumer_columns():
    groups = build_graph(Concat().eval(), torch.randn(1, 3, 6, 6)).groups()
    b = next(g for g in groups if ("b", "out") in _members(g))
    assert next(m for m in b.members if m.module == "c").offset == 4


def test_flatten_expands_each_channel_into_spatial_features():
    groups = build_graph(Depthwise().eval(), torch.randn(1, 3, 6, 6)).groups()
    proj = next(g for g in groups if ("project", "out") in _members(g))
    fc = next(m for m in proj.members if m.module == "fc")
    assert (fc.role, fc.expand) == ("in", 36)
    expand = next(g for g in groups if ("expand", "out") in _members(g))
    assert {("dw", "depthwise"), ("bn", "norm"), ("project", "in")} <= _members(expand)


def test_gating_couples_the_excitation_with_the_gated_channels():
    groups = build_graph(SqueezeExcite().eval(), torch.randn(1, 3, 6, 6)).groups()
    gated = next(g for g in groups if ("conv", "out") in _members(g))
    assert {("excite", "out"), ("squeeze", "in"), ("project", "in")} <= _members(gated)
    assert gated.pinned is None


def test_token_features_are_the_last_axis():
    groups = build_graph(TokenMLP().eval(), torch.randn(1, 7, 5)).groups()
    hidden = next(g for g in groups if ("embed", "out") in _members(g))
    assert {("down", "out"), ("up", "in"), ("head", "in")} <= _members(hidden)
    assert hidden.pinned is None
    assert not any(("embed", "in") in _members(g) for g in groups)  # inputs are kept


def test_model_inputs_and_outputs_are_pinned():
    groups = build_graph(Residual().eval(), torch.randn(1, 3, 8, 8)).groups()
    assert next(g for g in groups if ("fc", "out") in _members(g)).pinned == (
        "are the model's output"
    )
    assert next(g for g in groups if ("stem", "in") in _members(g)).pinned


def test_grouped_conv_channels_are_kept_and_reported():
    model = Grouped().eval()
    ctx = Context(example_inputs=torch.randn(1, 3, 6, 6))
    apply_structured(model, StructuredConfig(sparsity=0.5), ctx)
    assert model.g.in_channels == model.g.out_channels == 8
    assert model.b.out_channels == 3
    assert any("grouped conv" in why for why in ctx.reports["kept_groups"].values())


# --- exact outputs when the removed channels were zero ----------------------------------------


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (Residual, (2, 3, 8, 8)),
        (Concat, (2, 3, 6, 6)),
        (Depthwise, (2, 3, 6, 6)),
        (SqueezeExcite, (2, 3, 6, 6)),
        (TokenMLP, (2, 7, 5)),
    ],
)
def test_removing_zero_channels_keeps_outputs(factory, shape):
    torch.manual_seed(0)
    model = factory()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    pruned, _ = _prune_zeroed(model, torch.randn(*shape))
    assert _params(pruned) < _params(model)


def test_resnet20_loses_half_of_every_group_and_flops():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    pruned, _ = _prune_zeroed(model, x)
    assert pruned.layer3[2].conv1.out_channels == 32
    assert pruned.fc.in_features == 32 and pruned.fc.out_features == 10
    assert count_flops(pruned, x[:1]) < 0.35 * count_flops(model, x[:1])


def test_mlp_neurons():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    pruned, _ = _prune_zeroed(model, torch.randn(4, 1, 8, 8))
    assert [pruned.fc1.out_features, pruned.fc2.in_features, pruned.fc3.out_features] == [
        64,
        64,
        10,
    ]


# --- transformers: heads and FFN neurons -----------------------------------------------------


def _tiny_bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def test_bert_heads_and_ffn_neurons():
    model, batch = _tiny_bert()
    pruned, ctx = _prune_zeroed(model, batch)
    attn = pruned.encoder.layer[0].attention
    assert attn.self.query.out_features == 16 and attn.self.num_attention_heads == 2
    assert attn.output.dense.in_features == 16
    assert pruned.encoder.layer[1].intermediate.dense.out_features == 32
    assert pruned.encoder.layer[1].output.dense.in_features == 32
    assert ctx.reports["channels"]["encoder.layer.0.attention.self.key (+2 coupled)"] == "2/4"


def test_llama_grouped_query_heads():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=50,
    )
    model = LlamaModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 6))}
    pruned, _ = _prune_zeroed(model, batch)
    attn = pruned.layers[0].self_attn
    assert (attn.k_proj.out_features, attn.q_proj.out_features) == (8, 16)
    assert attn.o_proj.in_features == 16
    assert pruned.layers[0].mlp.up_proj.out_features == 24


# --- importance, scope, FLOPs target ---------------------------------------------------------


@pytest.mark.parametrize("importance", ["l1", "l2", "group_l1", "group_l2", "bn_scale"])
def test_global_flops_target_is_met(importance):
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    ctx = Context(example_inputs=x)
    pruned = copy.deepcopy(model)
    cfg = StructuredConfig(flops_target=0.5, scope="global", importance=importance)
    apply_structured(pruned, cfg, ctx)
    kept = count_flops(pruned, x) / count_flops(model, x)
    assert 0.45 < kept <= 0.5
    assert ctx.reports["flops_kept_predicted"] == pytest.approx(kept, abs=0.01)


@pytest.mark.parametrize("p", [1, 2])
def test_group_norm_covers_every_coupled_parameter(p):
    model = Residual().eval()
    for param in model.parameters():
        param.data.normal_()
    groups = build_graph(model, torch.randn(1, 3, 6, 6)).groups()
    stream = _resnet_group(groups, "stem")  # stem, conv2, bn0, bn2 -> conv1 and fc read it
    got = group_scores(model, groups, f"group_l{p}", Context())[stream]
    parts = [
        model.stem.weight.flatten(1), model.stem.bias[:, None], model.conv2.weight.flatten(1),
        model.bn0.weight[:, None], model.bn0.bias[:, None], model.bn2.weight[:, None],
        model.bn2.bias[:, None], model.conv1.weight.transpose(0, 1).flatten(1), model.fc.weight.T,
    ]  # fmt: skip
    want = torch.cat(parts, dim=1).detach().norm(p=p, dim=1)
    torch.testing.assert_close(got, want)


def test_round_counts_up_or_to_the_nearest_multiple():
    sizes, removed = [16, 16, 64, 5], [7, 3, 29, 2]  # keeps 9, 13, 35, 3
    assert round_counts(sizes, removed, 8) == [0, 0, 24, 0]  # keeps 16, 16, 40, 5
    assert round_counts(sizes, removed, 8, nearest=True) == [8, 0, 32, 0]  # 8, 16, 32, 5


def _resnet_group(groups, conv: str):
    return next(i for i, g in enumerate(groups) if any(m.module == conv for m in g.producers))


def test_channel_costs_are_the_flops_one_channel_saves():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    ctx = Context(example_inputs=torch.randn(1, 3, 32, 32))
    groups = build_graph(model, ctx.example_inputs).groups()
    costs = channel_costs(
        groups, layer_flops(model, ctx), float(count_flops(model, ctx.example_inputs))
    )
    # a block's inner channel: conv1's filter and conv2's input slice, 2·C·9·H·W each
    stage1 = costs[_resnet_group(groups, "layer1.0.conv1")]
    stage3 = costs[_resnet_group(groups, "layer3.1.conv1")]
    assert stage1 / stage3 == pytest.approx((16 * 32 * 32) / (64 * 8 * 8))
    assert sum(costs) / len(costs) == pytest.approx(1.0)


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_flops_aware_ranking_spends_the_budget_on_cheap_channels():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    kept = {}
    for aware in (False, True):
        pruned = copy.deepcopy(model)
        cfg = StructuredConfig(flops_target=0.5, scope="global", importance="l2", flops_aware=aware)
        apply_structured(pruned, cfg, Context(example_inputs=x))
        assert count_flops(pruned, x) / count_flops(model, x) <= 0.5
        kept[aware] = [
            sum(m.out_channels for n, m in _convs(pruned) if n.startswith(f"layer{s}."))
            for s in (1, 2, 3)
        ]
    assert kept[True][0] < kept[False][0]  # costly 32×32 channels go first
    assert kept[True][2] > kept[False][2]  # cheap 8×8 channels stay


def test_flops_aware_needs_a_global_flops_target():
    for params in ({"flops_aware": True}, {"flops_aware": True, "flops_target": 0.5}):
        with pytest.raises(ConfigError, match="flops_aware ranks channels against a FLOPs budget"):
            parse_config(StructuredConfig, params, owner="prune.structured")


def test_iterative_steps_reach_a_fraction_of_the_original_flops():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    steps = [
        {
            "technique": "prune.structured",
            "flops_target": f,
            "flops_of": "original",
            "scope": "global",
        }
        for f in (0.8, 0.65, 0.5)
    ]
    result = mp.compress(model, steps, example_inputs=x, evaluate=lambda m: {}, latency_runs=0)
    kept = [r.learned["flops_kept_predicted"] for r in result.stages]
    assert kept[0] <= 0.8 and kept[1] <= 0.65 and kept[2] <= 0.5
    assert 0.48 < count_flops(result.model, x) / count_flops(model, x) <= 0.5


def test_flops_of_original_needs_the_pipeline():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    cfg = StructuredConfig(flops_target=0.5, flops_of="original")
    with pytest.raises(ConfigError, match="flops_of 'original' needs the pipeline's original"):
        apply_structured(model, cfg, Context(example_inputs=torch.randn(1, 1, 8, 8)))


def test_round_to_keeps_simd_widths_and_refills_the_flops_budget():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = copy.deepcopy(model)
    cfg = StructuredConfig(flops_target=0.5, scope="global", round_to=8)
    apply_structured(pruned, cfg, Context(example_inputs=x))
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    assert 0.48 < count_flops(pruned, x) / count_flops(model, x) <= 0.5  # budget used


def test_taylor_uses_labelled_batches(digits):
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    result = mp.compress(
        model,
        recipe=[{"technique": "prune.structured", "importance": "taylor", "n_batches": 2}],
        data=digits,
        latency_runs=0,
    )
    assert result.model.fc1.out_features == 64


def test_taylor_scores_leave_batch_norm_statistics_and_modes_as_they_were():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).train()
    model.layer1[0].bn1.eval()  # a deliberately frozen batch norm stays frozen
    groups = build_graph(model, torch.randn(2, 3, 32, 32)).groups()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    scores = taylor_scores(model, groups, [batch], Context())
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())
    assert any(s.sum() > 0 for s in scores)


def test_taylor_without_data_is_a_clear_error():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(DataError, match="taylor"):
        apply_structured(model, StructuredConfig(importance="taylor"), ctx)


def test_round_to_and_layer_overrides():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    cfg = StructuredConfig(sparsity=0.3, round_to=8, layer_sparsity={"fc2": 0.75})
    apply_structured(model, cfg, ctx)
    assert model.fc1.out_features == 96  # 128 - 38 = 90, rounded up to 96
    assert model.fc2.out_features == 16


def test_ignored_layer_keeps_its_outputs():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    apply_structured(model, StructuredConfig(ignore=["fc1"]), ctx)
    assert (model.fc1.out_features, model.fc2.out_features) == (128, 32)
    assert ctx.reports["kept_groups"]["fc1"] == "fc1 is not targeted"


# --- pipeline, artifact replay ---------------------------------------------------------------


def test_replayed_on_load(tmp_path, digits):
    model = mp.load_model("zoo:resnet20", input_shape=[1, 8, 8], num_classes=10)
    result = mp.compress(
        model,
        recipe=[{"technique": "prune.structured", "flops_target": 0.5, "scope": "global"}],
        data=digits,
        latency_runs=0,
    )
    path = result.save(tmp_path / "pruned")
    loaded = mp.load(path)
    x = digits.test.tensors[0][:4]
    torch.testing.assert_close(_call(loaded, x), _call(result.model.eval(), x))
    assert loaded.layer3[0].conv1.out_channels == result.model.layer3[0].conv1.out_channels
    assert result.stages[-1].metrics["bytes"] < 0.75 * result.baseline["bytes"]


def test_then_quantize_and_reload(tmp_path):
    torch.manual_seed(0)
    model = tag_source(Concat(), ModelSource(f"import:{__name__}:Concat", {}))
    x = torch.randn(3, 3, 6, 6)
    result = mp.compress(
        model,
        recipe=[
            {"technique": "prune.structured", "sparsity": 0.5},
            {"technique": "quant.rtn", "bits": 8},
        ],
        data=[(x, torch.zeros(3, dtype=torch.long))],
        latency_runs=0,
    )
    loaded = mp.load(result.save(tmp_path / "pq"))
    torch.testing.assert_close(_call(loaded, x), _call(result.model.eval(), x))
    assert loaded.c.in_channels == 5


# --- errors: one line, nothing changed --------------------------------------------------------


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_untraceable_model_is_named():
    model = Branchy()
    ctx = Context(example_inputs=torch.randn(1, 4))
    with pytest.raises(UnsupportedModuleError, match="cannot trace Branchy") as err:
        apply_structured(model, StructuredConfig(), ctx)
    assert "\n" not in str(err.value)


def test_named_target_that_cannot_be_pruned():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    before = _state(model)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(UnsupportedModuleError, match=r"fc3: .*model's output"):
        apply_structured(model, StructuredConfig(targets=["fc1", "fc3"]), ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreachable_flops_target():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(UnsupportedModuleError, match="out of reach"):
        apply_structured(model, StructuredConfig(flops_target=0.01, max_sparsity=0.5), ctx)


def test_masked_model_is_refused_untouched():
    model = mp.load_model("zoo:mlp", input_shape=[1, 8, 8], num_classes=10)
    masked = mp.compress(model, recipe=[{"technique": "prune.magnitude"}], latency_runs=0).model
    before = _state(masked)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(UnsupportedModuleError, match="before techniques that mask"):
        apply_structured(masked, StructuredConfig(), ctx)
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())
