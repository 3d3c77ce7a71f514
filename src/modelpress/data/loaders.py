"""One loader per data source: scikit-learn digits, MNIST-style IDX folders, ``.npz`` files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpress.data.arrays import check_split, make_bundle
from modelpress.data.bundle import DataBundle
from modelpress.data.idx import read_idx
from modelpress.errors import DataError

DIGITS_TEST_SIZE = 360  # of 1797; leaves 1437 for training
DIGITS_SPLIT_SEED = 0  # fixed forever: the split must never change between versions
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-format data set: its scheme, normalisation constants and where to get it."""

    scheme: str
    mean: float  # of x / 255 over the training images
    std: float
    num_classes: int
    get_it: str  # how to obtain the files, for the missing-file message


MNIST = IdxDataset(
    "mnist",
    0.1307,
    0.3081,
    10,
    "download the four IDX files from the MNIST site (or use $MODELPRESS_DATA/mnist)",
)
FASHION_MNIST = IdxDataset(
    "fashion-mnist",
    0.2860,
    0.3530,
    10,
    "download the four IDX files from github.com/zalandoresearch/fashion-mnist",
)


def load_digits(spec: str = "digits") -> DataBundle:
    """Load scikit-learn's bundled 8x8 digits with a fixed stratified 1437/360 split.

    Args:
        spec: The spec string to store on the bundle.

    Returns:
        Inputs ``(N, 1, 8, 8)`` float32 scaled ``x / 16`` into ``[0, 1]``; 10 classes.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return make_bundle(spec, (x_train, y_train), (x_test, y_test), num_classes=10)


def _find_idx(directory: Path, stem: str, source: IdxDataset) -> Path:
    """Return ``DIR/stem.gz`` or ``DIR/stem``, or raise naming the ``.gz`` path looked for."""
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            return path
    raise DataError(
        f"{source.scheme}: no file {directory / stem}.gz; {source.get_it} "
        f"and pass {source.scheme}:DIR"
    )


def _read_idx_split(directory: Path, split: str, source: IdxDataset) -> tuple[np.ndarray, ...]:
    """Read one split's images and labels; images become ``(N, 1, H, W)`` normalised float32."""
    image_path, label_path = (_find_idx(directory, s, source) for s in IDX_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise DataError(f"{image_path}: images must be (N, H, W); header says {images.shape}")
    check_split(images, labels, str(image_path), str(label_path))
    x = images.astype(np.float32)[:, None]  # (N, 1, H, W)
    x = (x / np.float32(255.0) - np.float32(source.mean)) / np.float32(source.std)
    return x, labels


def load_idx_dir(spec: str, directory: Path, source: IdxDataset) -> DataBundle:
    """Load an MNIST-format folder: the four IDX files, gzip-compressed or not.

    Args:
        spec: The spec string to store on the bundle.
        directory: The folder holding the files (``~`` already expanded).
        source: Which data set, for normalisation constants and messages.

    Returns:
        Inputs ``(N, 1, 28, 28)`` float32, ``(x / 255 - mean) / std``; labels int64.

    Raises:
        DataError: The folder or a file is missing, a file is not IDX or is truncated, or
            image and label counts differ.
    """
    if not directory.is_dir():
        raise DataError(
            f"{source.scheme}: no directory {directory}; {source.get_it} "
            f"and pass {source.scheme}:DIR"
        )
    train = _read_idx_split(directory, "train", source)
    test = _read_idx_split(directory, "test", source)
    return make_bundle(spec, train, test, source.num_classes)


def _npz_inputs(x: np.ndarray, where: str) -> np.ndarray:
    """Scale uint8 by 1/255, add a channel axis to (N,H,W), move NHWC (C in 1, 3) to NCHW."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_:
        x = x.astype(np.float32, copy=False)
    else:
        raise DataError(f"{where}: inputs must be numeric; got dtype {x.dtype}")
    if x.ndim == 3:
        return x[:, None]  # (N, 1, H, W)
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return x


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Return the four ``NPZ_KEYS`` arrays of ``path``, or raise naming the keys it has."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        keys = ", ".join(NPZ_KEYS)
        raise DataError(f"{path}: holds a single array, not an .npz with keys {keys}")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataError(
                f"{path}: missing key(s) {', '.join(missing)}; it has "
                f"{', '.join(archive.files) or 'no arrays'}"
            )
        try:
            return {k: archive[k] for k in NPZ_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: corrupt .npz ({exc})") from exc


def load_npz(spec: str, path: Path) -> DataBundle:
    """Load ``x_train, y_train, x_test, y_test`` from a ``.npz`` file.

    uint8 inputs are scaled by 1/255, other numeric inputs are cast to float32 unchanged;
    ``(N, H, W)`` gains a channel axis; 4-D arrays whose last axis is 1 or 3 (and whose
    second is not) are taken as NHWC and moved to NCHW. ``num_classes`` is the largest
    label plus one.

    Args:
        spec: The spec string to store on the bundle.
        path: The ``.npz`` file (``~`` already expanded).

    Returns:
        The bundle.

    Raises:
        DataError: The file is missing or unreadable, a key is missing, counts differ,
            labels are not non-negative integers, or inputs hold NaN/inf.
    """
    if not path.is_file():
        raise DataError(f"npz: no file {path}; pass npz:FILE with keys {', '.join(NPZ_KEYS)}")
    arrays = _read_npz(path)
    splits = []
    for split in ("train", "test"):
        x_name, y_name = f"{path}[x_{split}]", f"{path}[y_{split}]"
        x = _npz_inputs(arrays[f"x_{split}"], x_name)
        y = arrays[f"y_{split}"]
        check_split(x, y, x_name, y_name)
        splits.append((x, y))
    num_classes = int(max(splits[0][1].max(), splits[1][1].max())) + 1
    return make_bundle(spec, splits[0], splits[1], num_classes)
