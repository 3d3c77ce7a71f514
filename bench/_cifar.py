"""CIFAR-10 benchmark helpers: Distiller's ResNet-20 checkpoint and the JPEG CIFAR-10 copies.

Benchmark-only: neither the package nor the tests import this module. The files are those
of sections 6 and 7 of the shared data README, under ``<data_root>/resnet20-cifar10/`` and
``<data_root>/cifar10/``. Images are returned as float NCHW tensors normalised the way
Distiller trained the checkpoint: ``(x / 255 - 0.5) / 0.5``, i.e. in ``[-1, 1]``.

The JPEG copies are lossy (quality 75, 4:2:0); the checkpoint scores 80.75% top-1 on the JPEG
test set against 92.54% recorded by Distiller. Use them for relative comparisons only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _common import BenchError
from torch import nn

import modelpress

CHECKPOINT = Path("resnet20-cifar10") / "checkpoint_trained_dense.pth.tar"
TEST_JPEG = Path("cifar10") / "test_jpeg_q75.npz"
TRAIN_JPEG = Path("cifar10") / "train_jpeg_q75_bytes.npz"
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def _require(path: Path) -> Path:
    """``path`` if it is a file; else a one-line ``BenchError`` naming it."""
    if not path.is_file():
        raise BenchError(f"{path} does not exist; see sections 6-7 of the shared data README.")
    return path


def load_resnet20_checkpoint(data_root: Path) -> nn.Module:
    """Distiller's dense ResNet-20 for CIFAR-10, as ``zoo:resnet20`` with its trained weights.

    Args:
        data_root: The shared data directory (holding ``resnet20-cifar10/``).

    Returns:
        The model in eval mode, tagged with source ``zoo:resnet20`` so artifacts can rebuild it.

    Raises:
        BenchError: The checkpoint file is missing or does not hold a ``state_dict``.
        RuntimeError: The state dict does not fit ``zoo:resnet20`` (strict loading).
    """
    path = _require(Path(data_root) / CHECKPOINT)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise BenchError(f"{path} holds no 'state_dict'; is it Distiller's checkpoint?")
    # DataParallel saved the keys as "module.conv1.weight", ...
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    model = modelpress.load_model(
        "zoo:resnet20", input_shape=list(INPUT_SHAPE), num_classes=NUM_CLASSES
    )
    # No num_batches_tracked in the file (pre-1.0 torch); BatchNorm accepts that under strict.
    model.load_state_dict(state, strict=True)
    return model.eval()


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 32, 32, 3)`` RGB and int labels -> normalised float NCHW and int64 labels."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (N, 3, 32, 32), 0..255
    x = x.div(255).sub(0.5).div(0.5).contiguous()  # (N, 3, 32, 32), in [-1, 1]
    return x, torch.from_numpy(labels).long()  # (N,)


def load_cifar10_test_jpeg(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 CIFAR-10 test images, decoded from JPEG quality-75 copies.

    Args:
        data_root: The shared data directory (holding ``cifar10/``).

    Returns:
        ``(x, y)``: float ``(10000, 3, 32, 32)`` in ``[-1, 1]`` and int64 ``(10000,)``.

    Raises:
        BenchError: ``cifar10/test_jpeg_q75.npz`` is missing.
    """
    with np.load(_require(Path(data_root) / TEST_JPEG)) as data:
        images, labels = data["images"], data["labels"]  # (N, 32, 32, 3) uint8, (N,) int64
    return _to_tensors(images, labels)
