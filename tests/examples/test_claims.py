"""The papers' pages state the numbers that ``examples/claims.py`` computes from the committed
runs, and the check notices when a run changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from example_loader import EXAMPLES, load_example

claims = load_example("claims")
RESULTS = EXAMPLES / "results"


def test_every_claim_is_stated_on_its_page():
    assert claims.missing_phrases() == []


def test_the_check_command_passes():
    assert claims.main(["--check"]) == 0


def test_a_changed_run_fails_the_check_until_the_page_follows(tmp_path: Path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    path = results / "denoising_cnn_tables" / "runs.json"
    saved = json.loads(path.read_text())
    run = next(r for r in saved["runs"] if r["label"] == "λ_a = 1" and r["trial"] == 1)
    run["accuracy"]["fgsm8"] += 0.10  # λ_a = 1 now gains at FGSM 8 in trial 1 too
    path.write_text(json.dumps(saved))
    missing = claims.missing_phrases(results)
    assert any(line.startswith("denoising-cnn.md: | λ_a = 1 |") for line in missing)
    assert any("λ_a = 1 (trial 0: +23.1 / +21.0; trial 1: +5.4 / −6.2)" in line
               for line in missing)
    assert claims.main(["--check", "--results", str(results)]) == 1


def test_the_corrected_claims_numbers():
    """The numbers of the issue that found the overstated claims (computed there
    independently from the same runs)."""
    mrs = claims.mrs_influence_distillation().numbers["influence-helpful"]
    ours, softmax = mrs["mislabelled_of_tumour_mean_per_pair_vs_softmax"]
    assert (round(100 * ours, 1), round(100 * softmax, 1)) == (24.6, 21.1)
    assert mrs["fewer_mislabelled_in_total"] == 15
    assert mrs["one_class"] == ["seed 1 fold 0"]
    denoising = claims.denoising_table1_eps8().numbers
    trial1 = denoising["gains_fgsm8_ifgsm8"]["λ_a = 1"][1]
    assert [round(g, 1) for g in trial1] == [-4.6, -6.2]
    assert "λ_a = 1" in denoising["not_in_every_trial"]
    detection = claims.skin_flip_detection().numbers["random"]
    assert detection == {"influence_on_clean_val": [28, 37, 46, 63], "loss": [52, 63, 64, 67]}
    best = claims.skin_paper_methods_at().numbers["at_best_val"]
    assert round(best["ousm"][0], 1) == -0.3 and round(best["ousm_loop"][0], 1) == -0.7
    assert round(claims.isp_tumour_ratio().numbers["mean"], 2) == 1.71


def test_the_cw_budget_reruns_table1s_models_and_the_sweeps_counts():
    """The C&W budget script retrains Table 1's trial-0 source and NA (same settings and
    seeds): its 10-iteration run gives the committed NA numbers; the sweep counts are those
    the pages state."""
    budget = claims.denoising_cw_budget().numbers
    assert budget["iterations"][0] == 10
    assert budget["undefended_attacked"][0] == budget["table1_na_trial0"]["cw"]
    assert budget["clean_test"]["undefended"] == budget["table1_na_trial0"]["clean"]
    assert budget["clean_subset"]["undefended"] == budget["table1_na_trial0"]["clean_cw_subset"]
    sweeps = claims.isr_isp_sweeps().numbers
    assert sweeps["isp_above_naive"] == (35, 36)
    assert sweeps["best_gamma_count"][0.01] == 11 and sweeps["comparisons"] == 12


def test_the_mrs_threshold_claims_numbers():
    """The issue's "θ = 0.9 selects 32–97 % of the training set", and Fig. 4B's healthy
    median, recomputed from the committed runs and figure inputs."""
    numbers = claims.mrs_threshold_and_figures().numbers
    shares = [v["share"] for v in numbers["theta 0.9"].values()]
    assert len(shares) == 20
    assert (round(100 * min(shares)), round(100 * max(shares))) == (32, 97)
    healthy_all, healthy_distilled = numbers["figure4b_medians"]["healthy"]
    assert abs(healthy_distilled / healthy_all - 1) < 0.01


def test_the_isp_ratio_against_the_rest_of_the_head_is_below_the_air_included_one():
    """Leaving the air out of the denominator lowers Figure 1's ratio, run by run, and the
    rerun's head ratios are those the pages state."""
    rerun = claims.load_runs(claims.RESULTS, "isr_isp_figure1_head")["runs"]
    for run in rerun:
        summary = run["method_summary"]
        assert 1 < summary["delta_tumour_to_head_ratio"] < summary["delta_tumour_to_rest_ratio"]
    head = claims.isp_tumour_ratio().numbers["rerun"]["head"]
    assert (round(head["mean"], 2), head["runs"]) == (1.56, 10)


def test_printing_every_claims_numbers_works(capsys):
    """``(seed, fold)`` keys are printed by name (JSON has no tuple keys)."""
    assert claims.main([]) == 0
    out = capsys.readouterr().out
    assert "## mrs_threshold_and_figures" in out and "seed 0 fold 0" in out
