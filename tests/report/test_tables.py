"""The stage table: ratios, bits/param and a plain "none" where no speedup can exist."""

from __future__ import annotations

from modelpress.report.tables import layer_table, metrics_table, render, speedup

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


def test_layer_table_shows_bits_per_layer_from_stage_records():
    stages = [
        {"technique": "prune.magnitude", "learned": {"sparsity": {"fc1": 0.5, "fc2": 0.25}}},
        {"technique": "quant.mixed", "learned": {"bits": {"fc1": 3, "fc3": 8}, "budget_bytes": 9}},
    ]
    text = render(layer_table(stages), width=160)
    assert "1. prune.magnitude sparsity" in text and "2. quant.mixed bits" in text
    cells = [line.replace("│", " ").split() for line in text.splitlines() if "fc" in line]
    rows = {c[0]: c[1:] for c in cells if c[0].startswith("fc")}
    assert rows == {"fc1": ["0.5000", "3"], "fc2": ["0.2500", "-"], "fc3": ["-", "8"]}
    assert layer_table([{"technique": "train", "learned": {"steps": 5}}]) is None
