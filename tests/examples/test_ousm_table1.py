"""Smoke test of examples/ousm_table1.py: every method, two noise rates, tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from example_loader import load_example

pytestmark = pytest.mark.slow  # trains and writes whole example runs


TINY = ["--n-images", "60", "--image-size", "32", "--width", "8", "--epochs", "2",
        "--warmup-epochs", "1", "--reweight-start", "1", "--estimation-epochs", "1",
        "--n-neighbors", "3", "--reference-epochs", "1", "--gammas", "0", "0.2",
        "--trials", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def table1():
    return load_example("ousm_table1")


@pytest.fixture(scope="module")
def finished(table1, tmp_path_factory):
    out = tmp_path_factory.mktemp("ousm_table1")
    return out, table1.main([*TINY, "--out", str(out)])


def test_every_method_and_rate_reported(finished):
    out, _ = finished
    saved = json.loads((out / "runs.json").read_text())
    runs, meta = saved["runs"], saved["meta"]
    methods = ("resnet", "forward", "ousm", "ousm_loop", "influence_reweight",
               "influence_removal")
    assert {(r["method"], r["gamma"]) for r in runs} == {
        ("resnet", 0.0), *((m, 0.2) for m in methods)
    }
    # the paper's noise: 20 % of each class of the scored part flipped, none at γ = 0
    assert meta["flipped"]["0.0"] == 0 and meta["flipped"]["0.2"] > 0
    assert 0 <= meta["reference_accuracy"] <= 1
    for run in runs:
        assert len(run["history"]) == 2
        best = run["history"][run["best_epoch"] - 1]
        assert run["at_best_val"] == best["test_accuracies"]["test"]
        assert run["best_val_accuracy"] == max(h["val_accuracy"] for h in run["history"])
    ousm = next(r for r in runs if r["method"] == "ousm")
    assert ousm["method_summary"]["drops_per_clean"] >= 0
    forward = next(r for r in runs if r["method"] == "forward")
    assert len(forward["method_summary"]["transition"]) == 2
    # detection: the plain ResNet's four rankings at warm-up and at the end, OUSM's and
    # LoOP's, each a precision in [0, 1] and an AUC in [0, 1]; none without flips
    noisy = next(r for r in runs if r["method"] == "resnet" and r["gamma"] == 0.2)
    detection = noisy["method_summary"]["detection"]
    assert set(detection) == {f"{name}@{when}" for when in ("warm-up", "final") for name in
                              ("loss", "loop", "self_influence", "val_influence")}
    assert noisy["method_summary"]["scoring"] == "head-closed-form"
    assert set(ousm["method_summary"]["detection"]) == {"ousm_drops"}
    loop = next(r for r in runs if r["method"] == "ousm_loop")
    assert set(loop["method_summary"]["detection"]) == {"ousm_drops", "loop_weights"}
    for found in (*detection.values(), *loop["method_summary"]["detection"].values()):
        assert set(found) == {"precision", "auc"}
        assert all(0 <= v <= 1 for v in found.values())
    clean = next(r for r in runs if r["method"] == "resnet" and r["gamma"] == 0.0)
    assert "detection" not in clean["method_summary"]
    removal = next(r for r in runs if r["method"] == "influence_removal")
    assert 0 <= removal["method_summary"]["removed_flipped_fraction"] <= 1
    table = (out / "table.md").read_text()
    for name in ("ResNet", "Patrini", "OUSM + LoOP", "80.7", "75.2", "–", "Influence removal",
                 "self-influence, plain ResNet at warm-up", "head-closed-form"):
        assert name in table
    assert (out / "figure3_learning_curves.png").stat().st_size > 0


def test_resume_skips_finished_runs_and_refuses_other_settings(table1, finished):
    out, first = finished
    again = table1.main([*TINY, "--out", str(out)])
    assert again["runs"] == json.loads((out / "runs.json").read_text())["runs"]
    assert len(again["runs"]) == len(first["runs"])
    with pytest.raises(SystemExit, match="--fresh"):
        table1.main([*TINY, "--out", str(out), "--epochs", "3"])


def test_influence_rows_act_on_the_plain_resnets_warmup_ranking(table1):
    # The detection table says so: the same initial weights and batches give the influence
    # rows the model the plain ResNet has before its first mining epoch.
    settings = table1.settings_from(table1.parse_args(TINY))
    data = table1.load_data(settings, "cpu", progress=False)
    train = (data.train[0], data.noisy[0.2][0])
    trainers = {}
    for method in ("resnet", "influence_removal"):
        torch.manual_seed(0)
        model = table1.resnet18(2, width=settings.width)
        trainers[method] = table1.make_trainer(method, settings, model, 0, "cpu")
        trainers[method].fit(train, data.val, data.test)
    warmup = trainers["resnet"].scores_at_warmup.scores["val_influence"]
    torch.testing.assert_close(trainers["influence_removal"].scores.double(), warmup,
                               rtol=1e-4, atol=1e-7)


def test_full_builds_the_papers_resnet101_from_a_local_weights_file(table1, tmp_path, capsys):
    full = table1.settings_from(table1.parse_args(["--full"]))
    assert (full.arch, full.weights) == ("resnet101", None)
    with pytest.raises(SystemExit, match="--weights .*no such file"):
        table1.parse_args(["--full", "--weights", str(tmp_path / "missing.pth")])
    torch.manual_seed(0)
    imagenet = table1.resnet101(1000, width=4)
    path = tmp_path / "resnet101.pth"
    torch.save(imagenet.state_dict(), path)
    settings = table1.settings_from(table1.parse_args(
        [*TINY, "--arch", "resnet101", "--width", "4", "--weights", str(path)]))
    network = table1.build_network(settings)
    assert network.fc.out_features == 2
    torch.testing.assert_close(network.layer3[22].conv3.weight, imagenet.layer3[22].conv3.weight)
    assert table1.initialisation_note(settings) is None
    # without --weights the command says what that means (printed before anything trains)
    note = table1.initialisation_note(full)
    assert "random initialisation" in note and "--weights PATH" in note
    assert table1.initialisation_note(table1.settings_from(table1.parse_args([]))) is None
