"""Smoke test of benchmarks/float32_tolerance.py on the smallest settings."""

import json

from float32_tolerance import main


def test_float32_tolerance_script_runs(tmp_path):
    out = tmp_path / "floors.json"
    report = main(["--dampings", "0.01", "--max-iter", "20", "--digits", "200",
                   "--n-large", "300", "--cnn-steps", "0", "--n-train", "16", "--n-val", "4",
                   "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["default_tol_float32"] == 1e-4
    assert [row["problem"] for row in report["rows"]] == [
        "digits-logistic", "digits-mlp", "logistic-300", "paper-cnn-0-steps"]
    assert all(0 < row["floor"] < 1e-2 for row in report["rows"])
    assert all(isinstance(row["capped"], bool) for row in report["rows"])
