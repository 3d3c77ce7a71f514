"""ONNX export of early-exit models: the file stops at the first confident exit per sample,
exactly as the torch model does, batched and at batch 1; and what cannot be cut is refused."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import UnsupportedModuleError
from modelpress.registry import get_technique
from modelpress.runtime import OrtModule, export_onnx
from modelpress.techniques.early_exit.heads import entropy, max_prob
from modelpress.techniques.early_exit.model import exit_outputs
from modelpress.testing import tiny_convnet

NAME = "early_exit.branches"


def with_exits(model: nn.Module, x: torch.Tensor, exits: list[str], **params) -> nn.Module:
    """``model`` with untrained heads after ``exits``, each threshold halfway between the two
    middle entropies of its head on ``x``: every exit takes some samples and passes others on,
    and none sits on the threshold, where float rounding could send it either way."""
    stage = mp.Stage.of(NAME, exits=exits, thresholds=[0.5] * len(exits), **params)
    ee = get_technique(NAME).apply(model, stage.config, Context(example_inputs=x[:1])).eval()
    score = entropy if ee.criterion == "entropy" else max_prob
    middles = [
        score(z).sort().values[len(x) // 2 - 1 : len(x) // 2 + 1] for z in exit_outputs(ee, x)[:-1]
    ]
    ee.set_thresholds([float(m.mean()) for m in middles])
    return ee


def if_depth(graph: onnx.GraphProto) -> int:
    """How deeply ``If`` nodes nest in ``graph``: k + 1 for k enabled exits (one per exit —
    does every sample leave? — and, inside the last, the pair that picks who goes on and
    puts their logits back), 0 without exits."""
    depths = [
        1 + max(if_depth(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        for node in graph.node
        if node.op_type == "If"
    ]
    return max(depths, default=0)


def exported(model: nn.Module, x: torch.Tensor, path, **kwargs) -> tuple[OrtModule, int]:
    """The exported file's session and the nesting depth of its ``If`` nodes."""
    result = export_onnx(model, x[:2], path, **kwargs)
    return OrtModule(result.path), if_depth(onnx.load(str(result.path)).graph)


@torch.no_grad()
def test_two_exits_export_as_nested_branches_that_match_torch(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:200]
    model = with_exits(mlp, x, ["relu1", "relu2"])
    expected, used = model(x), model.last_exit_index
    assert sorted(set(used.tolist())) == [0, 1, 2]  # a mix of all three outputs
    session, depth = exported(model, x, tmp_path / "ee.onnx", mode="fp32")
    assert depth == 3
    assert torch.allclose(session(x), expected, atol=1e-5)
    for i in (*torch.nonzero(used == 0)[:2, 0], *torch.nonzero(used == 2)[:2, 0]):
        row = x[int(i) : int(i) + 1]
        assert torch.allclose(session(row), model(row), atol=1e-5)  # batch 1, both branches


def ops(graph: onnx.GraphProto) -> list[str]:
    """The op type of every node in ``graph`` and, recursively, in its ``If`` branches."""
    found = []
    for node in graph.node:
        found.append(node.op_type)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found += ops(a.g)
    return found


@torch.no_grad()
def test_every_piece_appears_once_however_many_exits(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:200]
    for exits in (["relu1"], ["relu1", "relu2"], ["fc1", "relu1", "relu2"]):
        model = with_exits(copy.deepcopy(mlp), x, exits)
        path = export_onnx(model, x[:2], tmp_path / f"{len(exits)}.onnx", mode="fp32").path
        found = ops(onnx.load(str(path)).graph)
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert found.count("Gemm") + found.count("MatMul") == linears  # no copies
        assert found.count("If") == 3 * len(exits)
        assert torch.allclose(OrtModule(path)(x), model(x), atol=1e-5)


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax takes its axes as an input from 18
@torch.no_grad()
def test_max_prob_exits_export_at_every_opset(mlp, digits, tmp_path, opset):
    x = digits.test.tensors[0][:200]
    model = with_exits(mlp, x, ["relu1", "relu2"], criterion="max_prob")
    expected, used = model(x), model.last_exit_index
    assert sorted(set(used.tolist())) == [0, 1, 2]
    session, depth = exported(model, x, tmp_path / "ee.onnx", opset=opset)
    assert depth == 3 and torch.allclose(session(x), expected, atol=1e-5)


@torch.no_grad()
def test_conv_exit_exports_and_the_quantized_backbone_keeps_its_integer_ops(digits, tmp_path):
    x = digits.test.tensors[0][:120]
    model = with_exits(tiny_convnet(), x, ["conv1"], hidden=16)
    stage = mp.Stage.of("quant.int8_dynamic", targets=["backbone.fc"])
    model = mp.compress(model, [stage], latency_runs=0).model.eval()
    expected, used = model(x), model.last_exit_index
    assert 0 < int((used == 0).sum()) < len(x)
    session, depth = exported(model, x, tmp_path / "ee.onnx")
    assert depth == 2
    assert torch.allclose(session(x), expected, atol=1e-4)
    ops = {n.op_type for g in _graphs(onnx.load(str(tmp_path / "ee.onnx")).graph) for n in g.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


@torch.no_grad()
def test_a_disabled_exit_is_no_branch_and_none_enabled_is_the_backbone(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:64]
    model = with_exits(mlp, x, ["relu1", "relu2"])
    model.set_thresholds([None, model.threshold_values()[1]])
    session, depth = exported(model, x, tmp_path / "one.onnx")
    assert depth == 2 and torch.allclose(session(x), model(x), atol=1e-5)
    model.set_thresholds([None, None])
    session, depth = exported(model, x, tmp_path / "none.onnx")
    assert depth == 0 and torch.allclose(session(x), model.backbone(x), atol=1e-5)


@torch.no_grad()
def test_a_saved_early_exit_artifact_exports_after_load(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:64]
    model = with_exits(mlp, x, ["relu1"])
    result = mp.compress(model, [mp.Stage.of("prune.magnitude", sparsity=0.5)], latency_runs=0)
    loaded = mp.load(result.save(tmp_path / "art")).eval()
    session, depth = exported(loaded, x, tmp_path / "ee.onnx")
    assert depth == 2 and torch.allclose(session(x), result.model.eval()(x), atol=1e-5)


class _Functional(nn.Module):
    """Parameters read directly in ``forward`` (``get_attr`` nodes), before and after the exit."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.scale = nn.Parameter(torch.randn(64, 16) / 8), nn.Parameter(torch.rand(10))
        self.act, self.out = nn.ReLU(), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(x.flatten(1) @ self.w)) * self.scale


@torch.no_grad()
def test_parameters_read_in_forward_go_to_the_segment_that_reads_them(digits, tmp_path):
    torch.manual_seed(0)
    x = digits.test.tensors[0][:64]
    model = with_exits(_Functional(), x, ["act"])
    session, depth = exported(model, x, tmp_path / "ee.onnx")
    assert depth == 2 and torch.allclose(session(x), model(x), atol=1e-5)


class _Skip(nn.Module):
    """A residual block whose input is added back after ``inner``: no cut at ``inner``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.inner, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x.flatten(1)))
        return self.out(h + torch.relu(self.inner(h)))


class _Branchy(nn.Module):
    """Python control flow on values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        return self.fc2(h if h.sum() > 0 else -h)


@pytest.mark.parametrize(
    ("backbone", "exit_name", "message"),
    [
        (_Skip, "inner", "still reads ['relu'] (a skip connection over the exit)"),
        (_Branchy, "fc1", "torch.fx cannot trace _Branchy"),
    ],
)
def test_exits_that_are_no_cut_are_refused_and_nothing_is_written(
    backbone, exit_name, message, digits, tmp_path
):
    torch.manual_seed(0)
    x = digits.test.tensors[0][:32]
    model = with_exits(backbone(), x, [exit_name])
    path = tmp_path / "ee.onnx"
    with pytest.raises(UnsupportedModuleError, match="early_exit export") as info:
        export_onnx(model, x[:2], path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_an_early_exit_model_inside_a_wrapper_is_refused(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:32]
    wrapper = nn.Sequential(with_exits(mlp, x, ["relu1"]))
    with pytest.raises(UnsupportedModuleError, match="only as the top-level model"):
        export_onnx(wrapper, x[:2], tmp_path / "ee.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_model_unchanged(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:64]
    model = with_exits(mlp, x, ["relu1"])
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    export_onnx(model, x[:2], tmp_path / "ee.onnx")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected) and not model.training


@torch.no_grad()
def test_fp16_export_tests_the_exits_in_half_precision(mlp, digits, tmp_path):
    x = digits.test.tensors[0][:200]
    model = with_exits(mlp, x, ["relu1", "relu2"])
    session, depth = exported(model, x, tmp_path / "ee.onnx", mode="fp16")
    got = session(x.half())
    assert depth == 3 and got.dtype == torch.float16
    # half-precision entropies move samples near a threshold to the other exit: most agree
    agree = (got.float().argmax(1) == model(x).argmax(1)).double().mean()
    assert agree >= 0.95
