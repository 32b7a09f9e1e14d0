"""Smoke test of examples/isr_isp_table1.py: every method, both noises, tiny settings."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from example_loader import load_example

pytestmark = pytest.mark.slow  # trains and writes whole example runs


TINY = ["--n-slices", "36", "--n-patients", "12", "--image-size", "32", "--epochs", "2",
        "--pretrain-epochs", "1", "--trials", "1", "--denoiser-epochs", "1",
        "--patch-size", "32", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def table1():
    return load_example("isr_isp_table1")


@pytest.fixture(scope="module")
def finished(table1, tmp_path_factory):
    out = tmp_path_factory.mktemp("table1")
    return out, table1.main([*TINY, "--out", str(out)])


def test_every_method_noise_and_test_set_reported(finished):
    out, result = finished
    saved = json.loads((out / "runs.json").read_text())
    runs, n_train = saved["runs"], saved["meta"]["slices"]["train"]
    assert {(r["method"], r["noise"]) for r in runs} == {
        (m, n) for m in ("naive", "at", "n2v", "isr", "isp") for n in ("gaussian", "rician")
    }
    for run in runs:
        assert set(run["final"]) == set(run["at_best_val"]) == {"rho=0", "rho=0.5"}
        assert len(run["history"]) == 2
        best = run["history"][run["best_epoch"] - 1]
        assert run["at_best_val"] == best["test_accuracies"]
        assert run["best_val_accuracy"] == max(h["val_accuracy"] for h in run["history"])
    isp = [r for r in runs if r["method"] == "isp"]
    assert all(r["method_summary"]["perturbed"] == math.ceil(0.1 * n_train) for r in isp)
    table = (out / "table.md").read_text()
    for name in ("Naive", "AT", "N2V-Training", "ISR", "ISP", "89.52 ± 2.61"):
        assert name in table
    assert (out / "figure1_isp_perturbation.png").stat().st_size > 0
    assert (out / "figure2_training_images.png").stat().st_size > 0
    for noise, images in result["figures"].items():
        assert set(images) == FIGURE_KEYS, noise
        labels = images["labels"].tolist()
        assert len(set(labels)) == len(labels) > 0  # at most one sample of each class


def test_resume_skips_finished_runs_and_refuses_other_settings(table1, finished):
    out, first = finished
    again = table1.main([*TINY, "--out", str(out)])
    assert again["runs"] == json.loads((out / "runs.json").read_text())["runs"]
    assert len(again["runs"]) == len(first["runs"])
    with pytest.raises(SystemExit, match="--fresh"):
        table1.main([*TINY, "--out", str(out), "--epochs", "3"])


FIGURE_KEYS = {"index", "labels", "clean", "noisy", "mask", "AT", "N2V", "ISP", "delta"}


def interrupt_run(table1, monkeypatch, k):
    """Ctrl-C during the second epoch of the ``k``-th (0-based) run this process starts."""
    make_trainer = table1.make_trainer
    started = itertools.count()

    def make(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        if next(started) == k:
            def before_epoch(epoch):
                if epoch == 1:
                    raise KeyboardInterrupt
            trainer.before_epoch = before_epoch
        return trainer

    monkeypatch.setattr(table1, "make_trainer", make)


def without_seconds(runs):
    """The runs without their timings (the only numbers that differ between equal runs)."""
    return [{**r, "seconds": None, "history": [{**h, "seconds": None} for h in r["history"]],
             "method_summary": {k: v for k, v in r["method_summary"].items()
                                if k != "denoiser_seconds"}}
            for r in runs]


def test_interrupted_and_resumed_run_gives_the_same_runs_and_figures(
        table1, finished, tmp_path, monkeypatch, capsys):
    _, uninterrupted = finished
    out = tmp_path / "resumed"
    # Trial 0, Gaussian trains ISP, Naive, AT, N2V, ISR: stop in N2V, after AT has finished.
    interrupt_run(table1, monkeypatch, 3)
    try:
        table1.main([*TINY, "--out", str(out)])
    except KeyboardInterrupt:  # escaping main(), it would end the script with a traceback
        pytest.fail("KeyboardInterrupt escaped main()")
    except SystemExit as stopped:
        assert stopped.code == 130
    else:
        pytest.fail("the interrupted run finished")
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message
    assert f"3 of 10 runs are saved in {out / 'runs.json'}" in message
    assert "resumes" in message
    assert [r["method"] for r in json.loads((out / "runs.json").read_text())["runs"]] == [
        "isp", "naive", "at"]
    monkeypatch.undo()

    resumed = table1.main([*TINY, "--out", str(out)])
    assert without_seconds(resumed["runs"]) == without_seconds(uninterrupted["runs"])
    assert resumed["figures"].keys() == uninterrupted["figures"].keys() == {"gaussian", "rician"}
    for noise, images in resumed["figures"].items():
        expected = uninterrupted["figures"][noise]
        assert set(images) == set(expected) == FIGURE_KEYS, noise
        assert images["index"] == expected["index"]
        for name in FIGURE_KEYS - {"index"}:
            assert torch.equal(images[name], expected[name]), (noise, name)
    assert (out / "figure2_training_images.png").stat().st_size > 0


def test_figures_need_every_saved_run_image(table1, finished, tmp_path, capsys):
    finished_out, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(finished_out, out)
    for figure in out.glob("figure*.png"):
        figure.unlink()
    (out / "figure_inputs" / "rician_at.pt").unlink()
    result = table1.main([*TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "figures not drawn" in printed and str(out / "figure_inputs" / "rician_at.pt") in printed
    assert result["paths"] == [] and not list(out.glob("figure*.png"))


def test_sweeps_make_one_row_per_combination(table1):
    args = table1.parse_args(["--methods", "isr", "isp", "--isr-emphasis", "helpful",
                              "harmful", "--ratio", "0.05", "0.1", "--gamma", "0.01", "0.1"])
    rows = table1.table_rows(table1.settings_from(args))
    labels = [row.label for row in rows]
    assert labels[:2] == ["ISR", "ISR (emphasis=harmful)"]
    assert len(rows) == 2 + 4 and "ISP (ratio=0.05, gamma=0.1)" in labels


def test_head_masks_fill_the_head_and_leave_the_air(table1):
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 2:7, 2:7] = 0.5
    image[0, 0, 4, 4] = 0.0  # a dark pixel inside the head (CSF) is still head
    head = table1.head_masks(image)
    expected = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    expected[0, 0, 2:7, 2:7] = True
    assert torch.equal(head, expected)


def test_isp_summary_reports_the_ratio_against_the_rest_of_the_head(finished):
    out, _ = finished
    runs = json.loads((out / "runs.json").read_text())["runs"]
    isp = [run["method_summary"] for run in runs if run["method"] == "isp"]
    assert isp and all(math.isfinite(summary["delta_tumour_to_head_ratio"]) for summary in isp)
