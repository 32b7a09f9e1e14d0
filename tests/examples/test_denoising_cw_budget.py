"""Smoke test of examples/denoising_cw_budget.py: tiny settings, two budgets, one added later."""

from __future__ import annotations

import json

import pytest
from example_loader import load_example

pytest.importorskip("art")  # C&W needs the adversarial-robustness-toolbox

pytestmark = pytest.mark.slow  # trains two classifiers and runs C&W

TINY = ["--n-images", "60", "--image-size", "16", "--width", "4", "--epochs", "1",
        "--cw-images", "8", "--cw-searches", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def budget():
    return load_example("denoising_cw_budget")


def test_one_run_per_budget_resumed_extended_and_redrawn(budget, tmp_path):
    out = tmp_path / "cw"
    first = budget.main([*TINY, "--cw-iterations", "3", "1", "--out", str(out)])
    assert [r["iterations"] for r in first["runs"]] == [1, 3]
    for run in first["runs"]:
        assert run["images"] == 8
        assert 0 <= run["changed_fraction"] <= 1 and run["mean_l2"] >= 0
        # the attack is crafted on the source: white-box it can only lower its accuracy
        assert run["attacked"]["source"] <= run["clean"]["source"]
        assert run["clean"] == first["runs"][0]["clean"]  # the same two models throughout
    assert (out / "figure_cw_budget.png").stat().st_size > 0
    # a later command adds a budget and keeps the saved runs
    again = budget.main([*TINY, "--cw-iterations", "2", "--out", str(out)])
    assert sorted(r["iterations"] for r in again["runs"]) == [1, 2, 3]
    assert again["runs"][:2] == first["runs"]
    saved = json.loads((out / "runs.json").read_text())
    assert sorted(saved["settings"]["cw_iterations"]) == [1, 2, 3]
    table = (out / "table.md").read_text()
    budget.main([*TINY, "--cw-iterations", "2", "--out", str(out), "--no-train"])
    assert (out / "table.md").read_text() == table


def test_bad_budgets_are_refused(budget):
    with pytest.raises(SystemExit, match="--cw-iterations"):
        budget.CLI.parse_args(["--cw-iterations", "0"])
