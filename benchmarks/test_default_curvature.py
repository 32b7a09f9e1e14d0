"""Smoke test of benchmarks/default_curvature.py on the smallest settings."""

import json

from default_curvature import main


def test_default_curvature_script_runs(tmp_path):
    out = tmp_path / "curvature.json"
    report = main(["--seeds", "1", "--n-train", "24", "--n-val", "4", "--train-steps", "0",
                   "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == report["summary"]
    row = saved["rows"][0]
    assert row["gauss-newton"]["outcome"] == "ok"
    assert row["exact"]["outcome"] in {"ok", "not-positive-definite", "diverged"}
    assert set(row["product_seconds"]) == {"exact", "gauss-newton"}
