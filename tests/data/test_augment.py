"""Image augmentation: exact crops, flips, rotation/scaling, elastic distortion; seeded, images
only, and wired into ``train``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress.data.augment import (
    Augmentation,
    augment_batch,
    gaussian_matrix,
    gaussian_smooth,
    random_affine,
    random_crop,
    random_hflip,
)
from modelpress.errors import DataError


def _images() -> torch.Tensor:
    return torch.arange(4 * 3 * 6 * 6, dtype=torch.float32).reshape(4, 3, 6, 6)


def test_crop_is_a_window_of_the_padded_image():
    x = _images()
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 5, (4,), generator=g), torch.randint(0, 5, (4,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 6] for i in range(4)])
    assert torch.equal(out, expected)


def test_flip_mirrors_about_half_the_images():
    x = torch.randn(200, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 70 < sum(flipped) < 130


def test_affine_keeps_the_centre_rotates_and_scales():
    x, gen = _images(), torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_affine(x, 0.0, 0.0, gen), x)  # no change: exact pixels
    r2 = (torch.arange(9.0) - 4)[:, None] ** 2 + (torch.arange(9.0) - 4)[None, :] ** 2
    blob = torch.exp(-r2 / 12).expand(32, 1, 9, 9)  # round: any rotation leaves it be
    inner = r2 <= 9  # corners rotate in from outside the image, where it is 0
    turned = random_affine(blob, 45.0, 0.0, gen)
    torch.testing.assert_close(turned[..., inner], blob[..., inner], atol=0.04, rtol=0)
    bar = torch.zeros(32, 1, 9, 9)
    bar[:, 0, 4, :] = 1.0  # a horizontal line through the centre tilts off its row
    tilted = random_affine(bar, 45.0, 0.0, gen)
    assert torch.allclose(tilted[:, 0, 4, 4], torch.ones(32))
    assert (tilted[:, 0, 4].sum(1) < 7).float().mean() > 0.5
    dot = torch.zeros(64, 1, 9, 9)
    dot[:, 0, 3:6, 3:6] = 1.0
    mass = random_affine(dot, 0.0, 0.5, gen).sum(dim=(1, 2, 3))  # area scales with factor^2
    assert mass.min() < 9 * 0.75**2 and mass.max() > 9 * 1.25**2


def test_gaussian_matrix_is_a_reflected_normalised_filter():
    g = gaussian_matrix(11, 1.5)  # radius ceil(3 * 1.5) = 5
    torch.testing.assert_close(g.sum(1), torch.ones(11))  # every row keeps a constant
    taps = torch.exp(-0.5 * (torch.arange(-5.0, 6.0) / 1.5) ** 2)
    taps /= taps.sum()
    torch.testing.assert_close(g[5, :], taps)  # the middle row: the taps in place
    torch.testing.assert_close(g[0, 1], taps[4] + taps[6])  # pixel -1 is pixel 1 (reflection)
    field = torch.randn(3, 1, 11, 11)
    torch.testing.assert_close(gaussian_smooth(field, 1.5), g @ field @ g.T)
    assert gaussian_smooth(field, 1.5).std() < 0.6 * field.std()  # noise is smoothed


def test_elastic_distortion_moves_pixels_smoothly():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(  # strength 0: the identity, exactly
        augment_batch(x, Augmentation(elastic_alpha=0.0), gen), x, rtol=0, atol=0
    )
    bent = augment_batch(x, Augmentation(elastic_alpha=34.0, elastic_sigma=4.0), gen)
    changed = (bent - x).abs().sum(dim=(1, 2, 3))
    assert bool((changed > 1).all())  # every image moved
    mild = augment_batch(x, Augmentation(elastic_alpha=3.0, elastic_sigma=4.0), gen)
    assert (mild - x).abs().mean() < 0.3 * (bent - x).abs().mean()  # strength scales it
    mass = bent.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert 0.85 < float(mass.mean()) < 1.15  # the stroke is bent, not lost


def test_same_seed_same_batches_and_labels_untouched():
    labels = torch.arange(4)
    every = Augmentation(crop_padding=2, hflip=True, rotate_degrees=10, scale_range=0.1,
                         elastic_alpha=8.0)  # fmt: skip
    a = augment_batch((_images(), labels), every, torch.Generator().manual_seed(3))
    b = augment_batch((_images(), labels), every, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1] is labels


@pytest.mark.parametrize(
    "batch", [{"input_ids": torch.zeros(2, 5, dtype=torch.long)}, (torch.zeros(2, 64), None)]
)
def test_non_image_batches_are_a_one_line_error(batch):
    with pytest.raises(DataError, match=r"needs image batches \(B, C, H, W\)") as err:
        augment_batch(batch, Augmentation(crop_padding=4), torch.Generator())
    assert "\n" not in str(err.value)


def test_off_returns_the_batch_itself():
    batch = {"input_ids": torch.zeros(1, 3)}
    assert augment_batch(batch, Augmentation(), torch.Generator()) is batch


def test_train_stage_augments(digits):
    model = mp.load_model("zoo:lenet5", input_shape=[1, 8, 8], num_classes=10)
    stage = {"technique": "train", "epochs": 1, "crop_padding": 1, "hflip": True,
             "rotate_degrees": 10, "scale_range": 0.1, "elastic_alpha": 4.0}  # fmt: skip
    runs = [mp.compress(model, [stage], data=digits, latency_runs=0, seed=2) for _ in range(2)]
    assert runs[0].stages[0].learned["steps"] > 0
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)
    off = {"crop_padding": 0, "hflip": False, "rotate_degrees": 0, "scale_range": 0}
    plain = mp.compress(model, [{**stage, **off}], data=digits, latency_runs=0, seed=2)
    assert not torch.equal(plain.model.conv1.weight, runs[0].model.conv1.weight)
