"""Tests for modelpress.data: digits, IDX folders, npz files, and every error path."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.data import DataBundle, data_names, load_data
from modelpress.data.idx import parse_idx, read_idx
from modelpress.errors import ConfigError, DataError, UnknownNameError

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: 0x0000, dtype 0x08, ndim, big-endian dims, payload."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: Path, gz: bool = True, n_train: int = 6, n_test: int = 4) -> dict:
    """Write four tiny MNIST-format files; return the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": np.arange(n_train, dtype=np.uint8) % 10,
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": np.arange(n_test, dtype=np.uint8) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{IDX_NAMES[key]}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / IDX_NAMES[key]).write_bytes(data)
    return arrays


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits")


# --- digits --------------------------------------------------------------------------------


def test_digits_shapes_and_scaling(digits: DataBundle) -> None:
    x_train, y_train = digits.train.tensors
    x_test, _ = digits.test.tensors
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.task == "classification" and digits.spec == "digits"


def test_digits_split_is_fixed_and_stratified(digits: DataBundle) -> None:
    again = load_data("digits")
    assert torch.equal(again.test.tensors[0], digits.test.tensors[0])
    assert torch.equal(again.train.tensors[1], digits.train.tensors[1])
    counts = torch.bincount(digits.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # ~36 per class


def test_digits_takes_no_path() -> None:
    with pytest.raises(DataError, match="digits takes no path; write digits"):
        load_data("digits:/tmp")


# --- bundle methods ------------------------------------------------------------------------


def test_calibration_is_seeded(digits: DataBundle) -> None:
    a, b = digits.calibration(32, seed=7), digits.calibration(32, seed=7)
    c = digits.calibration(32, seed=8)
    assert a.shape == (32, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("n", [0, -1, 1438, 2.5])
def test_calibration_rejects_bad_size(digits: DataBundle, n: object) -> None:
    with pytest.raises(ConfigError, match=r"calibration size must be an int in \[1, 1437\]"):
        digits.calibration(n, seed=0)  # type: ignore[arg-type]


def test_loader_batches_and_seeded_shuffle(digits: DataBundle) -> None:
    x, y = next(iter(digits.loader("test", batch_size=50)))
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)
    assert torch.equal(x, digits.test.tensors[0][:50])
    first = next(iter(digits.loader("train", 64, shuffle=True, seed=3)))[1]
    again = next(iter(digits.loader("train", 64, shuffle=True, seed=3)))[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, digits.train.tensors[1][:64])


def test_loader_rejects_bad_split_and_batch(digits: DataBundle) -> None:
    with pytest.raises(ConfigError, match="unknown split 'tset'.*did you mean 'test'"):
        digits.loader("tset", 8)
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1; got 0"):
        digits.loader("train", 0)


# --- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_folder_loads_and_normalises(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dir(tmp_path / "m", gz=gz)
    bundle = load_data(f"mnist:{tmp_path / 'm'}")
    x, y = bundle.train.tensors
    assert x.shape == (6, 1, 28, 28) and len(bundle.test) == 4
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    expected = (arrays["train_x"][:, None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert y.tolist() == arrays["train_y"].tolist()


def test_fashion_mnist_uses_its_constants(tmp_path: Path) -> None:
    arrays = write_idx_dir(tmp_path)
    x = load_data(f"fashion-mnist:{tmp_path}").test.tensors[0]
    expected = (arrays["test_x"][:, None] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_idx_dir(tmp_path / "mnist")
    assert len(load_data("mnist:~/mnist").train) == 6


def test_parse_idx_reads_wider_dtypes() -> None:
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    buf = struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">2I", 2, 3) + values.tobytes()
    out = parse_idx(buf)
    assert out.dtype == np.int32 and out.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_directory(tmp_path: Path) -> None:
    where = re.escape(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=f"mnist: no directory {where}; download"):
        load_data(f"mnist:{tmp_path / 'nope'}")


def test_missing_file_names_path(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    missing = tmp_path / "t10k-labels-idx1-ubyte.gz"
    expected = f"mnist: no file {re.escape(str(missing))}; download the four IDX"
    with pytest.raises(DataError, match=expected):
        load_data(f"mnist:{tmp_path}")
    with pytest.raises(DataError, match=r"and pass fashion-mnist:DIR$"):
        load_data(f"fashion-mnist:{tmp_path}")


def test_bad_magic(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: not an IDX file"):
        load_data(f"mnist:{tmp_path}")


def test_truncated_payload(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    expected = f"{re.escape(str(path))}: IDX payload is 4604 bytes .* truncated"
    with pytest.raises(DataError, match=expected):
        load_data(f"mnist:{tmp_path}")


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: corrupt or truncated gzip"):
        load_data(f"mnist:{tmp_path}")


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 3) + b"\x00\x00\x00\x02")
    with pytest.raises(DataError, match="IDX header truncated"):
        read_idx(path)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    labels = np.zeros(5, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match="has 6 inputs but .*train-labels.* has 5 labels"):
        load_data(f"mnist:{tmp_path}")


# --- npz -----------------------------------------------------------------------------------


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_uint8_images_get_channel_and_scale(tmp_path: Path) -> None:
    x = np.full((5, 4, 4), 255, dtype=np.uint8)
    spec = write_npz(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.array([0, 1, 2, 3, 4]),
        x_test=x[:2],
        y_test=np.array([6, 0]),
    )
    bundle = load_data(spec)
    assert bundle.input_shape == (1, 4, 4) and bundle.num_classes == 7
    assert float(bundle.train.tensors[0].max()) == 1.0


def test_npz_nhwc_moved_to_nchw_and_floats_kept(tmp_path: Path) -> None:
    x = np.arange(2 * 5 * 6 * 3, dtype=np.float64).reshape(2, 5, 6, 3)
    spec = write_npz(
        tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([1, 0])
    )
    bundle = load_data(spec)
    assert bundle.input_shape == (3, 5, 6)
    np.testing.assert_array_equal(bundle.train.tensors[0].numpy(), x.transpose(0, 3, 1, 2))


def test_npz_tabular_kept(tmp_path: Path) -> None:
    x = np.ones((3, 7), dtype=np.float32)
    spec = write_npz(
        tmp_path / "t.npz", x_train=x, y_train=np.zeros(3, int), x_test=x, y_test=np.ones(3, int)
    )
    bundle = load_data(spec)
    assert bundle.input_shape == (7,) and bundle.num_classes == 2


def test_npz_missing_keys_named(tmp_path: Path) -> None:
    spec = write_npz(tmp_path / "d.npz", x_train=np.zeros((2, 3)), labels=np.zeros(2))
    expected = "missing key.*y_train, x_test, y_test; it has x_train, labels"
    with pytest.raises(DataError, match=expected):
        load_data(spec)


def test_npz_count_mismatch(tmp_path: Path) -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    spec = write_npz(
        tmp_path / "d.npz", x_train=x, y_train=np.zeros(3, int), x_test=x, y_test=np.zeros(4, int)
    )
    with pytest.raises(DataError, match=r"d.npz\[x_train\] has 4 inputs but .*\[y_train\] has 3"):
        load_data(spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_npz_non_finite_inputs(tmp_path: Path, bad: float) -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x_test = x.copy()
    x_test[1, 2] = bad
    spec = write_npz(
        tmp_path / "d.npz",
        x_train=x,
        y_train=np.zeros(4, int),
        x_test=x_test,
        y_test=np.zeros(4, int),
    )
    with pytest.raises(DataError, match=r"\[x_test\]: 1 input values are NaN or inf"):
        load_data(spec)


def test_npz_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"npz: no file {re.escape(str(tmp_path / 'x.npz'))}"):
        load_data(f"npz:{tmp_path / 'x.npz'}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=f"{re.escape(str(junk))}: not a readable .npz file"):
        load_data(f"npz:{junk}")


def test_npz_bad_labels(tmp_path: Path) -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    spec = write_npz(
        tmp_path / "f.npz",
        x_train=x,
        y_train=np.array([0.0, 1.0]),
        x_test=x,
        y_test=np.array([0, 1]),
    )
    with pytest.raises(DataError, match="labels must be 1-D integers"):
        load_data(spec)
    spec = write_npz(
        tmp_path / "n.npz", x_train=x, y_train=np.array([0, -1]), x_test=x, y_test=np.array([0, 1])
    )
    with pytest.raises(DataError, match="labels must be >= 0; found -1"):
        load_data(spec)


# --- spec parsing --------------------------------------------------------------------------


def test_unknown_scheme_suggests() -> None:
    with pytest.raises(UnknownNameError, match="data spec 'mnsit:/x'.*did you mean 'mnist'"):
        load_data("mnsit:/x")


@pytest.mark.parametrize("spec", ["mnist", "mnist:", "npz: "])
def test_scheme_without_path(spec: str) -> None:
    usage = spec.split(":")[0] + ":" + ("DIR" if spec.startswith("mnist") else "FILE")
    with pytest.raises(DataError, match=f"needs a path; write {usage}"):
        load_data(spec)


def test_data_names_lists_every_scheme() -> None:
    names = dict(data_names())
    assert set(names) == {"digits", "mnist:DIR", "fashion-mnist:DIR", "npz:FILE"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())


def test_with_validation_carves_a_seeded_disjoint_split_out_of_train():
    bundle = load_data("digits")
    split = bundle.with_validation(0.1, seed=3)
    assert len(split.val) == round(0.1 * len(bundle.train))
    assert len(split.val) + len(split.train) == len(bundle.train) and bundle.val is None
    again = bundle.with_validation(0.1, seed=3)
    assert torch.equal(again.val.tensors[0], split.val.tensors[0])
    assert not torch.equal(bundle.with_validation(0.1, seed=4).val.tensors[0], split.val.tensors[0])
    assert split.with_validation(0.5, seed=0) is split
    assert sum(len(b[0]) for b in split.loader("val", 64)) == len(split.val)


def test_validation_split_errors_are_clear():
    from modelpress.errors import ConfigError

    bundle = load_data("digits")
    with pytest.raises(ConfigError, match="has no 'val' split; carve one out"):
        bundle.loader("val", 8)
    with pytest.raises(ConfigError, match="leaves one side empty"):
        bundle.with_validation(0.0001, seed=0)
