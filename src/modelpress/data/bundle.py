"""``DataBundle``: a loaded data set, split into train (for compression) and test (held out).

A technique that must choose something on data the model was not trained on (early-exit
thresholds) carves a validation split out of train with :meth:`DataBundle.with_validation`;
test stays untouched for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, TensorDataset

from modelpress.errors import ConfigError, suggest

SPLITS = ("train", "val", "test")


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
        val: ``(inputs, labels)`` held out of train for choices made on data (thresholds);
            None until :meth:`with_validation` carves it out.
    """

    spec: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    task: str = "classification"
    val: TensorDataset | None = None

    def with_validation(self, fraction: float, seed: int) -> DataBundle:
        """This bundle with a random ``fraction`` of train moved to a ``val`` split.

        Args:
            fraction: share of the training samples to hold out, in ``(0, 1)``.
            seed: seed of the draw; same seed, same split.

        Returns:
            A new bundle (this one is unchanged); itself when it already has a ``val`` split.

        Raises:
            ConfigError: ``fraction`` leaves no sample on either side.
        """
        if self.val is not None:
            return self
        n = len(self.train)
        n_val = round(fraction * n)
        if not 0 < n_val < n:
            raise ConfigError(
                f"a validation fraction of {fraction} of {n} training samples of {self.spec} "
                "leaves one side empty; use a fraction between 1/n and 1 - 1/n."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        inputs, labels = self.train.tensors
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        return replace(
            self,
            train=TensorDataset(inputs[train_idx], labels[train_idx]),
            val=TensorDataset(inputs[val_idx], labels[val_idx]),
        )

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
            split: ``"train"``, ``"val"`` (once carved out) or ``"test"``.
            batch_size: Samples per batch, at least 1.
            shuffle: Reshuffle every epoch, with a generator seeded by ``seed``.
            seed: Seed of the shuffling generator; ignored when ``shuffle`` is false.

        Returns:
            A loader yielding ``(inputs, labels)`` batches.

        Raises:
            ConfigError: ``split`` is not one of the splits, ``"val"`` was not carved out, or
                ``batch_size < 1``.
        """
        if split not in SPLITS:
            raise ConfigError(
                f"unknown split {split!r}{suggest(split, SPLITS)}; use 'train', 'val' or 'test'"
            )
        if split == "val" and self.val is None:
            raise ConfigError(
                f"{self.spec} has no 'val' split; carve one out of train with "
                "with_validation(fraction, seed)."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r} instead")
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
