"""Smoke test of benchmarks/bench_distributed.py: 1 and 2 gloo ranks on the smallest settings."""

import json

import pytest
from bench_distributed import main


@pytest.mark.slow
def test_distributed_benchmark_runs_and_ranks_agree(tmp_path):
    out = tmp_path / "distributed.json"
    report = main(["--ranks", "1", "2", "--size", "32", "--n-train", "12", "--n-val", "4",
                   "--repeats", "1", "--cg-max-iter", "1", "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == report["runs"]
    one, two = report["runs"]["1"], report["runs"]["2"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert abs(one["score_checksum"] - two["score_checksum"]) <= 1e-4 * abs(one["score_checksum"])
    assert one["scoring_collective_share"] == 0.0 and 0.0 < two["scoring_collective_share"] < 1
