"""Smoke test of examples/vit_brain_tumour.py: a tiny brain-tumour set, one epoch of the ViT,
every training image scored against the validation set, the table and figure written and a
rerun resumed."""

from __future__ import annotations

import json

import pytest
from example_loader import load_example

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow  # generates images, trains and solves

TINY = ["--n-slices", "24", "--n-patients", "12", "--image-size", "16", "--epochs", "1",
        "--cg-iterations", "5", "--top", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def example():
    return load_example("vit_brain_tumour")


def test_refuses_an_image_size_the_patches_do_not_tile(example):
    with pytest.raises(SystemExit, match="--image-size must be a multiple of 8"):
        example.CLI.parse_args(["--image-size", "20"])


@pytest.mark.parametrize("params", ["all", "last"])
def test_scores_every_training_image_and_ranks_them(example, tmp_path, params):
    result = example.main([*TINY, "--params", params, "--out", str(tmp_path)])
    (run,) = result["runs"]
    assert json.loads((tmp_path / "runs.json").read_text())["runs"] == result["runs"]
    scores = run["scores"]
    assert len(scores) == run["n_train"] and all(s == s for s in scores)
    assert [e["score"] for e in run["harmful"]] == sorted(scores, reverse=True)[:2]
    assert [e["score"] for e in run["helpful"]] == sorted(scores)[:2]
    assert 0 <= run["majority"]["val_accuracy"] <= 1 and 0 <= run["val_accuracy"] <= 1
    assert (tmp_path / "influence.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert f"#{run['harmful'][0]['index']} " in table
    # a rerun with the same settings finds the run done and trains nothing
    again = example.main([*TINY, "--params", params, "--out", str(tmp_path)])
    assert again["runs"] == result["runs"]
    assert (tmp_path / "table.md").read_text() == table
