"""An ensemble teacher (``compress(teacher=[...])``): mean logits, unchanged members, KD from it
equal to KD from the averaged model, and its error paths."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.techniques.distillation.ensemble import LogitEnsemble, as_teacher


class Fixed(nn.Module):
    """Returns ``scale * x`` as a tensor or wrapped in an object with ``.logits``."""

    def __init__(self, scale: float, wrapped: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.wrapped = wrapped

    def forward(self, x):
        out = self.scale * x
        return SimpleNamespace(logits=out) if self.wrapped else out


def test_the_ensemble_returns_the_mean_of_its_members_logits():
    x = torch.randn(4, 3)
    ensemble = as_teacher([Fixed(1.0), Fixed(2.0, wrapped=True), Fixed(6.0)])
    assert isinstance(ensemble, LogitEnsemble)
    torch.testing.assert_close(ensemble(x), 3.0 * x)


def test_averaged_logits_give_the_geometric_mean_of_the_members_softmax():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    temp = 4.0
    mean = torch.softmax((a + b) / 2 / temp, -1)
    geometric = (torch.softmax(a / temp, -1) * torch.softmax(b / temp, -1)).sqrt()
    torch.testing.assert_close(mean, geometric / geometric.sum(-1, keepdim=True))


def scaled(model: nn.Module, factor: float) -> nn.Module:
    """A copy of ``model`` whose logits are ``factor`` times the original's."""
    copied = copy.deepcopy(model)
    last = [m for m in copied.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return copied


def test_kd_from_an_ensemble_equals_kd_from_one_model_with_the_mean_logits(trained):
    teacher, bundle = trained
    half, three_quarters = scaled(teacher, 0.5), scaled(teacher, 0.75)  # [z, z/2] -> 0.75 z
    state = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(7)
    student = mp.load_model("zoo:mlp", input_shape=list(bundle.input_shape),
                            num_classes=bundle.num_classes, hidden=(16,))  # fmt: skip
    stages = [mp.Stage.of("distill.kd", temperature=3.0), mp.Stage.of("train", epochs=2, lr=3e-3)]
    by_list = mp.compress(student, stages, data=bundle, teacher=[teacher, half], latency_runs=0)
    by_one = mp.compress(student, stages, data=bundle, teacher=three_quarters, latency_runs=0)
    for k, v in by_list.model.state_dict().items():
        torch.testing.assert_close(v, by_one.model.state_dict()[k], msg=k)
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ([], "teacher= got an empty list"),
        ("zoo:mlp", "teacher= got str"),
        ([nn.Linear(2, 2), "x"], r"item 1 is a str, not an nn.Module"),
    ],
)
def test_a_bad_teacher_argument_is_a_one_line_config_error(trained, teacher, message):
    model, bundle = trained
    with pytest.raises(ConfigError, match=message) as info:
        mp.compress(model, [mp.Stage.of("distill.kd"), mp.Stage.of("train", epochs=1)],
                    data=bundle, teacher=teacher, latency_runs=0)  # fmt: skip
    assert "\n" not in str(info.value)


def test_members_with_different_outputs_are_rejected():
    class Words(nn.Module):
        def forward(self, x):
            return "no tensor"

    with pytest.raises(UnsupportedModuleError, match="member 1: the model returns str"):
        LogitEnsemble([Fixed(1.0), Words()])(torch.ones(2, 3))
    with pytest.raises(UnsupportedModuleError, match="logits of different shapes"):
        LogitEnsemble([Fixed(1.0), nn.Linear(3, 4)])(torch.ones(2, 3))
