"""``DataBundle``: a loaded data set, split into train (for compression) and test (held out)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from modelpress.errors import ConfigError, suggest

SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A data set as two in-memory tensor datasets plus what a model builder needs to know.

    Attributes:
        spec: The spec string it was loaded from (``digits``, ``mnist:DIR``, ...).
        train: ``(inputs, labels)`` used for training, calibration and fine-tuning.
        test: ``(inputs, labels)`` held out; compression never sees it, evaluation only.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: Shape of one input sample, e.g. ``(1, 28, 28)``.
        task: What the labels mean; ``"classification"`` for every current source.
    """

    spec: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    task: str = "classification"

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        """Pick ``n`` distinct training inputs at random, reproducibly.

        Args:
            n: How many samples; ``1 <= n <= len(train)``.
            seed: Seed of the ``torch.Generator`` that draws them; same seed, same samples.

        Returns:
            A float tensor of shape ``(n, *input_shape)``.

        Raises:
            ConfigError: ``n`` is not in ``[1, len(train)]``.
        """
        inputs = self.train.tensors[0]  # (N, *input_shape)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(inputs):
            raise ConfigError(
                f"calibration size must be an int in [1, {len(inputs)}] for {self.spec}; "
                f"got {n!r} instead"
            )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(inputs), generator=generator)
        return inputs[order[:n]]

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """Make a ``DataLoader`` over one split.

        Args:
            split: ``"train"`` or ``"test"``.
            batch_size: Samples per batch, at least 1.
            shuffle: Reshuffle every epoch, with a generator seeded by ``seed``.
            seed: Seed of the shuffling generator; ignored when ``shuffle`` is false.

        Returns:
            A loader yielding ``(inputs, labels)`` batches.

        Raises:
            ConfigError: ``split`` is neither ``"train"`` nor ``"test"``, or ``batch_size < 1``.
        """
        if split not in SPLITS:
            raise ConfigError(
                f"unknown split {split!r}{suggest(split, SPLITS)}; use 'train' or 'test'"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r} instead")
        dataset = self.train if split == "train" else self.test
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
