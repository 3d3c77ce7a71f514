"""Tiny models for tests: fast to train on digits, with the layer types techniques act on."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.data import DataBundle
from modelpress.models.source import ModelSource, tag_source


class TinyConvNet(nn.Module):
    """Conv → ReLU → Conv → ReLU → pool → Linear on (1, 8, 8) digits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(B, 1, 8, 8)``."""
        x = torch.relu(self.conv1(x))  # (B, 8, 8, 8)
        x = torch.relu(self.conv2(x))  # (B, 16, 8, 8)
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)


def tiny_convnet(num_classes: int = 10) -> nn.Module:
    """A :class:`TinyConvNet` tagged with an ``import:`` source, so it saves and loads."""
    torch.manual_seed(0)
    model = TinyConvNet(num_classes)
    return tag_source(
        model,
        ModelSource("import:modelpress.testing.models:tiny_convnet", {"num_classes": num_classes}),
    )


def trained_mlp(epochs: int = 15, seed: int = 0) -> tuple[nn.Module, DataBundle]:
    """``zoo:mlp`` trained on digits for a few seconds, and the digits bundle."""
    from modelpress.data import load_data
    from modelpress.models import load_model
    from modelpress.train import train_model

    bundle = load_data("digits")
    torch.manual_seed(seed)
    model = load_model("zoo:mlp", input_shape=list(bundle.input_shape), num_classes=10)
    train_model(model, bundle, epochs=epochs, lr=3e-3, seed=seed)
    return model.eval(), bundle
