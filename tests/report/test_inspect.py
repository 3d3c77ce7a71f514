"""``modelpress inspect`` rows: the layout each tensor was stored in and what it holds."""

from __future__ import annotations

import modelpress as mp
from modelpress.report.inspect import tensor_rows


def test_nm_tensors_show_their_pattern_and_stored_values(tmp_path, mlp):
    result = mp.compress(mlp, [{"technique": "prune.nm", "n": 2, "m": 4}], latency_runs=0)
    rows = {r["name"]: r for r in tensor_rows(result.save(tmp_path / "nm"))}
    fc1 = rows["fc1.weight"]
    assert fc1["layout"] == "nm 2:4 3b"
    assert fc1["nnz"] == 128 * 64 // 2
    assert fc1["bits_per_element"] < 16.9  # 16 bits of fp32 values + 0.75 of index per weight
