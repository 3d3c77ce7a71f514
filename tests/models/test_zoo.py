"""Tests for modelpress.models.zoo: shapes, parameter counts, layer names, errors."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import ModelError, UnknownNameError
from modelpress.models.zoo import ZOO, build_zoo_model, zoo_names

SHAPES = [(1, 8, 8), (1, 28, 28)]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet5", "mlp"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_shapes(name: str, shape: tuple[int, ...]) -> None:
    model = build_zoo_model(name, input_shape=shape, num_classes=10)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_parameter_counts_match_han_2015() -> None:
    mnist = {"input_shape": (1, 28, 28), "num_classes": 10}
    assert n_params(build_zoo_model("lenet-300-100", **mnist)) == 266_610
    assert n_params(build_zoo_model("lenet5", **mnist)) == 431_080


def test_layer_names() -> None:
    lenet = build_zoo_model("lenet-300-100", input_shape=(1, 28, 28), num_classes=10)
    assert {"flatten", "fc1", "fc2", "fc3"} <= {n for n, _ in lenet.named_children()}
    assert lenet.fc1.in_features == 784 and lenet.fc3.out_features == 10
    lenet5 = build_zoo_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    assert lenet5.conv1.out_channels == 20 and lenet5.conv2.out_channels == 50
    assert lenet5.conv1.padding == (0, 0) and lenet5.fc1.in_features == 800
    assert lenet5.fc2.out_features == 10


def test_lenet5_pads_small_inputs() -> None:
    model = build_zoo_model("lenet5", input_shape=(1, 8, 8), num_classes=10)
    assert model.conv1.padding == (2, 2) and model.fc1.in_features == 50 * 2 * 2


def test_mlp_hidden_dropout_and_list_kwargs() -> None:
    model = build_zoo_model("mlp", input_shape=[64], num_classes=3, hidden=[32, 16, 8], dropout=0.5)
    linears = [n for n, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    assert linears == ["fc1", "fc2", "fc3", "fc4"]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 3
    model.eval()
    x = torch.randn(4, 64)
    assert torch.equal(model(x), model(x))
    linear = build_zoo_model("mlp", input_shape=(64,), num_classes=3, hidden=())
    assert [n for n, _ in linear.named_children()] == ["flatten", "fc1"]


def test_registry() -> None:
    assert zoo_names() == ["lenet-300-100", "lenet5", "mlp"]
    assert all(entry.description and "\n" not in entry.description for entry in ZOO.values())


def test_unknown_name_suggests() -> None:
    with pytest.raises(UnknownNameError, match="zoo model 'lenet-5'.*did you mean 'lenet5'"):
        build_zoo_model("lenet-5", input_shape=(1, 28, 28), num_classes=10)


def test_bad_kwargs_list_accepted() -> None:
    expected = "unexpected keyword argument 'hidden'.*accepted kwargs are "
    expected += "input_shape, num_classes$"
    with pytest.raises(ModelError, match=expected):
        build_zoo_model("lenet5", input_shape=(1, 28, 28), num_classes=10, hidden=(3,))
    with pytest.raises(ModelError, match="missing a required argument: 'num_classes'.*accepted"):
        build_zoo_model("mlp", input_shape=(1, 8, 8))


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("mlp", {"input_shape": (0, 8), "num_classes": 10}, "input_shape must be positive ints"),
        ("mlp", {"input_shape": (64,), "num_classes": 0}, "num_classes must be an int >= 1"),
        ("mlp", {"input_shape": (64,), "num_classes": 2, "hidden": (8, -1)}, "hidden must be"),
        ("mlp", {"input_shape": (64,), "num_classes": 2, "dropout": 1.0}, r"dropout .* \[0, 1\)"),
        ("lenet5", {"input_shape": (64,), "num_classes": 2}, r"input_shape must be \(C, H, W\)"),
        ("lenet5", {"input_shape": (1, 2, 2), "num_classes": 2}, "too small for LeNet-5"),
    ],
)
def test_bad_values(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_zoo_model(name, **kwargs)
