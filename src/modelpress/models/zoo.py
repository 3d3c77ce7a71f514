"""Small reference models (``zoo:NAME``): LeNet-300-100, LeNet-5, a plain MLP and CIFAR ResNets.

Every builder takes keyword arguments ``input_shape`` (one sample, e.g. ``(1, 28, 28)``)
and ``num_classes``, plus its own, and returns an ``nn.Module`` with named layers
(``fc1``, ``conv1``, ...) so selectors and saved structure edits can refer to them.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.errors import ModelError, UnknownNameError, suggest


@dataclass(frozen=True)
class ZooEntry:
    """A registered zoo model: its builder and a one-line description for the CLI."""

    builder: Callable[..., nn.Module]
    description: str


ZOO: dict[str, ZooEntry] = {}


def _register(name: str, description: str) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Decorator adding a builder to ``ZOO`` under ``name``."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ZOO[name] = ZooEntry(builder, description)
        return builder

    return add


def _is_int(value: object) -> bool:
    """True for Python/numpy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_common(name: str, input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """Validate ``input_shape`` and ``num_classes``; return the shape as a tuple of ints."""
    shape = tuple(input_shape)
    if not shape or not all(_is_int(d) and d >= 1 for d in shape):
        raise ModelError(f"zoo:{name}: input_shape must be positive ints; got {input_shape!r}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ModelError(f"zoo:{name}: num_classes must be an int >= 1; got {num_classes!r}")
    return tuple(int(d) for d in shape)


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; the MLP of Han et al. 2015): 300 -> 100 -> classes."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for inputs ``(B, *input_shape)``."""
        x = self.flatten(x)  # (B, prod(input_shape))
        x = self.relu2(self.fc2(self.relu1(self.fc1(x))))  # (B, 100)
        return self.fc3(x)  # (B, num_classes)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as pruned by Han et al. 2015: no activation after the convolutions."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        padding = 2 if min(height, width) < 28 else 0  # keeps 8x8 digits big enough
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5, padding=padding)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, padding=padding)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        with torch.no_grad():
            flat = self._features(torch.zeros(1, *input_shape)).shape[1]
        self.fc1 = nn.Linear(flat, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))  # (B, 20, H', W')
        x = self.pool2(self.conv2(x))  # (B, 50, H'', W'')
        return self.flatten(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, H, W)``."""
        return self.fc2(self.relu(self.fc1(self._features(x))))  # (B, num_classes)


class MLP(nn.Module):
    """Flatten, then ``fc1 .. fcN`` with ReLU (and optional dropout) between them."""

    def __init__(
        self, in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        widths = (in_features, *hidden, num_classes)
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths), start=1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
            if i < len(widths) - 1:
                self.add_module(f"relu{i}", nn.ReLU())
                if dropout > 0:
                    self.add_module(f"drop{i}", nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``: the layers in registration order."""
        for layer in self.children():  # registration order: flatten, fc1, relu1, ...
            x = layer(x)
        return x  # (B, num_classes)


@_register("lenet-300-100", "LeNet-300-100 MLP (Han et al. 2015); 266,610 params on 28x28")
def lenet_300_100(*, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build LeNet-300-100: Flatten -> fc1 (300) -> ReLU -> fc2 (100) -> ReLU -> fc3.

    Args:
        input_shape: One sample's shape, e.g. ``(1, 28, 28)``; flattened to ``prod`` inputs.
        num_classes: Output width.

    Returns:
        A ``LeNet300100`` with layers ``flatten``, ``fc1``, ``fc2``, ``fc3``.

    Raises:
        ModelError: ``input_shape`` or ``num_classes`` is not positive.
    """
    shape = _check_common("lenet-300-100", input_shape, num_classes)
    return LeNet300100(math.prod(shape), num_classes)


@_register("lenet5", "Caffe LeNet-5 (Han et al. 2015), 20/50 5x5 convs; 431,080 params on 28x28")
def lenet5(*, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build Caffe's LeNet-5: conv1 (20, 5x5) -> pool -> conv2 (50, 5x5) -> pool -> fc1 (500)
    -> ReLU -> fc2. Inputs under 28 px get padding 2 on both convs.

    Args:
        input_shape: ``(C, H, W)`` of one sample.
        num_classes: Output width.

    Returns:
        A ``LeNet5`` with layers ``conv1``, ``conv2``, ``fc1``, ``fc2``.

    Raises:
        ModelError: ``input_shape`` is not ``(C, H, W)``, is too small for two 5x5
            convolutions and pools, or ``num_classes`` is not positive.
    """
    shape = _check_common("lenet5", input_shape, num_classes)
    if len(shape) != 3:
        raise ModelError(f"zoo:lenet5: input_shape must be (C, H, W); got {shape}")
    try:
        return LeNet5(shape, num_classes)  # type: ignore[arg-type]
    except RuntimeError as exc:
        raise ModelError(f"zoo:lenet5: input {shape} is too small for LeNet-5 ({exc})") from exc


@_register("mlp", "plain MLP, hidden (128, 64) by default, optional dropout; the demo model")
def mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (128, 64),
    dropout: float = 0.0,
) -> nn.Module:
    """Build an MLP: Flatten -> (Linear -> ReLU [-> Dropout]) per hidden width -> Linear.

    Args:
        input_shape: One sample's shape; flattened to ``prod`` inputs.
        num_classes: Output width.
        hidden: Hidden layer widths; may be empty (a linear classifier).
        dropout: Dropout probability after each hidden ReLU, in ``[0, 1)``; 0 adds none.

    Returns:
        An ``MLP`` with layers ``fc1 .. fcN``, ``N = len(hidden) + 1``.

    Raises:
        ModelError: A width is not a positive int, ``dropout`` is outside ``[0, 1)``, or
            ``input_shape``/``num_classes`` is not positive.
    """
    shape = _check_common("mlp", input_shape, num_classes)
    widths = tuple(hidden)
    if not all(_is_int(w) and w >= 1 for w in widths):
        raise ModelError(f"zoo:mlp: hidden must be positive ints; got {hidden!r}")
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"zoo:mlp: dropout must be a float in [0, 1); got {dropout!r}")
    return MLP(math.prod(shape), tuple(int(w) for w in widths), int(num_classes), float(dropout))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BatchNorm, plus the shortcut.

    ``conv1 (stride s) -> bn1 -> relu1 -> conv2 -> bn2``, add the shortcut (identity, or
    ``downsample`` = 1x1 conv with stride ``s`` and BatchNorm where the shape changes), then
    ``relu2``. Each ReLU is its own module, so every module runs once per forward.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, channels, ceil(H / s), ceil(W / s))``."""
        identity = x if self.downsample is None else self.downsample(x)  # (B, C, H', W')
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, C, H', W')
        out = self.bn2(self.conv2(out))  # (B, C, H', W')
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016, section 4.2, with Distiller's module names.

    Stem ``conv1`` (3x3, 16) -> ``bn1`` -> ``relu``; ``layer1``/``layer2``/``layer3`` of ``n``
    ``BasicBlock`` each with 16/32/64 channels (the first block of layer2 and layer3 has
    stride 2); ``avgpool`` (adaptive, to 1x1; the paper's 8x8 on 32x32 inputs) ->
    ``flatten`` -> ``fc``. The state dict matches Distiller's ``resnet20_cifar`` checkpoints.

    Parameters: ``97,216 n - 19,824 + 65 * num_classes`` for 3 input channels (each extra
    input channel adds 144), i.e. 272,474 / 466,906 / 855,770 for n = 3 / 5 / 9 and 10 classes.
    """

    def __init__(self, in_channels: int, blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, channels, stride)]
        blocks += [BasicBlock(channels, channels, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, H, W)``."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        x = self.layer1(x)  # (B, 16, H, W)
        x = self.layer2(x)  # (B, 32, H/2, W/2)
        x = self.layer3(x)  # (B, 64, H/4, W/4)
        x = self.flatten(self.avgpool(x))  # (B, 64)
        return self.fc(x)  # (B, num_classes)


def _cifar_resnet(
    name: str, blocks_per_stage: int, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Validate the arguments and build a ``CifarResNet`` (shared by the ``resnetNN`` builders)."""
    shape = _check_common(name, input_shape, num_classes)
    if len(shape) != 3:
        raise ModelError(f"zoo:{name}: input_shape must be (C, H, W); got {shape}")
    return CifarResNet(shape[0], blocks_per_stage, int(num_classes))


def _resnet_builder(depth: int, blocks: int, params: str) -> Callable[..., nn.Module]:
    """A registered builder of the CIFAR ResNet-``depth`` (``blocks`` per stage)."""

    def build(*, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        return _cifar_resnet(f"resnet{depth}", blocks, input_shape, num_classes)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"""Build the CIFAR ResNet-{depth} (He et al. 2016, section 4.2): 3 stages of
    {blocks} BasicBlocks with 16/32/64 channels; {params} parameters for 10 classes.

    Args:
        input_shape: ``(C, H, W)`` of one sample; ``C`` is the stem's input channels.
        num_classes: Output width of ``fc``.

    Returns:
        A ``CifarResNet`` with Distiller's module names (``conv1``, ``layer2.0.downsample.0``,
        ``fc``, ...).

    Raises:
        ModelError: ``input_shape`` is not ``(C, H, W)`` or ``num_classes`` is not positive.
    """
    description = (
        f"CIFAR ResNet-{depth} (He et al. 2016), {blocks}x3 blocks, 16/32/64 ch; {params} params"
    )
    return _register(f"resnet{depth}", description)(build)


resnet20 = _resnet_builder(20, 3, "272,474")
resnet32 = _resnet_builder(32, 5, "466,906")
resnet56 = _resnet_builder(56, 9, "855,770")


def zoo_names() -> list[str]:
    """List the registered zoo model names.

    Returns:
        The names, in registration order (``lenet-300-100``, ``lenet5``, ``mlp``,
            ``resnet20``, ``resnet32``, ``resnet56``).
    """
    return list(ZOO)


def build_zoo_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by name.

    Args:
        name: A key of ``ZOO`` (without the ``zoo:`` prefix).
        **kwargs: The builder's keyword arguments; always ``input_shape`` and ``num_classes``.

    Returns:
        A freshly initialised model (seed torch yourself for reproducible weights).

    Raises:
        UnknownNameError: ``name`` is not registered; the nearest names are suggested.
        ModelError: A keyword is unknown or a required one missing (the message lists the
            accepted ones), or a value is invalid.
    """
    entry = ZOO.get(name)
    if entry is None:
        raise UnknownNameError(
            f"unknown zoo model {name!r}{suggest(name, ZOO)}; choose one of {', '.join(ZOO)}"
        )
    signature = inspect.signature(entry.builder)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(signature.parameters)
        raise ModelError(f"zoo:{name}: {exc}; accepted kwargs are {accepted}") from exc
    return entry.builder(**kwargs)
