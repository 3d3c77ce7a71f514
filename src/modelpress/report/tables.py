"""Terminal tables (rich): baseline vs each stage, and per-tensor artifact contents."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

CAPTION = (
    "baseline bytes: its torch.save(state_dict) file; stage bytes: the artifact directory "
    "written after that stage (once saved, the last row is the saved directory, its embedded "
    'recipe and metrics included); speedup: baseline latency / stage latency, "none" where '
    "the dense FLOPs are unchanged (zeroed or fake-quantized weights still run as dense fp32)"
)


def _fmt_int(v: float | None) -> str:
    return "-" if v is None else f"{int(v):,}"


def _fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def metrics_table(rows: Sequence[tuple[str, dict[str, Any]]], title: str = "") -> Table:
    """One row per stage: evaluator metrics, params, nonzeros, FLOPs, bytes, ratio, latency.

    ``rows[0]`` is the baseline; the ratio column is ``baseline bytes / row bytes``, and
    bits/param is ``8 * bytes / params`` (everything on disk, divided over the parameters).
    """
    metric_names: list[str] = []
    for _, m in rows:
        metric_names += [k for k in m.get("eval", {}) if k not in metric_names]
    table = Table(title=title or None, caption=CAPTION)
    table.add_column("stage", no_wrap=True)
    for name in metric_names:
        table.add_column(name, justify="right")
    for col in (
        "params",
        "nonzeros",
        "FLOPs",
        "bytes on disk",
        "bits/param",
        "ratio",
        "latency ms",
        "speedup",
    ):
        table.add_column(col, justify="right")
    base_bytes = rows[0][1].get("bytes") if rows else None
    base = rows[0][1] if rows else {}
    for label, m in rows:
        ev = m.get("eval", {})
        size = m.get("bytes")
        ratio = f"{base_bytes / size:.1f}x" if base_bytes and size else "-"
        lat = m.get("latency_ms")
        table.add_row(
            label,
            *(_fmt_metric(ev.get(k)) for k in metric_names),
            _fmt_int(m.get("params")),
            _fmt_int(m.get("nonzeros")),
            _fmt_int(m.get("flops")),
            _fmt_int(size),
            f"{8 * size / m['params']:.2f}" if size and m.get("params") else "-",
            ratio,
            "-" if lat is None else f"{lat:.3f}",
            speedup(base, m),
        )
    return table


def speedup(base: dict[str, Any], row: dict[str, Any]) -> str:
    """Baseline latency over the row's, or a plain ``none`` where the dense compute is the same.

    Zeroed (unstructured, N:M) or fake-quantized weights still run as dense fp32 matrices in
    eager PyTorch, so a model whose FLOPs equal the baseline's gets no speedup; saying so
    beats printing a ratio of two noisy equal timings.
    """
    if row is base:
        return "1.00x"
    if row.get("flops") is not None and row.get("flops") == base.get("flops"):
        return "none"
    lat, base_lat = row.get("latency_ms"), base.get("latency_ms")
    return f"{base_lat / lat:.2f}x" if lat and base_lat else "-"


def render(table: Table, width: int = 120) -> str:
    """A rich renderable as plain text."""
    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, highlight=False).print(table)
    return buf.getvalue()


PER_LAYER_KEYS = ("bits", "sparsity", "dtype", "bytes")  # flat {layer: value} stage results


def layer_table(stages: Sequence[Any], title: str = "per layer") -> Table | None:
    """One row per layer, one column per stage and per-layer quantity it learned.

    The quantities are the flat ``{layer: value}`` entries of each stage's learned record
    named in :data:`PER_LAYER_KEYS`: bits (``quant.rtn``, ``quant.gptq``, ``quant.mixed``),
    sparsity (pruning), dtype (``quant.cast``), bytes (``quant.mixed``). A layer a stage did not
    touch shows ``-``.

    Args:
        stages: :class:`~modelpress.result.StageRecord` objects, or the ``stages`` dicts of an
            artifact manifest (each with ``technique`` and ``learned``).
        title: the table title.

    Returns:
        The table, or None when no stage learned anything per layer.
    """
    columns: list[tuple[str, dict[str, Any]]] = []
    for i, stage in enumerate(stages, 1):
        technique = stage["technique"] if isinstance(stage, dict) else stage.technique
        learned = stage["learned"] if isinstance(stage, dict) else stage.learned
        for key in PER_LAYER_KEYS:
            if isinstance(learned.get(key), dict) and learned[key]:
                columns.append((f"{i}. {technique} {key}", learned[key]))
    if not columns:
        return None
    layers = list(dict.fromkeys(name for _, values in columns for name in values))
    table = Table(title=title or None)
    table.add_column("layer", no_wrap=True)
    for label, _ in columns:
        table.add_column(label, justify="right")
    for name in layers:
        table.add_row(name, *(_fmt_value(values.get(name)) for _, values in columns))
    return table


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
