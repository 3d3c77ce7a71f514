"""Training-time augmentation of image batches, in plain torch (no torchvision).

The standard CIFAR recipe of He et al. 2016 (section 4.2): pad each image with ``padding``
zeros on every side and take a random crop of the original size, then flip it horizontally
with probability 1/2. Both act on a whole batch ``(B, C, H, W)`` with one seeded generator,
so the same seed gives the same augmented batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from modelpress.errors import DataError


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"crop/flip augmentation needs image batches (B, C, H, W); got {shape}. "
            "Set crop_padding: 0 and hflip: false for this data."
        )


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels and crop a random ``H x W`` window from it.

    Args:
        x: ``(B, C, H, W)`` images.
        padding: pixels added on each side; 0 returns ``x``.
        generator: the source of the crop offsets.
    """
    _check_images(x)
    if padding == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    idx = torch.arange(b)[:, None, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows, cols].squeeze(1).permute(0, 3, 1, 2)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of ``x`` ``(B, C, H, W)`` left-right with probability 1/2."""
    _check_images(x)
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(batch: Any, crop_padding: int, hflip: bool, generator: torch.Generator) -> Any:
    """``batch`` with its images randomly cropped (``crop_padding`` > 0) and/or flipped.

    Args:
        batch: ``(images, labels)`` or bare images ``(B, C, H, W)``.

    Raises:
        DataError: the batch holds no image tensor (e.g. a dict of token ids).
    """
    if not crop_padding and not hflip:
        return batch
    if isinstance(batch, dict):
        raise DataError(
            "crop/flip augmentation needs image batches (B, C, H, W); got a dict of "
            f"{', '.join(batch)}. Set crop_padding: 0 and hflip: false for this data."
        )
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if crop_padding:
        x = random_crop(x, crop_padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return (x, *batch[1:]) if isinstance(batch, (tuple, list)) else x
