"""The stage table: ratios, bits/param and a plain "none" where no speedup can exist."""

from __future__ import annotations

from modelpress.report.tables import metrics_table, render, speedup

BASE = {"params": 1000, "nonzeros": 1000, "flops": 2000, "bytes": 4000, "latency_ms": 2.0}


def test_speedup_is_a_ratio_only_when_the_dense_compute_shrank():
    sparse = {**BASE, "nonzeros": 100, "bytes": 800, "latency_ms": 1.9}
    shrunk = {**BASE, "params": 500, "flops": 1000, "bytes": 2000, "latency_ms": 1.0}
    assert speedup(BASE, BASE) == "1.00x"
    assert speedup(BASE, sparse) == "none"
    assert speedup(BASE, shrunk) == "2.00x"
    assert speedup(BASE, {"flops": 10}) == "-"  # no latency measured


def test_table_rows():
    sparse = {**BASE, "nonzeros": 100, "bytes": 800, "latency_ms": 1.9, "eval": {"accuracy": 0.9}}
    text = render(metrics_table([("baseline", BASE), ("1. prune.magnitude", sparse)]), width=160)
    row = next(line for line in text.splitlines() if "1. prune.magnitude" in line)
    assert "5.0x" in row and "6.40" in row and "none" in row
