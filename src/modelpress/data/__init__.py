"""Data sets from spec strings: ``digits`` (embedded), ``mnist:DIR``, ``fashion-mnist:DIR``,
``npz:FILE``. Nothing is downloaded; a missing file is a ``DataError`` naming the path."""

from modelpress.data.bundle import DataBundle
from modelpress.data.sources import data_names, load_data

__all__ = ["DataBundle", "data_names", "load_data"]
