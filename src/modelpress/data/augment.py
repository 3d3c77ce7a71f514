"""Training-time augmentation of image batches, in plain torch (no torchvision).

The standard CIFAR recipe of He et al. 2016 (section 4.2): pad each image with ``padding``
zeros on every side and take a random crop of the original size, then flip it horizontally
with probability 1/2. For digits, the distortions of Simard, Steinkraus & Platt 2003: a
random rotation and scaling about the image centre, and an elastic distortion (a random
displacement field smoothed by a Gaussian), both resampled bilinearly in one pass (zeros
outside), before the crop.
All act on a whole batch ``(B, C, H, W)`` with one seeded generator, so the same seed gives the
same augmented batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modelpress.errors import DataError

_OFF = "Set crop_padding: 0, hflip: false, rotate_degrees: 0, scale_range: 0 and elastic_alpha: 0"


@dataclass(frozen=True)
class Augmentation:
    """What to do to each training image (all off by default).

    Attributes:
        crop_padding: zero-pad by this many pixels and crop a random window back.
        hflip: flip left-right with probability 1/2.
        rotate_degrees: rotate by an angle uniform in ``[-d, d]`` degrees.
        scale_range: scale by a factor uniform in ``[1 - s, 1 + s]``.
        elastic_alpha: elastic distortion strength, in pixels (Simard et al. use 34 on MNIST).
        elastic_sigma: the displacement field's smoothness (Gaussian sigma in pixels; 4).
    """

    crop_padding: int = 0
    hflip: bool = False
    rotate_degrees: float = 0.0
    scale_range: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    @property
    def distorts(self) -> bool:
        """Whether images are resampled (rotated, scaled or elastically distorted)."""
        return bool(self.rotate_degrees or self.scale_range or self.elastic_alpha)

    @property
    def active(self) -> bool:
        """Whether anything changes the images."""
        return bool(self.crop_padding or self.hflip or self.distorts)


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"image augmentation needs image batches (B, C, H, W); got {shape}. "
            f"{_OFF} for this data."
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


def _affine_grid(
    x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """The sampling grid ``(B, H, W, 2)`` of a random rotation in ``[-degrees, degrees]`` and
    scaling in ``[1 - scale, 1 + scale]`` about the centre (``align_corners=False`` units)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(degrees)
    factor = 1 + (torch.rand(b, generator=generator) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor  # output -> input coords
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)


def gaussian_matrix(n: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, n)`` matrix ``G`` with ``G @ v`` the Gaussian filter (std ``sigma``, radius
    ``ceil(3 sigma)`` capped at ``n - 1``, normalised taps) of ``v`` with reflected borders
    (``v[-1] = v[1]``, as scipy's ``mode="mirror"``)."""
    radius = max(0, min(math.ceil(3 * sigma), n - 1))
    taps = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (taps.to(dtype) / sigma) ** 2)
    weights = weights / weights.sum()
    cols = (torch.arange(n)[:, None] + taps[None, :]).abs()  # reflect below 0
    cols = torch.where(cols > n - 1, 2 * (n - 1) - cols, cols)  # and above n - 1
    rows = torch.arange(n)[:, None].expand_as(cols)
    matrix = torch.zeros(n, n, dtype=dtype)
    return matrix.index_put_((rows, cols), weights.expand_as(cols), accumulate=True)


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """``field`` ``(..., H, W)`` filtered by a Gaussian of std ``sigma`` pixels along both
    image axes (separable, see :func:`gaussian_matrix`)."""
    h, w = field.shape[-2:]
    return gaussian_matrix(h, sigma, field.dtype) @ field @ gaussian_matrix(w, sigma, field.dtype).T


def _elastic_offsets(
    x: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Simard et al.'s elastic displacement, ``(B, H, W, 2)`` in grid units: per pixel, a
    uniform ``[-1, 1]`` displacement in x and y, Gaussian-smoothed with ``sigma`` and scaled by
    ``alpha`` pixels."""
    b, _, h, w = x.shape
    noise = torch.rand(2 * b, 1, h, w, generator=generator, dtype=x.dtype) * 2 - 1
    pixels = alpha * gaussian_smooth(noise, sigma).view(b, 2, h, w)  # (B, [dx, dy], H, W)
    units = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype).view(1, 2, 1, 1)
    return (pixels * units).permute(0, 2, 3, 1)


def random_distortion(
    x: torch.Tensor, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` rotated, scaled and elastically distorted as ``augmentation``
    says (Simard et al. 2003), resampled once (bilinear; pixels from outside the image are 0).
    """
    _check_images(x)
    a = augmentation
    grid = _affine_grid(x, a.rotate_degrees, a.scale_range, generator)
    if a.elastic_alpha:
        grid = grid + _elastic_offsets(x, a.elastic_alpha, a.elastic_sigma, generator)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(
    x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate each image of ``x`` ``(B, C, H, W)`` by a random angle in ``[-degrees, degrees]``
    and scale it by a random factor in ``[1 - scale, 1 + scale]`` about its centre (bilinear;
    pixels from outside the image are 0)."""
    return random_distortion(x, Augmentation(rotate_degrees=degrees, scale_range=scale), generator)


def augment_batch(batch: Any, augmentation: Augmentation, generator: torch.Generator) -> Any:
    """``batch`` with its images distorted (rotated, scaled, elastic), cropped and flipped as
    ``augmentation`` says (in that order).

    Args:
        batch: ``(images, labels)`` or bare images ``(B, C, H, W)``.

    Raises:
        DataError: the batch holds no image tensor (e.g. a dict of token ids).
    """
    a = augmentation
    if not a.active:
        return batch
    if isinstance(batch, dict):
        raise DataError(
            "image augmentation needs image batches (B, C, H, W); got a dict of "
            f"{', '.join(batch)}. {_OFF} for this data."
        )
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if a.distorts:
        x = random_distortion(x, a, generator)
    if a.crop_padding:
        x = random_crop(x, a.crop_padding, generator)
    if a.hflip:
        x = random_hflip(x, generator)
    return (x, *batch[1:]) if isinstance(batch, (tuple, list)) else x
