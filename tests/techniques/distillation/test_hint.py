"""distill.hint: the pure losses and pooling, adapters that train and stay out of the artifact,
embedding distillation of an encoder from unlabeled text, and every error path."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.config import parse_config
from modelpress.context import Context, forward
from modelpress.errors import ConfigError, DataError, NoMatchingModulesError, UnsupportedModuleError
from modelpress.techniques.distillation.hint import (
    HintConfig,
    apply_hint,
    feature_loss,
    make_adapter,
    mean_pool,
    pooled,
)
from modelpress.testing import tiny_convnet
from modelpress.train import TrainConfig, fit

OWNER = "distill.hint"


def make_mlp(bundle, hidden, seed=0):
    torch.manual_seed(seed)
    return mp.load_model(
        "zoo:mlp", input_shape=list(bundle.input_shape), num_classes=10, hidden=hidden
    )


def hint(**params):
    return parse_config(HintConfig, params, owner=OWNER)


# --- pure functions -----------------------------------------------------------------------------


def test_feature_losses_have_their_textbook_values():
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 1.0], [6.0, 8.0]])
    # mse: mean over everything of (s - t)^2 = (1 + 1 + 9 + 16) / 4
    assert feature_loss(s, t, "mse").item() == pytest.approx(27 / 4)
    # cosine: row 1 orthogonal (1 - 0), row 2 parallel (1 - 1)
    assert feature_loss(s, t, "cosine").item() == pytest.approx(0.5)
    maps = torch.randn(2, 3, 4, 4)  # conv maps: the cosine runs along channels (dim 1)
    expected = (1 - F.cosine_similarity(maps, maps.flip(1), dim=1)).mean()
    assert feature_loss(maps, maps.flip(1), "cosine").item() == pytest.approx(expected.item())


def test_feature_loss_and_mean_pool_ignore_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.allclose(mean_pool(h, mask)[1], h[1, :2].mean(0))
    assert torch.allclose(mean_pool(h), h.mean(1))
    t = h.clone()
    t[mask == 0] = 50.0  # differences only where the mask is 0
    assert feature_loss(h, t, "mse", mask).item() == pytest.approx(0.0)
    assert feature_loss(h, t, "mse").item() > 1.0


def test_adapters_are_linear_on_the_last_dim_or_1x1_convs():
    assert make_adapter(torch.Size([2, 8]), torch.Size([2, 8]), "p", 0) is None
    lin = make_adapter(torch.Size([2, 5, 8]), torch.Size([2, 5, 12]), "p", 0)
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (8, 12)
    conv = make_adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 16, 4, 4]), "p", 0)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 16
    again = make_adapter(torch.Size([2, 5, 8]), torch.Size([2, 5, 12]), "p", 0)
    assert torch.equal(lin.weight, again.weight)  # seeded
    with pytest.raises(UnsupportedModuleError, match=r"student shape \(2, 8, 4, 4\) and teacher "
                       r"shape \(2, 16, 2, 2\) differ beyond the feature width"):  # fmt: skip
        make_adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 16, 2, 2]), "p", 0)


def test_pooling_kinds(make_bert, tokens):
    model = make_bert(1)
    batch = tokens(1, batch=2, seq=6)[0]
    out = forward(model, batch)
    h, m = out.last_hidden_state, batch["attention_mask"]
    assert torch.allclose(pooled(out, "mean", m), mean_pool(h, m))
    assert torch.equal(pooled(out, "cls", m), h[:, 0])
    assert torch.equal(pooled(torch.ones(2, 3), "output", None), torch.ones(2, 3))
    with pytest.raises(UnsupportedModuleError, match=r"model returns shape \(2, 3\); use "
                       "embedding: output"):  # fmt: skip
        pooled(torch.ones(2, 3), "mean", None)


# --- training -----------------------------------------------------------------------------------


def test_adapters_train_and_are_not_in_the_artifact(trained, tmp_path):
    teacher, bundle = trained  # fc1: 128 wide, fc2: 64 wide
    student = make_mlp(bundle, (32, 16), seed=0)
    ctx = Context(data=bundle, teacher=teacher, example_inputs=bundle.test.tensors[0][:1])
    apply_hint(student, hint(pairs={"fc1": "fc1", "fc2": "fc2"}), ctx)
    callback = ctx.callbacks[0]
    adapters = {k: (m.in_features, m.out_features) for k, m in callback.adapters.items()}
    assert adapters == {"fc1": (32, 128), "fc2": (16, 64)}
    start = copy.deepcopy(callback.adapters.state_dict())
    fit(student, TrainConfig(epochs=3, lr=3e-3), ctx, ctx.callbacks)
    assert not torch.equal(start["fc1.weight"], callback.adapters.fc1.weight)  # trained
    assert callback.history[-1] < 0.5 * callback.history[0]
    assert ctx.reports["hint_loss"]["last"] < ctx.reports["hint_loss"]["first"]
    for model in (student, teacher):  # hooks are gone
        assert all(not m._forward_hooks for m in model.modules())
    path = mp.save(student, tmp_path / "student")
    names = set(json.loads((path / "manifest.json").read_text())["tensors"])
    assert names == set(student.state_dict())  # the student only: no adapter
    x = bundle.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(mp.load(path)(x), student.eval()(x))


def test_conv_hint_gets_a_1x1_conv_adapter(digits):
    teacher, student = tiny_convnet(), tiny_convnet()
    ctx = Context(data=digits, teacher=teacher, example_inputs=digits.test.tensors[0][:1])
    apply_hint(student, hint(pairs={"conv1": "conv2"}, loss="cosine"), ctx)  # 8 -> 16 channels
    callback = ctx.callbacks[0]
    assert isinstance(callback.adapters.conv1, nn.Conv2d)
    fit(student, TrainConfig(max_steps=30, lr=1e-2), ctx, ctx.callbacks)
    assert callback.history[-1] < callback.history[0]


def embedding_cosine(student, teacher, batches):
    with torch.no_grad():
        cos = []
        for b in batches:
            m = b["attention_mask"]
            s = mean_pool(forward(student.eval(), b).last_hidden_state, m)
            t = mean_pool(forward(teacher.eval(), b).last_hidden_state, m)
            cos.append(F.cosine_similarity(s, t).mean())
    return float(torch.stack(cos).mean())


@pytest.mark.parametrize(("loss", "student_width"), [("cosine", 32), ("mse", 16)])
def test_embedding_distillation_from_unlabeled_text(make_bert, tokens, loss, student_width):
    teacher, student = make_bert(2, 32, 2, seed=0), make_bert(1, student_width, 2, seed=1)
    train, held_out = tokens(8, seed=0), tokens(2, seed=1)
    stages = [
        {"technique": OWNER, "embedding": "mean", "loss": loss, "task_weight": 0},
        {"technique": "train", "epochs": 4, "lr": 3e-3},
    ]
    result = mp.compress(student, stages, data=train, teacher=teacher, latency_runs=0)
    report = result.stages[-1].learned["hint_loss"]
    assert report["last"] < 0.6 * report["first"]
    if student_width == teacher.config.hidden_size:  # comparable without the adapter
        before = embedding_cosine(student, teacher, held_out)
        after = embedding_cosine(result.model, teacher, held_out)
        assert after > before + 0.1, (before, after)


def test_an_hf_folder_teacher_gives_the_same_student(make_bert, tokens, tmp_path):
    teacher, student = make_bert(2, seed=0), make_bert(1, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    batches = tokens(2)
    train = {"technique": "train", "max_steps": 3, "lr": 1e-3}
    stage = {"technique": OWNER, "embedding": "cls", "task_weight": 0}
    by_ctx = mp.compress(student, [stage, train], data=batches, teacher=teacher, latency_runs=0)
    by_spec = mp.compress(student, [{**stage, "teacher": f"hf:{tmp_path / 'teacher'}"}, train],
                          data=batches, latency_runs=0)  # fmt: skip
    for k, v in by_ctx.model.state_dict().items():
        assert torch.equal(v, by_spec.model.state_dict()[k]), k


def test_unlabeled_batches_need_task_weight_zero(make_bert, tokens):
    teacher, student = make_bert(2, seed=0), make_bert(1, seed=1)
    stages = [{"technique": OWNER, "embedding": "mean"}, {"technique": "train", "max_steps": 2}]
    with pytest.raises(DataError, match="training needs labelled batches"):
        mp.compress(student, stages, data=tokens(2), teacher=teacher, latency_runs=0)


# --- errors -------------------------------------------------------------------------------------


def test_a_config_must_ask_for_pairs_or_an_embedding():
    with pytest.raises(ConfigError, match="Invalid parameters for distill.hint: nothing to "
                       "distil: give 'pairs'"):  # fmt: skip
        hint()
    with pytest.raises(ConfigError, match="The 'loss' parameter of distill.hint must be one of "
                       "'mse', 'cosine'. Got 'l1' instead."):  # fmt: skip
        hint(pairs={"fc1": "fc1"}, loss="l1")


def test_unknown_module_names_are_named(trained):
    teacher, bundle = trained
    student = make_mlp(bundle, (32, 16))
    ctx = Context(data=bundle, teacher=teacher, example_inputs=bundle.test.tensors[0][:1])
    with pytest.raises(NoMatchingModulesError, match=r"distill.hint: student module\(s\) 'fc9', "
                       "'head' not found; modules include: flatten, fc1"):  # fmt: skip
        apply_hint(student, hint(pairs={"fc9": "fc1", "head": "fc2", "fc1": "fc1"}), ctx)
    with pytest.raises(NoMatchingModulesError, match=r"teacher module\(s\) 'fc7' not found"):
        apply_hint(student, hint(pairs={"fc1": "fc7"}), ctx)
    assert ctx.callbacks == []


def test_pairs_of_incompatible_shapes_and_poolings_are_rejected(digits):
    teacher, student = tiny_convnet(), tiny_convnet()
    ctx = Context(data=digits, teacher=teacher, example_inputs=digits.test.tensors[0][:1])
    with pytest.raises(UnsupportedModuleError, match=r"pair 'fc' -> 'conv1': student shape "
                       r"\(1, 10\) and teacher shape \(1, 8, 8, 8\) differ"):  # fmt: skip
        apply_hint(student, hint(pairs={"fc": "conv1"}), ctx)
    with pytest.raises(UnsupportedModuleError, match="embedding 'cls' pools"):
        apply_hint(student, hint(embedding="cls"), ctx)
    assert ctx.callbacks == []


class Silent(nn.Module):
    """A model with a submodule whose output is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.probe = nn.Module()
        self.probe.forward = lambda x: None  # returns nothing to capture

    def forward(self, x):
        self.probe(x)
        return self.fc(x.flatten(1))


def test_a_module_without_tensor_output_is_named(digits):
    student = Silent()
    ctx = Context(teacher=Silent(), example_inputs=digits.test.tensors[0][:1])
    with pytest.raises(UnsupportedModuleError, match="module 'probe' produced no tensor output"):
        apply_hint(student, hint(pairs={"probe": "fc"}), ctx)
