"""Tests for modelpress.models.zoo: shapes, parameter counts, layer names, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelpress
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
    assert zoo_names()[:3] == ["lenet-300-100", "lenet5", "mlp"]
    assert zoo_names()[3:] == ["resnet20", "resnet32", "resnet56"]
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


RESNETS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}  # name -> blocks per stage


def cifar_resnet_params(n: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """Parameters of a CIFAR ResNet-(6n+2), counted layer by layer (convs have no bias)."""
    bn = 2  # weight and bias per channel
    stem = in_channels * 16 * 9 + 16 * bn
    total, c_in = stem, 16
    for c in (16, 32, 64):
        for _ in range(n):
            block = c_in * c * 9 + c * bn + c * c * 9 + c * bn
            if c_in != c:  # downsample: 1x1 conv + BatchNorm
                block += c_in * c + c * bn
            total, c_in = total + block, c
    return total + 64 * num_classes + num_classes


def test_cifar_resnet_param_formula() -> None:
    assert cifar_resnet_params(3) == 272_474  # He et al. 2016: 0.27M
    assert cifar_resnet_params(5) == 466_906  # 0.46M
    assert cifar_resnet_params(9) == 855_770  # 0.85M


@pytest.mark.parametrize(("name", "n"), RESNETS.items())
def test_resnet_forward_and_params(name: str, n: int) -> None:
    torch.manual_seed(0)
    model = build_zoo_model(name, input_shape=(3, 32, 32), num_classes=10)
    assert n_params(model) == cifar_resnet_params(n)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == n


def test_resnet20_names_match_distiller_checkpoint() -> None:
    model = build_zoo_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    names = {name for name, _ in model.named_modules()}
    assert {"conv1", "bn1", "layer2.0.downsample.0", "layer3.0.downsample.1", "fc"} <= names
    assert "layer1.0.downsample" not in names and "layer2.1.downsample" not in names
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 107  # the Distiller checkpoint's tensor count
    assert "layer3.2.bn2.running_var" in keys and "fc.bias" in keys
    modules = [id(m) for m in model.modules()]
    assert len(modules) == len(set(modules))  # no module (e.g. a ReLU) registered twice


def test_resnet_other_shapes_and_errors() -> None:
    model = build_zoo_model("resnet20", input_shape=(1, 20, 24), num_classes=4)
    assert model(torch.randn(2, 1, 20, 24)).shape == (2, 4)
    assert n_params(model) == cifar_resnet_params(3, num_classes=4, in_channels=1)
    with pytest.raises(ModelError, match=r"zoo:resnet32: input_shape must be \(C, H, W\)"):
        build_zoo_model("resnet32", input_shape=(3, 32), num_classes=10)
    with pytest.raises(ModelError, match="zoo:resnet56: num_classes must be an int >= 1"):
        build_zoo_model("resnet56", input_shape=(3, 32, 32), num_classes=0)


def test_resnet20_load_model_and_artifact_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = modelpress.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode uses them
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    loaded = modelpress.load(modelpress.save(model, tmp_path / "resnet20"))
    assert not loaded.training and type(loaded).__name__ == "CifarResNet"
    assert torch.equal(loaded(x), expected)
