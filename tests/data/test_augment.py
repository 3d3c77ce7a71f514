"""Crop/flip augmentation: exact crops, seeded, images only, and wired into ``train``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress.data.augment import augment_batch, random_crop, random_hflip
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


def test_same_seed_same_batches_and_labels_untouched():
    labels = torch.arange(4)
    a = augment_batch((_images(), labels), 2, True, torch.Generator().manual_seed(3))
    b = augment_batch((_images(), labels), 2, True, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1] is labels


@pytest.mark.parametrize(
    "batch", [{"input_ids": torch.zeros(2, 5, dtype=torch.long)}, (torch.zeros(2, 64), None)]
)
def test_non_image_batches_are_a_one_line_error(batch):
    with pytest.raises(DataError, match=r"needs image batches \(B, C, H, W\)") as err:
        augment_batch(batch, 4, False, torch.Generator())
    assert "\n" not in str(err.value)


def test_off_returns_the_batch_itself():
    batch = {"input_ids": torch.zeros(1, 3)}
    assert augment_batch(batch, 0, False, torch.Generator()) is batch


def test_train_stage_augments(digits):
    model = mp.load_model("zoo:lenet5", input_shape=[1, 8, 8], num_classes=10)
    stage = {"technique": "train", "epochs": 1, "crop_padding": 1, "hflip": True}
    runs = [mp.compress(model, [stage], data=digits, latency_runs=0, seed=2) for _ in range(2)]
    assert runs[0].stages[0].learned["steps"] > 0
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)
    plain = mp.compress(model, [{**stage, "crop_padding": 0, "hflip": False}], data=digits,
                        latency_runs=0, seed=2)  # fmt: skip
    assert not torch.equal(plain.model.conv1.weight, runs[0].model.conv1.weight)
