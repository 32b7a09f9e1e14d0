"""Smoke test of ``python -m fastinfluence demo`` on a tiny setting (1 epoch, 32², 60 slices)."""

from __future__ import annotations

import json
import math

import torch

from fastinfluence.cli import main


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

    # precision@k counts the flipped labels among the k largest scores.
    for entry in summary["precision_at_k"]:
        top = order[: entry["k"]]
        assert entry["flipped_found"] == int(flipped[top].sum())
        expected = entry["k"] * sizes["flipped"] / len(flipped)
        assert math.isclose(entry["expected_at_random"], expected)

    influence = summary["influence"]
    assert influence["path"] == "head-closed-form" and influence["solve"]["converged"]
    assert set(influence["seconds"]) >= {"solve", "scores"}
    assert all(0 <= value <= 1 for value in summary["accuracy"].values())
