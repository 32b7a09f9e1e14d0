"""Smoke test of examples/mrs_table2.py: every method and sweep on a tiny data set, resumed and
extended with more folds and seeds."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from example_loader import EXAMPLES, load_example

pytestmark = pytest.mark.slow  # trains and writes whole example runs

# theta 0.5 makes every training spectrum "certain", so every mixing run has partners
TINY = ["--n-spectra", "100", "--n-patients", "16", "--width", "2", "--folds", "4",
        "--run-folds", "0", "--epochs", "2", "--final-epochs", "1", "--source-epoch", "2",
        "--sweep-alphas", "0.25", "--sweep-epochs", "1", "--sweep-factors", "2",
        "--thresholds", "0.5", "0.55", "--threads", "1", "--no-progress"]


def copy_out(source, target, **copytree_options):
    """A copy of the ``--out`` folder ``source`` at ``target``, and its ``runs.json``."""
    shutil.copytree(source, target, **copytree_options)
    return json.loads((target / "runs.json").read_text())


@pytest.fixture(scope="module")
def table2():
    return load_example("mrs_table2")


@pytest.fixture(scope="module")
def finished(table2, tmp_path_factory):
    out = tmp_path_factory.mktemp("mrs")
    return out, table2.main([*TINY, "--out", str(out)])


def test_every_method_and_sweep_ran_and_is_reported(finished):
    out, result = finished
    runs = json.loads((out / "runs.json").read_text())["runs"]
    kinds = {(r["kind"], r["fold"]) for r in runs}
    assert {(k, 0) for k in ("svm", "rf", "plain", "noise", "mixing")} == kinds
    # theta 0.55 may leave a class out of C: that row may fail, and says so
    assert not [r for r in runs if "error" in r and r["options"]["threshold"] == 0.5]
    mixing = [r for r in runs if r["kind"] == "mixing"]
    # 3 strategies × (default + alpha 0.25 + E 1 + factor 2) + theta 0.55 + 2 influence
    assert len(mixing) == 3 * 4 + 1 + 2
    for r in runs:
        if "metrics" in r:
            assert 0 <= r["metrics"]["auc"] <= 1 and 0 <= r["metrics"]["patient_accuracy"] <= 1
    plain = [r for r in runs if r["kind"] == "plain"]
    for r in plain:
        # theta 0.5: every training spectrum is certain from the first epoch on
        assert set(r["certain_epoch"]["0.5"]) == {1}
        assert r["certain_summary"]["0.5"]["2"]["size"] == r["train_summary"]["size"]
        assert r["influence-helpful"]["scoring"] == "fused-tangent"
        assert r["influence-self"]["scoring"] == "head-closed-form"
    table = (out / "table.md").read_text()
    for name in ("SVM", "RF", "Plain ResCNN", "Noise augmentation", "aug-with-same",
                 "Proposed model (aug-with-both)", "Proposed model, θ = 0.55",
                 "Influence distillation (helpful)",
                 "0.73 ± 0.07", "neuroradiologist", "Paired with the plain ResCNN"):
        assert name in table
    names = {p.name for p in result["paths"]}
    assert names == {"class_means.png", "figure3_kmeans.png", "figure4_distillation.png",
                     "figure5_alpha.png", "figure6_source_epoch.png", "figure7_factor.png",
                     "figure8_roc.png", "figure9_cams.png", "figure_theta.png"}
    # every run that scores the test fold keeps its scores (Fig. 8's ROC curves)
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert len({len(r["test_scores"]) for r in runs if "metrics" in r}) == 1
    # the θ sweep: each θ's share of the training set in C and the proposed model's AUC
    assert "## The distillation threshold θ" in table and "| 0.55 | 1 |" in table
    assert all(p.stat().st_size > 0 for p in result["paths"])


def test_resume_skips_finished_runs_and_refuses_other_settings(table2, finished):
    out, first = finished
    again = table2.main([*TINY, "--out", str(out)])
    assert again["runs"] == json.loads((out / "runs.json").read_text())["runs"]
    assert len(again["runs"]) == len(first["runs"])
    runs = json.loads((out / "runs.json").read_text())["runs"]
    # an interrupted run resumes: drop the last runs and rerun
    saved = json.loads((out / "runs.json").read_text())
    saved["runs"] = saved["runs"][:-3]
    (out / "runs.json").write_text(json.dumps(saved))
    resumed = table2.main([*TINY, "--out", str(out)])
    assert [r["key"] for r in resumed["runs"]] == [r["key"] for r in runs]
    redrawn = table2.main([*TINY, "--out", str(out), "--no-train"])
    assert redrawn["runs"] == resumed["runs"] and len(redrawn["paths"]) == 9
    # the redrawn table names the command that trained, not the redraw
    assert "--no-train" not in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):
        table2.main([*TINY, "--alpha", "0.3", "--out", str(out)])


def test_more_folds_and_seeds_extend_a_finished_out(table2, finished, tmp_path):
    source, _ = finished
    out = tmp_path / "extended"
    before = copy_out(source, out)
    figure4 = (out / "figure_inputs" / "figure4.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"other settings: alpha \(0.5 there, 0.3 here\)"):
        table2.main([*TINY, "--run-folds", "1", "--alpha", "0.3", "--out", str(out)])
    assert json.loads((out / "runs.json").read_text()) == before
    extended = table2.main([*TINY, "--run-folds", "1", "--seeds", "2", "--out", str(out)])
    saved = json.loads((out / "runs.json").read_text())
    # the finished runs are reused as they were, and only the new (seed, fold) pairs train
    assert saved["runs"][:len(before["runs"])] == before["runs"]
    new = saved["runs"][len(before["runs"]):]
    assert {(r["seed"], r["fold"]) for r in new} == {(0, 1), (1, 0), (1, 1)}
    assert [r["key"] for r in extended["runs"]] == [r["key"] for r in saved["runs"]]
    assert saved["settings"] == {**before["settings"], "run_folds": [0, 1], "seeds": 2}
    assert saved["meta"]["earlier_commands"] == [before["meta"]["command"]]
    # the figure inputs stay those of the first command's first fold
    assert (out / "figure_inputs" / "figure4.pt").read_bytes() == figure4
    table = (out / "table.md").read_text()
    assert "Averaged over 2 of 4 test folds (0, 1) × 2 seeds (0, 1): 4 (seed, fold) pairs" in table
    assert "| Plain ResCNN | 4 |" in table
    # the first command again trains nothing and keeps the union
    again = table2.main([*TINY, "--out", str(out)])
    assert again["runs"] == saved["runs"]
    assert json.loads((out / "runs.json").read_text())["settings"] == saved["settings"]


def test_shards_share_the_passes_and_merge_into_the_unsharded_runs(table2, finished, tmp_path):
    source, _ = finished
    shards = []
    for k in (0, 1):
        shard = tmp_path / f"shard{k}"
        before = copy_out(source, shard)
        table2.main([*TINY, "--run-folds", "1", "--seeds", "2", "--shard", f"{k}/2",
                     "--out", str(shard)])
        saved = json.loads((shard / "runs.json").read_text())
        shards.append({(r["seed"], r["fold"]) for r in saved["runs"][len(before["runs"]):]})
    # passes (0, 0) (0, 1) (1, 0) (1, 1), then the sweeps of (0, 0): every other one each
    assert shards == [{(1, 0)}, {(0, 1), (1, 1)}]
    out = tmp_path / "merged"
    copy_out(source, out, ignore=shutil.ignore_patterns("figure_inputs"))
    merged = table2.main([*TINY, "--no-train", "--out", str(out), "--merge",
                          str(tmp_path / "shard0"), str(tmp_path / "shard1")])
    saved = json.loads((out / "runs.json").read_text())
    keys = [r["key"] for r in saved["runs"]]
    # 3 new passes of svm, rf, plain, noise and 6 mixing runs (3 strategies, θ 0.55, influence)
    assert len(keys) == len(set(keys)) == len(before["runs"]) + 3 * (4 + 6)
    assert [r["key"] for r in merged["runs"]] == keys
    assert saved["settings"] == {**before["settings"], "run_folds": [0, 1], "seeds": 2}
    assert {p.name for p in (out / "figure_inputs").glob("*.pt")} == {
        p.name for p in (source / "figure_inputs").glob("*.pt")}
    assert "--shard 1/2" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):
        table2.main([*TINY, "--alpha", "0.3", "--no-train", "--out", str(tmp_path / "other"),
                     "--merge", str(out)])
    with pytest.raises(SystemExit):
        table2.main([*TINY, "--shard", "2/2", "--out", str(out)])


def test_the_basis_is_a_setting_and_older_outs_read_as_multiplet(table2, finished, tmp_path):
    source, _ = finished
    out = tmp_path / "older"
    saved = copy_out(source, out)
    assert saved["settings"].pop("basis") == "multiplet"
    (out / "runs.json").write_text(json.dumps(saved))  # as written before --basis existed
    again = table2.main([*TINY, "--no-train", "--out", str(out)])
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in saved["runs"]]
    with pytest.raises(SystemExit, match=r"basis \('multiplet' there, 'density-matrix' here\)"):
        table2.main([*TINY, "--basis", "density-matrix", "--out", str(out)])
    assert table2.settings_from(table2.parse_args(["--basis", "density-matrix"])).basis == (
        "density-matrix")


@pytest.mark.parametrize(("name", "value", "older"),
                         [("balancing", "smote", "random"), ("shortcut", "pool", "projection")])
def test_balancing_and_shortcut_are_settings_and_older_outs_read_as_the_committed(
        table2, finished, tmp_path, name, value, older):
    """Runs saved before the setting existed were made with random oversampling and the 1×1
    projection shortcut: they read as such, the table says so, and the paper's value (the
    ``--full`` one) needs another --out."""
    source, _ = finished
    out = tmp_path / "older"
    saved = copy_out(source, out)
    assert saved["settings"].pop(name) == older
    (out / "runs.json").write_text(json.dumps(saved))
    table2.main([*TINY, "--no-train", "--out", str(out)])
    table = (out / "table.md").read_text()
    assert "class balancing **random oversampling" in table
    assert "residual shortcut **1×1 convolution + BatchNorm" in table
    flag = "--" + name
    with pytest.raises(SystemExit, match=rf"{name} \('{older}' there, '{value}' here\)"):
        table2.main([*TINY, flag, value, "--out", str(out)])
    assert getattr(table2.settings_from(table2.parse_args(["--full"])), name) == value


def test_smote_and_pool_runs_train_and_are_labelled(table2, tmp_path):
    out = tmp_path / "paper"
    result = table2.main([*TINY, "--only", "plain", "mixing", "--strategies", "both",
                          "--influence", "--sweep-folds", "--thresholds", "0.5",
                          "--balancing", "smote", "--shortcut", "pool", "--out", str(out)])
    assert sorted(r["kind"] for r in result["runs"]) == ["mixing", "plain"]
    assert all("metrics" in r for r in result["runs"])
    table = (out / "table.md").read_text()
    assert "class balancing **SMOTE" in table and "max-pooling + zero channels" in table


@pytest.mark.slow
def test_committed_figures_redraw_byte_identical(table2, tmp_path):
    """--no-train with the committed command redraws every committed figure bit for bit."""
    committed = EXAMPLES / "results" / "mrs_table2"
    out = tmp_path / "mrs_table2"
    shutil.copytree(committed, out, ignore=shutil.ignore_patterns("*.png"))
    flags = shlex.split(json.loads((out / "runs.json").read_text())["meta"]["command"])[2:]
    table2.main([*flags, "--no-train", "--no-progress", "--out", str(out)])
    for figure in committed.glob("*.png"):
        assert (out / figure.name).read_bytes() == figure.read_bytes(), figure.name


def test_paired_table_compares_each_row_with_plain_on_the_same_seed_and_fold(table2):
    def run(seed, fold, auc):
        return {"seed": seed, "fold": fold, "metrics": {"auc": auc}}

    rows = [("Plain ResCNN", [run(0, 0, 0.5), run(0, 1, 0.8), run(1, 0, 0.6)]),
            ("Other", [run(0, 0, 0.7), run(0, 1, 0.7), run(1, 0, 0.602), run(1, 1, 0.9)])]
    lines = table2.paired_table(rows).splitlines()
    assert lines[2] == "| Other | 3 | +0.034 ± 0.125 | 1 / 1 / 1 |"


def test_only_trains_the_kinds_asked_for(table2, tmp_path):
    out = tmp_path / "baselines"
    result = table2.main([*TINY, "--only", "svm", "rf", "plain", "--influence", "--sweep-folds",
                          "--out", str(out)])
    assert sorted(r["kind"] for r in result["runs"]) == ["plain", "rf", "svm"]
    assert "| Noise augmentation | 0 |" in (out / "table.md").read_text()
