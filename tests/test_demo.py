"""``python -m fastinfluence demo``: a smoke test on a tiny setting (1 epoch, 32², 60 slices),
its early refusals (bad options, no matplotlib) and its precision@k line."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from fastinfluence import demo
from fastinfluence.cli import main


@pytest.fixture
def no_data_generation(monkeypatch):
    """Make generating the demo's data an error: a refusal must come before it."""

    def generate(*args, **kwargs):
        raise AssertionError("the demo generated data before refusing")

    monkeypatch.setattr(demo, "make_brain_tumour", generate)


def test_demo_writes_figure_and_consistent_summary(tmp_path, capsys):
    out = tmp_path / "demo" / "influence.png"
    status = main([
        "demo", "--epochs", "1", "--image-size", "32", "--slices", "60", "--patients", "12",
        "--label-noise", "0.25", "--out", str(out), "--no-progress", "--device", "cpu",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    summary_path = out.with_name("summary.json")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000
    assert str(out) in printed and str(summary_path) in printed
    assert "precision@" in printed and "most harmful" in printed
    assert "val and test accuracy are not comparable" in printed

    summary = json.loads(summary_path.read_text())
    sizes = summary["sizes"]
    scores = torch.tensor(summary["scores"])
    flipped = torch.tensor(summary["flipped"])
    assert sizes["train"] + sizes["val"] + sizes["test"] == 60
    assert len(scores) == len(flipped) == sizes["train"]
    assert torch.isfinite(scores).all() and scores.abs().max() > 0
    assert int(flipped.sum()) == sizes["flipped"] > 0

    # The listed samples are the extremes of the scores, in order, with the right flags.
    k = len(summary["most_harmful"])
    assert k == min(8, sizes["train"])
    order = torch.argsort(scores, descending=True)
    harmful = [row["score"] for row in summary["most_harmful"]]
    helpful = [row["score"] for row in summary["most_helpful"]]
    assert harmful == sorted(harmful, reverse=True) and math.isclose(harmful[0], scores.max())
    assert helpful == sorted(helpful) and math.isclose(helpful[0], scores.min())
    for row in summary["most_harmful"] + summary["most_helpful"]:
        assert row["flipped"] == bool(flipped[row["index"]])
        assert (row["label"] != row["true_label"]) == row["flipped"]

    # precision@k: the flipped fraction of the k largest scores; chance: the flipped fraction.
    chance = sizes["flipped"] / len(flipped)
    for entry in summary["precision_at_k"]:
        top = order[: entry["k"]]
        assert entry["flipped_found"] == int(flipped[top].sum())
        assert math.isclose(entry["precision"], entry["flipped_found"] / entry["k"])
        assert math.isclose(entry["chance_precision"], chance)
        assert f"precision@{entry['k']} " in printed
    assert f"chance level {chance:.2f}" in printed
    assert "clean" in summary["accuracy_note"] and "noise" in summary["accuracy_note"]

    influence = summary["influence"]
    assert influence["path"] == "head-closed-form" and influence["solve"]["converged"]
    assert set(influence["seconds"]) >= {"solve", "scores"}
    assert all(0 <= value <= 1 for value in summary["accuracy"].values())


def test_precision_line_states_the_precision_and_its_chance_level():
    flipped = torch.tensor([True, False, False, True, False, False, False, False, False, False])
    harmful_order = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7, 8, 9])
    entry = demo._precision_at(4, harmful_order, flipped)  # samples 3, 1, 0, 2: two flipped
    assert entry == {"k": 4, "flipped_found": 2, "precision": 0.5, "chance_precision": 0.2}
    line = demo._precision_line(entry)
    assert "precision@4" in line and "0.50 (2 of 4)" in line
    assert "chance level 0.20" in line and "2.5x chance" in line


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
