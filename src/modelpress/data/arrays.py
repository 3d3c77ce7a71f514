"""Checks and conversions shared by every loader: numpy arrays in, a ``DataBundle`` out."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from modelpress.data.bundle import DataBundle
from modelpress.errors import DataError


def check_split(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    """Check one split's inputs and labels agree and are usable.

    Args:
        x: Inputs, first axis is the sample.
        y: Labels, shape ``(N,)``, integers ``>= 0``.
        x_name: Where the inputs came from (a path or ``file[key]``), for messages.
        y_name: Where the labels came from, for messages.

    Raises:
        DataError: Empty inputs, labels not 1-D integers or negative, counts differ, or
            NaN/inf among the inputs.
    """
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"{x_name}: inputs have shape {x.shape}; need (N, ...) with N >= 1")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{y_name}: labels must be 1-D integers; got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{x_name} has {len(x)} inputs but {y_name} has {len(y)} labels")
    if y.min() < 0:
        raise DataError(f"{y_name}: labels must be >= 0; found {int(y.min())}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{x_name}: {bad} input values are NaN or inf; clean the data")


def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """Wrap float inputs and integer labels as a ``TensorDataset`` (float32, int64)."""
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return TensorDataset(inputs, labels)


def make_bundle(
    spec: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
) -> DataBundle:
    """Build a ``DataBundle`` from already checked ``(inputs, labels)`` numpy pairs.

    Args:
        spec: The spec string, stored on the bundle.
        train: Training ``(inputs, labels)``.
        test: Held-out ``(inputs, labels)``; same per-sample shape as ``train``.
        num_classes: Number of classes.

    Returns:
        The bundle, inputs as float32 tensors and labels as int64.

    Raises:
        DataError: Train and test samples differ in shape, or a label is ``>= num_classes``.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{spec}: train samples are {x_train.shape[1:]} but test samples are "
            f"{x_test.shape[1:]}; both splits need the same sample shape"
        )
    top = int(max(y_train.max(), y_test.max()))
    if top >= num_classes:
        raise DataError(f"{spec}: label {top} is out of range for {num_classes} classes")
    return DataBundle(
        spec=spec,
        train=to_dataset(x_train, y_train),
        test=to_dataset(x_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )
