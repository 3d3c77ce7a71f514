"""What an artifact holds: per-tensor layout, codec, nonzeros and bytes (``modelpress inspect``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table
from safetensors import safe_open

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
    if layout["format"] == "delta":
        return f"delta {layout['bits']}b"
    if layout["format"] == "nm":
        return f"nm {layout['n']}:{layout['m']} {layout['bits']}b"
    return layout["format"]


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


def inspect_table(path: str | Path) -> Table:
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
