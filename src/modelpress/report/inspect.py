"""What an artifact holds: per-tensor layout, codec, nonzeros and bytes (``modelpress inspect``),
and for each integer stream (value codes, sparse index) its symbols, alphabet, empirical
entropy and coded bits per symbol.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import load_file

from modelpress.artifact.bitpack import unpack_bits
from modelpress.artifact.entropy import decode_symbols, stream_stats
from modelpress.artifact.manifest import MANIFEST, TENSORS, read_manifest


def _payload_bytes(root: Path) -> dict[str, int]:
    with safe_open(str(root / TENSORS), framework="pt") as f:
        return {k: _nbytes(f.get_slice(k)) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def _nbytes(sl: Any) -> int:
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}  # fmt: skip
    return math.prod(sl.get_shape()) * sizes.get(sl.get_dtype(), 1)


def _describe_codec(rec: dict[str, Any]) -> str:
    codec = rec["codec"]
    if codec["name"] == "raw":
        return codec["dtype"]
    if codec["name"] == "affine":
        gran = codec["granularity"]
        where = f"g{codec['group_size']}" if gran == "group" else gran
        sym = "sym" if codec["symmetric"] else "asym"
        return f"int{codec['bits']} {sym} {where}"
    return codec["name"]


def _describe_layout(rec: dict[str, Any]) -> str:
    layout = rec["layout"]
    coded = f" {layout['packing']['kind']}" if "packing" in layout else ""
    if layout["format"] == "delta":
        return f"delta {layout['bits']}b"
    if layout["format"] == "nm":
        return f"nm {layout['n']}:{layout['m']} {layout['bits']}b{coded}"
    return layout["format"] + coded


def _stored_values(layout: dict[str, Any], numel: int) -> int:
    """Values a layout stores: its nonzeros (bitmask, delta), ``n`` per group of ``m`` (nm)."""
    if layout["format"] == "nm":
        return numel // layout["m"] * layout["n"]
    return layout.get("nnz", numel)


def tensor_rows(path: str | Path) -> list[dict[str, Any]]:
    """One dict per stored tensor: name, shape, layout, codec, nnz, bytes, bits per element."""
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    sizes = _payload_bytes(root)
    rows = []
    for name, rec in manifest["tensors"].items():
        if "alias_of" in rec:
            rows.append({"name": name, "shape": "", "layout": f"alias of {rec['alias_of']}",
                         "codec": "", "nnz": None, "bytes": 0, "bits_per_element": 0.0})  # fmt: skip
            continue
        numel = math.prod(rec["shape"])
        nbytes = sum(sizes.get(k, 0) for k in rec["payloads"].values())
        rows.append({
            "name": name,
            "shape": "x".join(str(d) for d in rec["shape"]) or "scalar",
            "layout": _describe_layout(rec),
            "codec": _describe_codec(rec),
            "nnz": _stored_values(rec["layout"], numel),
            "bytes": nbytes,
            "bits_per_element": 8 * nbytes / numel if numel else 0.0,
        })  # fmt: skip
    return rows


def _index_symbols(layout: dict[str, Any], numel: int, buf: np.ndarray) -> np.ndarray:
    """The symbols of a plain (not entropy-coded) sparse index: mask bits, delta or nm codes."""
    if layout["format"] == "bitmask":
        return np.unpackbits(buf, count=numel, bitorder="little").astype(np.int64)
    if layout["format"] == "nm":
        return unpack_bits(buf, layout["bits"], numel // layout["m"])
    codes = unpack_bits(buf, layout["bits"], buf.size * 8 // layout["bits"])  # delta
    kept = np.flatnonzero(codes)
    return codes[: int(kept[layout["nnz"] - 1]) + 1] if layout["nnz"] else codes[:0]


def _streams(rec: dict[str, Any], stored: dict[str, Any]) -> list[tuple[str, dict, Any]]:
    """``(payload, packing record or None, symbols)`` of each integer stream of a tensor."""
    out = []
    layout, numel = rec["layout"], math.prod(rec["shape"])
    if layout["format"] != "dense":
        buf = stored[rec["payloads"]["index"]].numpy()
        coded = layout.get("packing")
        symbols = decode_symbols(buf, coded) if coded else _index_symbols(layout, numel, buf)
        out.append(("index", coded, symbols))
    packing = rec.get("packing")
    if packing is not None:
        buf = stored[rec["payloads"]["codes"]].numpy()
        if packing.get("kind", "bitpack") == "bitpack":
            symbols = unpack_bits(buf, packing["bits"], packing["count"])
        else:
            symbols = decode_symbols(buf, packing)
        out.append(("codes", packing, symbols))
    return out


def entropy_rows(path: str | Path) -> list[dict[str, Any]]:
    """One dict per integer stream of the artifact (value codes, sparse indices).

    Args:
        path: the artifact directory.

    Returns:
        Dicts with ``tensor``, ``stream`` (``codes`` or ``index``), ``coder`` (``huffman``,
        ``ans`` or ``bitpack``), ``symbols`` (count), ``alphabet`` (distinct symbols),
        ``entropy_bits`` (empirical entropy H, bits/symbol), ``stream_bits_per_symbol`` (the
        stored stream alone), ``bits_per_symbol`` (stream + coding table), ``table_bytes``
        and ``bytes`` (stream + table).

    Raises:
        ArtifactError: the artifact is missing, corrupt or cannot be decoded.
    """
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    stored = load_file(str(root / TENSORS))
    rows = []
    for name, rec in manifest["tensors"].items():
        if "alias_of" in rec:
            continue
        for stream, packing, symbols in _streams(rec, stored):
            nbytes = int(stored[rec["payloads"][stream]].numel())
            coder = (packing or {}).get("kind", "bitpack")
            table = packing["table"]["bytes"] if coder != "bitpack" else 0
            stats = stream_stats(symbols, table, nbytes - table, coder)
            rows.append({"tensor": name, "stream": stream, **stats, "table_bytes": table,
                         "bytes": nbytes})  # fmt: skip
    return rows


def entropy_table(path: str | Path) -> Table | None:
    """The per-stream table (coder, symbols, alphabet, entropy, coded bits), or None."""
    rows = entropy_rows(path)
    if not rows:
        return None
    table = Table(title="integer streams", caption="coded b/sym: stream + coding table")
    for col, just in [("tensor", "left"), ("stream", "left"), ("coder", "left"),
                      ("symbols", "right"), ("alphabet", "right"), ("entropy b/sym", "right"),
                      ("coded b/sym", "right"), ("table B", "right"), ("bytes", "right")]:  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["tensor"], r["stream"], r["coder"], f"{r['symbols']:,}",
                      f"{r['alphabet']:,}", f"{r['entropy_bits']:.3f}",
                      f"{r['bits_per_symbol']:.3f}", f"{r['table_bytes']:,}",
                      f"{r['bytes']:,}")  # fmt: skip
    return table


def inspect_table(path: str | Path) -> RenderableType:
    """What ``modelpress inspect`` prints: :func:`tensor_table`, then :func:`entropy_table`
    when the artifact has integer streams."""
    streams = entropy_table(path)
    main = tensor_table(path)
    return main if streams is None else Group(main, streams)


def tensor_table(path: str | Path) -> Table:
    """The per-tensor table, with the files' bytes in the caption."""
    root = Path(path).expanduser()
    rows = tensor_rows(root)
    table = Table(title=f"{root}")
    for col, just in [("tensor", "left"), ("shape", "left"), ("layout", "left"),
                      ("values", "left"), ("nonzeros", "right"), ("bytes", "right"),
                      ("bits/elem", "right")]:  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["name"], r["shape"], r["layout"], r["codec"],
                      "-" if r["nnz"] is None else f"{r['nnz']:,}", f"{r['bytes']:,}",
                      f"{r['bits_per_element']:.2f}")  # fmt: skip
    files = {MANIFEST: (root / MANIFEST).stat().st_size, TENSORS: (root / TENSORS).stat().st_size}
    total = sum(files.values())
    table.caption = (
        f"payload {sum(r['bytes'] for r in rows):,} B; files: "
        + ", ".join(f"{k} {v:,} B" for k, v in files.items())
        + f"; directory {total:,} B"
    )
    return table
