"""Smoke tests of ``bench_scale.py`` on the tiniest settings: a resumable sweep end to end
(agreement, caps, refusal of other settings), the peers where they import, the deterministic
replication of the images, the targets' arithmetic, the GPU step's command on the CPU and its
refusal of ``--device cuda`` without CUDA."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from bench_scale import (
    PEER_MODULES,
    build_model,
    deadline_of,
    main,
    parse_args,
    replicate,
    summary_text,
    table,
    targets,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-images", "24", "--n-val", "4", "--train-steps", "2", "--cg-max-iter", "200",
        "--batch-size", "16", "--store-k", "4"]


def test_replicate_is_deterministic_and_copy_zero_is_the_image():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    labels = torch.tensor([0, 2])
    x, y = replicate(images, labels, 5)
    assert x.shape == (5, 1, 4, 4) and y.tolist() == [0, 2, 0, 2, 0]
    assert torch.equal(x[:2], images)
    # copy 1: flipped left–right, rolled by (−2, −2); copy 2: not flipped, rolled by (−1, −2)
    assert torch.equal(x[2], torch.roll(images[0].flip(-1), (-2, -2), dims=(-2, -1)))
    assert torch.equal(x[4], torch.roll(images[0], (-1, -2), dims=(-2, -1)))
    assert torch.equal(replicate(images, labels, 5)[0], x)


@pytest.mark.slow
def test_a_tiny_sweep_resumes_and_agrees_with_itself(tmp_path):
    out = tmp_path / "scale.json"
    argv = [*TINY, "--models", "paper-cnn", "--sizes", "24", "48", "--methods", "cg", "store",
            "direct", "subsample", "--out", str(out), "--cache", str(tmp_path / "cache")]
    report = main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    cg, store = report["runs"]["paper-cnn/48/cg"], report["runs"]["paper-cnn/48/store"]
    direct, subsample = (report["runs"]["paper-cnn/48/direct"],
                         report["runs"]["paper-cnn/48/subsample"])
    assert direct["status"] == "ok" and direct["notes"]["solver"] == "direct", direct
    assert direct["notes"]["converged"] and direct["notes"]["products"] == 1
    assert direct["agreement"] == {"exact": "direct", "pearson": pytest.approx(1.0),
                                   "relative_error": 0.0}
    # CG and the direct solve (both float32, to their tolerance) are the same scores
    assert cg["status"] == "ok" and cg["notes"]["converged"], cg
    assert cg["agreement"]["exact"] == "direct" and cg["agreement"]["relative_error"] < 1e-3
    assert subsample["notes"]["solver"] == "direct"
    assert subsample["notes"]["curvature_samples"] == 5  # round(0.1 · 48)
    assert set(cg["stages"]) == {"curvature", "solve", "scoring"}
    assert cg["peak_rss_mib"] >= cg["rss_mib"]["baseline"] > 50  # this process, not its parent
    assert store["status"] == "ok" and -1 <= store["agreement"]["pearson"] <= 1
    assert store["notes"]["dim"] > 0 and set(store["stages"]) == {"curvature", "scoring"}
    assert "| cg | 48 |" in table(report, "paper-cnn")

    # the same command again runs nothing: every entry (with its date) is kept
    assert main(argv)["runs"] == report["runs"]
    # a JSON written with other settings is refused, never overwritten
    with pytest.raises(SystemExit, match="other settings"):
        main([*argv, "--damping", "0.5"])

    # a run past its cap is recorded as capped, and not started at a larger n
    capped = main([*TINY, "--models", "paper-cnn", "--sizes", "24", "48", "--methods", "cg",
                   "--cap", "0.5", "--out", str(tmp_path / "capped.json"),
                   "--cache", str(tmp_path / "cache")])["runs"]
    assert capped["paper-cnn/24/cg"] == {**capped["paper-cnn/24/cg"], "status": "capped",
                                         "cap_seconds": 0.5}
    assert capped["paper-cnn/48/cg"] == {"status": "not run", "reason": "capped at n = 24"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(PEER_MODULES))
def test_peers_run_where_they_import(method, tmp_path):
    if importlib.util.find_spec(PEER_MODULES[method]) is None:
        pytest.skip(f"{PEER_MODULES[method]} is not installed")
    report = main([*TINY, "--models", "paper-cnn", "--sizes", "24", "--methods", "cg", method,
                   "--store-k", "8", "--out", str(tmp_path / "scale.json"),
                   "--cache", str(tmp_path / "cache")])
    entry = report["runs"][f"paper-cnn/24/{method}"]
    assert entry["status"] == "ok", entry
    assert -1 <= entry["agreement"]["pearson"] <= 1


@pytest.mark.slow
def test_the_gpu_step_runs_on_the_cpu_at_tiny_n(tmp_path):
    """``scripts/gpu_check.sh``'s scale step with ``--device cpu``, a narrow network and 16
    images (the same code path as the 50k-image, width-64 run)."""
    step = (ROOT / "scripts/gpu_check.sh").read_text()
    command = re.search(r'"\$PYTHON" benchmarks/bench_scale\.py (--device cuda .*?)--out', step,
                        re.DOTALL).group(1)
    argv = command.replace("\\\n", " ").replace('"${SCALE_CAP:-660}"', "300").split()
    argv = [*argv, "--device", "cpu", "--sizes", "16", "--cifar-width", "4", *TINY,
            "--out", str(tmp_path / "scale.json"), "--cache", str(tmp_path / "cache")]
    runs = main(argv)["runs"]
    assert {key: entry["status"] for key, entry in runs.items()} == {
        "resnet18-cifar/16/store": "ok", "resnet18-cifar/16/cg": "ok"}
    assert runs["resnet18-cifar/16/store"]["agreement"]["exact"] == "cg"


def test_the_cifar_resnet18_has_resnet18s_size():
    model = build_model("resnet18-cifar", parse_args([]))
    assert 11.1e6 < sum(p.numel() for p in model.parameters()) < 11.3e6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err


def _entry(seconds: float, rss: float, pearson: float | None = None, **notes) -> dict:
    entry = {"status": "ok", "seconds": seconds, "stages": {"total": seconds},
             "peak_rss_mib": rss, "rss_mib": {"baseline": 100.0}, "notes": notes}
    if pearson is not None:
        entry["agreement"] = {"exact": "cg", "pearson": pearson, "relative_error": 0.1}
    return entry


def test_targets_are_ratios_of_the_report():
    report = {"models": {"m": {"parameters": 10, "train_accuracy": 1.0, "val_accuracy": 0.5}},
              "runs": {"m/5000/cg": _entry(10.0, 200.0, 1.0, converged=True),
                       "m/50000/cg": _entry(125.0, 400.0, 1.0, converged=True),
                       "m/50000/subsample": _entry(30.0, 300.0, 0.9),
                       "m/50000/store": _entry(20.0, 300.0, 0.8, dim=344),
                       "m/50000/kronfluence-ekfac": _entry(50.0, 300.0, 0.7),
                       "m/50000/trak": _entry(40.0, 300.0, 0.2, proj_dim=344)}}
    lines = targets(report, "m")
    assert ("- cg: seconds per sample at n = 50000 / n = 5000: 1.25 (target 1 ± 0.2: missed); "
            "peak RSS ratio 2.00") in lines
    assert "| 5000 | — | — | — | — | — | — | 1.0000, —, —, — | —, — |" in lines
    assert ("| 50000 | — | — | 2.50 | — | 0.60 | 0.50 | 1.0000, —, 0.9000, 0.7000 | 0.8000, "
            "0.2000 |" in lines)
    assert "### m (p = 10" in summary_text(report)


def test_docs_page_is_the_committed_json():
    report = json.loads((ROOT / "benchmarks/results/scale_cpu.json").read_text())
    page = (ROOT / "docs/benchmarks/scale.md").read_text()
    assert summary_text(report) in page
    # every ratio or correlation the reading quotes is one of the generated text's
    prose = page.split("## Reading", 1)[1]
    quoted = set(re.findall(r"\b\d+\.\d{2,4}\b", prose))
    assert quoted <= set(re.findall(r"\b\d+\.\d{2,4}\b", summary_text(report))), quoted


def test_a_deadline_is_the_next_such_time_past_midnight_too():
    at = datetime.datetime(2026, 12, 7, 23, 50, tzinfo=datetime.UTC)
    assert deadline_of("23:55", None, at) == at.replace(minute=55).timestamp()
    assert deadline_of("01:30", None, at) == datetime.datetime(
        2026, 12, 8, 1, 30, tzinfo=datetime.UTC).timestamp()
