"""Smoke tests of ``bench_peers.py`` on the tiniest settings.

One run of the script on the head of a 32² PaperCNN (16 training samples): fastinfluence and the
reference always, plus one cheap method of each peer library that imports (the others are
skipped with the import error). The exact float64 reference itself is checked against the
textbook explicit Gauss-Newton of :mod:`fastinfluence.reference` on a network whose ``p``
exceeds ``n·C``, the branch that solves through the Woodbury identity.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from bench_peers import (
    PEER_MODULES,
    Budget,
    ResidualCNN,
    exact_gauss_newton_scores,
    kronecker_ratios,
    main,
    parse_args,
    summarize,
    tasks_of,
)

from fastinfluence import reference

PEER_CHECKS = {"captum": "captum-naive", "pydvl": "pydvl-direct", "kronfluence": "kronfluence-kfac"}
"""One method per peer library, and the Pearson it must reach here: Naive and Direct are exact
on the head (so this checks the sign and scale mapping); K-FAC with sampled labels is not."""
MIN_PEARSON = {"captum-naive": 0.999, "pydvl-direct": 0.999, "kronfluence-kfac": 0.9}
FIELDS = ("seconds", "samples_per_second", "pearson", "spearman", "relative_error",
          "peak_rss_mib", "baseline_rss_mib", "peak_over_baseline_mib")


def _importable(library: str) -> str | None:
    """``None`` when the peer imports, else the reason it does not."""
    try:
        importlib.import_module(PEER_MODULES[library])
    except Exception as error:  # any import failure means: skip this peer, saying why
        return f"{library}: {type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    methods = ["fastinfluence"] + [method for library, method in PEER_CHECKS.items()
                                   if _importable(library) is None]
    argv = ["--sizes", "32", "--n-train", "16", "--n-val", "4", "--rounds", "1",
            "--threads", "1", "--train-steps", "2", "--params", "last", "--no-resnet",
            "--methods", *methods, "--out", str(out / "peers.json"),
            "--plot", str(out / "peers.png")]
    result = main(argv)
    assert (out / "peers.png").stat().st_size > 0
    assert json.loads((out / "peers.json").read_text()) == json.loads(json.dumps(result))
    return result


def _methods(report):
    (entry,) = report["tasks"]
    assert entry["task"]["name"] == "cnn32-last"
    return entry["methods"]


@pytest.mark.slow
def test_fastinfluence_matches_the_exact_reference(report):
    methods = _methods(report)
    for method in ("reference", "fastinfluence"):
        assert methods[method]["status"] == "ok", methods[method]
        for field in FIELDS:
            assert field in methods[method], (method, field)
        assert methods[method]["seconds"]["total"] > 0
    assert set(methods["fastinfluence"]["seconds"]) == {"fit", "scoring", "total"}
    assert methods["fastinfluence"]["pearson"] >= 0.999
    assert methods["fastinfluence"]["relative_error"] < 1e-3
    notes = methods["fastinfluence"]["notes"]
    assert notes["path"] == notes["scoring"] == "head-closed-form"
    assert notes["feature_pass"].startswith("fx copy: 5 Conv-BatchNorm pairs folded")
    config = report["config"]
    assert len(config["load_average_start"]) == 3 and len(config["load_average_end"]) == 3
    (target,) = report["targets"]
    assert target["task"] == "cnn32-last" and "met" in target


def test_summary_of_a_saved_report_runs_nothing_and_prints_its_tables(report, tmp_path,
                                                                      capsys):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(report))
    assert main(["--summary", str(path)]) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert printed.startswith("`python benchmarks/bench_peers.py --sizes 32")
    assert "| cnn32-last | fastinfluence |" in printed
    assert "- target cnn32-last: " in printed
    assert (tmp_path / "saved.png").stat().st_size > 0


@pytest.mark.parametrize("library", sorted(PEER_CHECKS))
def test_peer(report, library):
    method = PEER_CHECKS[library]
    result = _methods(report).get(method)
    reason = _importable(library)
    if reason is not None:
        pytest.skip(reason)
    assert result["status"] == "ok", result
    for field in FIELDS:
        assert field in result, field
    assert set(result["seconds"]) == {"fit", "scoring", "total"}
    assert result["pearson"] >= MIN_PEARSON[method]
    assert math.isfinite(result["spearman"])


def test_exact_reference_matches_explicit_gauss_newton():
    torch.manual_seed(0)
    model = ResidualCNN(num_classes=3, width=4, blocks=1).double().eval()
    X, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    train, val = (X[:7], y[:7]), (X[7:], y[7:])
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 7 * 3  # the Woodbury branch
    damping = 0.05
    G = reference.gauss_newton(model, params, *train)
    s = reference.ihvp_direct(G, reference.mean_loss_grad(model, params, *val), damping)
    expected = reference.scores_from_ihvp(model, params, *train, s)
    got = exact_gauss_newton_scores(model, names, train, val, damping, chunk=3)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    head = [name for name in names if name.startswith("classifier.")]  # the Cholesky branch
    head_params = list(model.classifier.parameters())
    G = reference.gauss_newton(model, head_params, *train)
    s = reference.ihvp_direct(G, reference.mean_loss_grad(model, head_params, *val), damping)
    expected = reference.scores_from_ihvp(model, head_params, *train, s)
    got = exact_gauss_newton_scores(model, head, train, val, damping)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_method_cap_reports_over_cap_and_skips_larger_sizes(tmp_path):
    """A cap no worker can meet (its interpreter alone takes longer): fastinfluence is
    reported over cap on 32², not started on 64²; the reference is exempt and runs."""
    argv = ["--sizes", "32", "64", "--n-train", "8", "--n-val", "2", "--rounds", "1",
            "--threads", "1", "--train-steps", "0", "--params", "last", "--no-resnet",
            "--methods", "fastinfluence", "--method-cap", "0.01",
            "--tasks", "cnn64-last", "cnn32-last",
            "--out", str(tmp_path / "peers.json"), "--plot", str(tmp_path / "peers.png")]
    report = main(argv)
    assert [entry["task"]["name"] for entry in report["tasks"]] == ["cnn64-last", "cnn32-last"]
    for entry in report["tasks"]:
        assert entry["methods"]["reference"]["status"] == "ok"
        result = entry["methods"]["fastinfluence"]
        assert result["status"] == "not run" and result["reason"].startswith("over cap")
    # --tasks ran 64² first, so 32² was not skipped; the other order skips 64²:
    report = main(argv[:argv.index("--tasks")] + ["--out", str(tmp_path / "again.json"),
                                                   "--plot", str(tmp_path / "again.png")])
    small, large = (entry["methods"]["fastinfluence"] for entry in report["tasks"])
    assert "not started" not in small["reason"]
    assert large["reason"].startswith("over cap: not started") and "cnn32-last" in large["reason"]
    saved = json.loads((tmp_path / "again.json").read_text())
    assert saved["config"]["complete"] is True and len(saved["tasks"]) == 2


def test_budget_stops_rounds_that_would_pass_the_cap():
    budget = Budget(10.0)
    assert budget.allows_round() and budget.left() == 10.0
    budget.spend(6.0)
    assert budget.left() == 4.0 and not budget.allows_round()  # 6 + 6 > 10
    budget = Budget(10.0)
    budget.spend(4.0)
    assert budget.allows_round()  # 4 + 4 <= 10
    budget.spend(4.0)
    assert not budget.allows_round()
    unbounded = Budget(None)
    unbounded.spend(1e9)
    assert unbounded.allows_round() and unbounded.left() is None


def test_tasks_are_picked_in_order_and_unknown_ones_refused():
    args = parse_args(["--sizes", "32", "64", "--tasks", "cnn64-last", "resnet32-all"])
    assert [task["name"] for task in tasks_of(args)] == ["cnn64-last", "resnet32-all"]
    with pytest.raises(SystemExit):
        parse_args(["--tasks", "cnn64-last"])  # default sizes: 32 only


def test_summary_compares_with_the_reference_and_kronfluence():
    args = parse_args(["--n-train", "4", "--rounds", "2"])
    exact = [1.0, -2.0, 3.0, 0.5]

    def run(scores, seconds):
        return {"stages": {"fit": seconds, "scoring": 1.0}, "scores": scores}

    runs = {"reference": [run(exact, 0.0)],
            "fastinfluence-kfac": [run([2.0, -4.0, 6.0, 1.0], 1.0), run(exact, 3.0)],
            "kronfluence-kfac": [run([1.0, 2.0, 3.0, 4.0], 1.0)],
            "kronfluence-ekfac": []}
    results = {"reference": {"status": "ready"}, "fastinfluence-kfac": {"status": "ready"},
               "kronfluence-kfac": {"status": "ready"},
               "kronfluence-ekfac": {"status": "not run", "reason": "over cap: round 1"}}
    entry = summarize({"name": "t"}, results, runs, args)
    ours = entry["methods"]["fastinfluence-kfac"]
    assert ours["status"] == "ok" and ours["rounds"] == 2
    assert ours["seconds"] == {"fit": 2.0, "scoring": 1.0, "total": 3.0}  # medians
    assert ours["pearson"] == pytest.approx(1.0) and ours["relative_error"] == pytest.approx(1.0)
    expected = torch.corrcoef(torch.tensor([[2.0, -4.0, 6.0, 1.0], [1.0, 2.0, 3.0, 4.0]]))[0, 1]
    assert entry["agreement"] == {
        "fastinfluence-kfac vs kronfluence-kfac": pytest.approx(float(expected))}
    assert entry["methods"]["kronfluence-ekfac"] == results["kronfluence-ekfac"]


def test_kronecker_ratios_are_ours_over_kronfluences():
    def method(fit, scoring, peak, baseline):
        return {"seconds": {"fit": fit, "scoring": scoring, "total": fit + scoring},
                "peak_rss_mib": peak, "peak_over_baseline_mib": peak - baseline}

    entry = {"agreement": {"fastinfluence-ekfac vs kronfluence-ekfac": 0.99},
             "methods": {"fastinfluence-ekfac": method(6.0, 2.0, 500.0, 400.0),
                         "kronfluence-ekfac": method(12.0, 4.0, 1000.0, 600.0)}}
    assert kronecker_ratios(entry) == {"fastinfluence-ekfac / kronfluence-ekfac": {
        "fit seconds": 0.5, "scoring seconds": 0.5, "total seconds": 0.5, "peak RSS": 0.5,
        "peak RSS over baseline": 0.25}}


def test_default_outputs_name_the_device():
    args = parse_args(["--no-resnet"])
    assert (args.out.name, args.plot.name) == ("peers_cpu.json", "peers_cpu.png")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(tmp_path):
    argv = ["--sizes", "32", "--n-train", "16", "--n-val", "4", "--rounds", "1",
            "--threads", "1", "--train-steps", "2", "--params", "last", "--no-resnet",
            "--methods", "fastinfluence", "--device", "cuda",
            "--out", str(tmp_path / "peers.json"), "--plot", str(tmp_path / "peers.png")]
    result = main(argv)
    fast = result["tasks"][0]["methods"]["fastinfluence"]
    assert fast["status"] == "ok" and fast["pearson"] > 0.999 and fast["peak_gpu_mib"] > 0


@pytest.mark.slow
def test_woodbury_variant_is_exact_on_all(tmp_path):
    """``--fi-all woodbury`` solves the Gauss-Newton system exactly, as the reference does."""
    report = main(["--sizes", "32", "--n-train", "8", "--n-val", "2", "--rounds", "1",
                   "--threads", "1", "--train-steps", "2", "--params", "all", "--no-resnet",
                   "--fi-all", "woodbury", "--methods", "fastinfluence-woodbury",
                   "--out", str(tmp_path / "peers.json"), "--plot", str(tmp_path / "p.png")])
    (entry,) = report["tasks"]
    result = entry["methods"]["fastinfluence-woodbury"]
    assert result["status"] == "ok", result
    assert result["notes"]["solver"] == "woodbury"
    assert result["pearson"] > 0.99999 and result["relative_error"] < 1e-3
