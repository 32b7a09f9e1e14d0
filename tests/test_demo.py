"""``python -m fastinfluence demo``: a smoke test on a tiny setting (1 epoch, 32², 60 slices),
its plain-words result against a recomputation from the run's scores, and its early refusals
(bad options, no matplotlib)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
import torch

from fastinfluence import demo
from fastinfluence.cli import main
from fastinfluence.robust import DETECTORS

pytestmark = pytest.mark.slow  # trains the model it scores


@pytest.fixture
def no_data_generation(monkeypatch):
    """Make generating the demo's data an error: a refusal must come before it."""

    def generate(*args, **kwargs):
        raise AssertionError("the demo generated data before refusing")

    monkeypatch.setattr(demo, "make_brain_tumour", generate)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One tiny demo run through the CLI (1 epoch, 32², 60 slices): its printed report,
    figure path and summary."""
    out = tmp_path_factory.mktemp("demo") / "influence.png"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        status = main([
            "demo", "--epochs", "1", "--image-size", "32", "--slices", "60", "--patients",
            "12", "--label-noise", "0.25", "--out", str(out), "--no-progress", "--device",
            "cpu",
        ])
    assert status == 0
    return capture.getvalue(), out, json.loads(out.with_name("summary.json").read_text())


def test_demo_writes_figure_and_consistent_summary(small_run):
    printed, out, summary = small_run
    summary_path = out.with_name("summary.json")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000
    assert str(out) in printed and str(summary_path) in printed
    assert "highest self-influence" in printed and "most harmful" in printed

    sizes = summary["sizes"]
    scores = {name: torch.tensor(values, dtype=torch.float64)
              for name, values in summary["scores"].items()}
    flipped = torch.tensor(summary["flipped"])
    assert sizes["train"] + sizes["val"] == 60
    assert set(scores) == set(DETECTORS)
    for values in scores.values():
        assert len(values) == sizes["train"] and torch.isfinite(values).all()
    assert int(flipped.sum()) == sizes["flipped"] > 0

    # The listed samples are the largest scores of their ranking, in order, with the right
    # flags.
    k = min(8, sizes["train"])
    for key, rows in (("self_influence", summary["most_suspect"]),
                      ("val_influence", summary["most_harmful"])):
        listed = [row[key] for row in rows]
        assert len(rows) == k
        assert listed == sorted(listed, reverse=True)
        assert math.isclose(listed[0], scores[key].max())
        for row in rows:
            assert row["flipped"] == bool(flipped[row["index"]])
            assert (row["label"] != row["true_label"]) == row["flipped"]
            assert math.isclose(row["self_influence"], scores["self_influence"][row["index"]])
            assert math.isclose(row["val_influence"], scores["val_influence"][row["index"]])

    influence = summary["influence"]
    assert influence["path"] == "head-closed-form" and influence["solve"]["converged"]
    assert set(influence["seconds"]) >= {"solve", "scores"}


def _auc_by_pairs(scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """ROC-AUC by its definition: over every (flipped, true) pair, 1 when the flipped sample
    scores higher, 1/2 on a tie."""
    pairs = scores[flipped][:, None] - scores[~flipped][None, :]
    return float(((pairs > 0).double() + 0.5 * (pairs == 0).double()).mean())


def test_demo_result_is_computed_from_the_run(small_run):
    """The plain-words result recomputed from the run's own scores and flip mask: flips in
    each ranking's top k against k·(flipped fraction), the fraction flipped among each
    ranking's top n_flipped, ROC-AUC, the validation accuracy against the most common training
    label's, and the printed lines state exactly those numbers."""
    printed, out, summary = small_run
    result = summary["result"]
    flipped = torch.tensor(summary["flipped"])
    n_train, n_flipped = len(flipped), int(flipped.sum())
    assert (result["n_train"], result["n_flipped"]) == (n_train, n_flipped)
    k = len(summary["most_suspect"])
    chance = n_flipped / n_train
    assert set(result["top_k"]) == {"self_influence", "val_influence"}
    for name, entry in result["top_k"].items():
        scores = torch.tensor(summary["scores"][name], dtype=torch.float64)
        found = int(flipped[torch.argsort(scores, descending=True)[:k]].sum())
        assert entry["k"] == k and entry["flipped_found"] == found
        assert math.isclose(entry["precision"], found / k)  # precision@k, against chance:
        assert math.isclose(entry["chance_precision"], chance)
        assert math.isclose(entry["expected_by_chance"], k * chance)
        assert (f"{found} of the {k} training samples with the highest "
                f"{demo.RANKING_NAMES[name]} carry a planted flipped label; a random pick of "
                f"{k} would hold {k * chance:.1f} ({found / (k * chance):.1f}x chance)"
                ) in printed
    assert set(result["detection"]) == set(DETECTORS)
    for name, metrics in result["detection"].items():
        scores = torch.tensor(summary["scores"][name], dtype=torch.float64)
        top = torch.argsort(scores, descending=True)[:n_flipped]
        if name != "loop":  # LoOP probabilities can tie at the cut (counted by their share)
            assert math.isclose(metrics["precision"], float(flipped[top].double().mean()))
        assert math.isclose(metrics["auc"], _auc_by_pairs(scores, flipped))
        assert (f"{demo.RANKING_NAMES[name]}: {metrics['precision']:.0%} flipped, ROC-AUC "
                f"{metrics['auc']:.2f}") in printed
    labels = {name: torch.tensor(values) for name, values in summary["labels"].items()}
    assert math.isclose(result["val_accuracy"],
                        float((labels["val_predicted"] == labels["val"]).double().mean()))
    majority = int(torch.bincount(labels["train_given"]).argmax())
    assert result["majority"]["class"] == majority
    assert math.isclose(result["majority"]["val_accuracy"],
                        float((labels["val"] == majority).double().mean()))
    assert math.isclose(result["uniform_guess"], 1 / 3)
    assert f"validation accuracy {result['val_accuracy']:.3f}" in printed
    assert (f"result: validation accuracy {result['val_accuracy']:.2f}, where guessing scores "
            f"0.33 and always answering {result['majority']['class_name']}") in printed
    assert f"figure: {out}" in printed


def test_result_says_when_no_label_was_flipped(tmp_path):
    """Without a flipped label (label noise 0) there are no detection numbers (undefined
    without flipped samples), and the result says why."""
    out = tmp_path / "influence.png"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        status = main(["demo", "--epochs", "1", "--image-size", "32", "--slices", "100",
                       "--patients", "12", "--label-noise", "0", "--out", str(out),
                       "--no-progress", "--device", "cpu"])
    assert status == 0
    result = json.loads(out.with_name("summary.json").read_text())["result"]
    assert result["detection"] is None and result["n_flipped"] == 0
    assert all(entry["flipped_found"] == entry["precision"] == 0
               for entry in result["top_k"].values())
    printed = capture.getvalue()
    assert "result: validation accuracy" in printed
    assert f"0 of {result['n_train']} training labels were flipped" in printed


def test_image_size_48_is_rejected_at_argument_parsing(no_data_generation, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--image-size", "48", "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: fastinfluence demo" in error
    assert "image_size must be a positive multiple of 32" in error and "got 48" in error


def test_demo_refuses_without_matplotlib_before_generating_data(no_data_generation,
                                                               monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    config = demo.DemoConfig(out=tmp_path / "demo.png", progress=False, device="cpu")
    with pytest.raises(ImportError, match=r'matplotlib.*pip install "fastinfluence\[examples\]"'):
        demo.run_demo(config)


def test_too_few_slices_for_the_rankings_is_a_usage_error_before_training(monkeypatch, capsys,
                                                                            tmp_path):
    """60 slices leave a class with fewer training samples than LoOP's neighbours: the command
    stops with exit status 2 and says what to change, before any training."""
    monkeypatch.setattr(demo, "_train", lambda *args: pytest.fail("trained anyway"))
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--slices", "60", "--patients", "12", "--image-size", "32",
              "--label-noise", "0", "--no-progress", "--out", str(tmp_path / "demo.png")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"needs more than {demo.LOOP_NEIGHBOURS} per class" in error and "--slices" in error
