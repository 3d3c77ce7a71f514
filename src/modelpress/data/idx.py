"""Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a dtype code byte, the number of
dimensions ``nd``, then ``nd`` big-endian uint32 sizes, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from modelpress.errors import DataError

# dtype code byte -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """Return the decompressed bytes of ``path`` (gzip when it ends in ``.gz``)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt or truncated gzip ({exc}); download the file again"
        ) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def parse_idx(buf: bytes, where: str = "<bytes>") -> np.ndarray:
    """Parse an IDX byte string into an array in native byte order.

    Args:
        buf: The uncompressed IDX bytes.
        where: What to call the source in error messages (usually its path).

    Returns:
        An array with the header's shape and dtype (native byte order, read-only view
        for ``uint8``/``int8``).

    Raises:
        DataError: The magic is wrong, the dtype code unknown, or the payload size does not
            match the header (truncated or padded file).
    """
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in IDX_DTYPES:
        raise DataError(
            f"{where}: not an IDX file (magic {buf[:4].hex() or 'empty'}; "
            "expected 0000 then a dtype code and ndim); check the file name and content"
        )
    dtype, ndim = IDX_DTYPES[buf[2]], buf[3]
    header_bytes = 4 + 4 * ndim
    if len(buf) < header_bytes:
        raise DataError(f"{where}: IDX header truncated ({len(buf)} bytes); download it again")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header_bytes != expected:
        raise DataError(
            f"{where}: IDX payload is {len(buf) - header_bytes} bytes but header {dims} "
            f"needs {expected}; the file is truncated or corrupt, download it again"
        )
    values = np.frombuffer(buf, dtype, offset=header_bytes).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed when its name ends in ``.gz``.

    Args:
        path: The file to read.

    Returns:
        The array stored in the file, shaped as its header says.

    Raises:
        DataError: The file is missing, unreadable, not IDX, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no IDX file {path}")
    return parse_idx(_read_bytes(path), where=str(path))
