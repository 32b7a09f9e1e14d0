"""Tests of ``bench_lds.py``: the LDS against dattri's metric, scipy and a hand-computed case; a
planted problem whose right answer is known; a tiny end-to-end run that writes and resumes
its cache; the docs page's table against the committed JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_lds import (
    Run,
    bootstrap_mean,
    cache_path,
    cache_settings,
    digits_data,
    fit_adam,
    goal_lines,
    kronecker_params,
    lds_per_query,
    main,
    merged,
    method_names,
    parse_args,
    random_subsets,
    retrained_targets,
    run_method,
    skip_reason,
    summary,
    train_model,
)
from scipy.stats import spearmanr
from torch import nn

import fastinfluence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("lds_cpu", "lds_mlp_ensembles_cpu", "lds_cnn_cpu", "lds_cnn_single_cpu")
"""The docs page's runs, in the order its --summary command merges them."""


def _random_case(seed: int = 0, n: int = 30, queries: int = 6, count: int = 12):
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.normal(size=(n, queries)))
    subsets = random_subsets(n, count, 0.5, seed)
    targets = rng.normal(size=(count, queries))
    targets[:4, 0] = targets[0, 0]  # ties in a target column
    return scores, subsets, targets


def test_lds_by_hand():
    # 4 training samples, one query, 4 subsets of 2: predictions 3, 7, 4, 6 (ranks 1 4 2 3)
    scores = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    subsets = np.array([[0, 1], [2, 3], [0, 2], [1, 3]])
    targets = np.array([[10.0], [40.0], [30.0], [20.0]])  # ranks 1 4 3 2
    # Spearman = 1 − 6 Σd² / (M(M²−1)) with d = (0, 0, −1, 1): 1 − 12/60 = 0.8
    assert lds_per_query(scores, subsets, targets) == pytest.approx([0.8])
    # a target exactly linear in the prediction ranks perfectly; its negation at −1
    linear = 2 * np.array([[3.0], [7.0], [4.0], [6.0]]) + 1
    assert lds_per_query(scores, subsets, linear) == pytest.approx([1.0])
    assert lds_per_query(-scores, subsets, linear) == pytest.approx([-1.0])


def test_lds_matches_scipy_spearman():
    scores, subsets, targets = _random_case()
    ours = lds_per_query(scores, subsets, targets)
    predictions = np.stack([scores.numpy()[rows].sum(0) for rows in subsets])
    expected = [spearmanr(predictions[:, q], targets[:, q]).statistic for q in range(6)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_lds_matches_dattri():
    metric = pytest.importorskip("dattri.metric", reason="dattri is installed with the peers")
    scores, subsets, targets = _random_case(seed=1)
    expected, _ = metric.lds(scores, (torch.from_numpy(targets), torch.from_numpy(subsets)))
    np.testing.assert_allclose(lds_per_query(scores, subsets, targets), expected.numpy(),
                               rtol=1e-12)


def test_bootstrap_interval_brackets_the_mean_and_skips_nan():
    values = np.array([0.2, 0.4, np.nan, 0.6, 0.8])
    summary = bootstrap_mean(values)
    assert summary["lds"] == pytest.approx(0.5) and summary["queries"] == 4
    assert 0.2 <= summary["ci"][0] < 0.5 < summary["ci"][1] <= 0.8


def test_planted_ridge_regression_has_lds_near_one():
    """Ridge regression, ``mean squared loss/2 + (λ/2)‖w‖²`` with the sum over a subset taken
    at the full set's 1/n: retraining is a closed-form solve, and ``Influence.pairwise`` with
    ``damping = λ`` is the exact first-order effect of each sample on each query loss. Its LDS
    must be near 1, random scores near 0, negated scores near −1."""
    torch.manual_seed(0)
    n, d, lam, count = 200, 5, 1.0, 40
    X = torch.randn(n + 10, d, dtype=torch.float64)
    y = X @ torch.randn(d, 1, dtype=torch.float64) + 0.5 * torch.randn(n + 10, 1,
                                                                        dtype=torch.float64)
    (Xt, yt), (Xq, yq) = (X[:n], y[:n]), (X[n:], y[n:])

    def ridge(rows: np.ndarray) -> torch.Tensor:
        A, b = Xt[rows], yt[rows]
        return torch.linalg.solve(A.T @ A / n + lam * torch.eye(d, dtype=torch.float64),
                                  A.T @ b / n)

    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(ridge(np.arange(n)).T)
    subsets = random_subsets(n, count, 0.5, seed=0)
    targets = np.stack([(0.5 * (Xq @ ridge(rows) - yq) ** 2)[:, 0].numpy() for rows in subsets])

    def squared(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * (output - labels).pow(2).sum(1)

    scores = fastinfluence.Influence(model, (Xt, yt), (Xq, yq), loss_fn=squared, params="all",
                                     damping=lam, hessian="exact",
                                     solver="direct").pairwise((Xq, yq))
    planted = lds_per_query(scores, subsets, targets)
    assert planted.mean() > 0.9, planted
    assert lds_per_query(-scores, subsets, targets).mean() == pytest.approx(-planted.mean())
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=scores.shape))
    assert abs(lds_per_query(noise, subsets, targets).mean()) < 0.2


def test_tiny_run_writes_and_resumes_its_cache(tmp_path):
    argv = ["--tasks", "digits-logreg", "--n-train", "150", "--n-query", "5", "--subsets", "4",
            "--methods", "gn", "kfac", "trak", "--trak-proj-dims", "128", "--trak-lambdas", "1",
            "--dampings", "0.01",
            "--loo", "3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lds.json"),
            "--plot", str(tmp_path / "lds.png")]
    first = main(argv)
    entry = first["tasks"]["digits-logreg"]
    assert entry["retrained_now"] == 4
    assert set(entry["methods"]) == {"gn@0.01", "kfac@0.01", "trak-p128@1"}
    for name, row in entry["methods"].items():
        if row.get("error") == "trak is not installed":  # TRAK comes with the peers
            continue
        assert -1 <= row["lds"] <= 1 and row["seconds"] > 0 and "loo" in row, name
        assert f"| digits-logreg | {row['family']} | 1 | 0.01 |" in summary(first) or \
            row["method"] == "trak", name
    assert json.loads((tmp_path / "lds.json").read_text())["config"]["complete"]
    assert (tmp_path / "lds.png").stat().st_size > 0

    # a run stopped after two models: the next one retrains only the other two
    args = parse_args(argv)
    path = cache_path(args.cache, cache_settings("digits-logreg", args))
    with np.load(path) as saved:
        state = {key: saved[key].copy() for key in saved.files}
    state["done"][2:] = False
    np.savez_compressed(path, **state)
    second = main(argv)["tasks"]["digits-logreg"]
    assert second["retrained_now"] == 2
    assert second["methods"]["gn@0.01"]["lds"] == entry["methods"]["gn@0.01"]["lds"]
    assert main(argv)["tasks"]["digits-logreg"]["retrained_now"] == 0

    # the margin falls as the loss rises: the margin target with −τ gives the same LDS
    margin = main([*argv, "--target", "margin"])["tasks"]["digits-logreg"]["methods"]
    assert margin["gn@0.01"]["lds"] == pytest.approx(entry["methods"]["gn@0.01"]["lds"])

    # a cache written under other settings is refused, never read
    state["settings"] = np.array(json.dumps({**cache_settings("digits-logreg", args), "wd": 1.0}))
    np.savez_compressed(path, **state)
    train, query = digits_data(args.n_train, args.n_query, args.seed)
    with pytest.raises(ValueError, match="other settings"):
        retrained_targets("digits-logreg", train, query, random_subsets(150, 4, 0.5, 0), args,
                          lambda line: None)


def _tiny_digits(n: int = 60, queries: int = 4):
    args = parse_args(["--n-train", str(n), "--n-query", str(queries), "--mlp-iters", "20",
                       "--width", "8"])
    return args, *digits_data(n, queries, 0)


def test_ensemble_scores_are_the_mean_of_members_each_scored_once():
    """``K`` models' scores are the mean of the first ``K`` members' own scores, and their
    seconds the sum; a larger ``K`` reuses the members already scored."""
    args, train, query = _tiny_digits()
    members = [train_model("digits-mlp", train, seed, args) for seed in range(3)]
    cache: dict = {}
    alone = [run_method(Run(f"gn@0.01#{k}", "gn", "gn", 0.01, 1, None), "digits-mlp", [m], [],
                        train, query, args, {}, Path("unused"))[0] for k, m in enumerate(members)]
    two, two_seconds = run_method(Run("gn-ens2@0.01", "gn", "gn", 0.01, 2, None), "digits-mlp",
                                  members, [], train, query, args, cache, Path("unused"))
    torch.testing.assert_close(two, (alone[0] + alone[1]) / 2)
    first = cache[("gn", 0.01, None)][0][0]
    three, three_seconds = run_method(Run("gn-ens3@0.01", "gn", "gn", 0.01, 3, None),
                                      "digits-mlp", members, [], train, query, args, cache,
                                      Path("unused"))
    assert cache[("gn", 0.01, None)][0][0] is first  # not scored again
    torch.testing.assert_close(three, sum(alone) / 3)
    assert three_seconds > two_seconds > 0
    assert not torch.allclose(alone[0], alone[1])  # the members differ


def test_ensemble_of_noisy_members_beats_one_on_a_planted_case():
    """Targets that are exactly additive in known per-sample effects; each member sees the
    effects plus its own noise: the mean of 10 members ranks the subsets better than one."""
    rng = np.random.default_rng(0)
    n, queries, count = 80, 20, 60
    effects = rng.normal(size=(n, queries))
    subsets = random_subsets(n, count, 0.5, seed=0)
    targets = np.stack([effects[rows].sum(0) for rows in subsets])
    members = [torch.from_numpy(effects + 2 * rng.normal(size=effects.shape)) for _ in range(10)]
    one = lds_per_query(members[0], subsets, targets).mean()
    ten = lds_per_query(torch.stack(members).mean(0), subsets, targets).mean()
    assert lds_per_query(torch.from_numpy(effects), subsets, targets).mean() == pytest.approx(1)
    assert ten > one + 0.1, (one, ten)


def test_method_names_single_models_first_and_options():
    args = parse_args(["--methods", "gn", "ekfac", "store", "trak", "captum-tracincp",
                       "--dampings", "0.01", "0.1", "--ensembles", "1", "5",
                       "--ensemble-methods", "gn", "--trak-proj-dims", "256", "128", "512",
                       "--trak-lambdas", "10", "--store-k", "8", "--cnn-n-train", "300"])
    mlp = method_names("digits-mlp", args)
    assert [run.ensemble for run in mlp] == sorted(run.ensemble for run in mlp)
    names = {run.name for run in mlp}
    assert {"gn@0.01", "gn-ens5@0.1", "ekfac@0.1", "store-k8@0.01", "trak-p512@10",
            "trak-p256-ens5@10", "captum-tracincp@0"} <= names
    assert "ekfac-ens5@0.01" not in names and "trak-p128-ens5@10" not in names
    cnn = {run.name for run in method_names("brain-cnn", args)}  # 300 training slices
    assert "trak-p256@10" in cnn and "trak-p512@10" not in cnn
    logreg = method_names("digits-logreg", args)  # convex: one model
    assert {run.ensemble for run in logreg} == {1}


def test_dense_solves_are_skipped_on_large_models_and_stop_at_reports():
    assert skip_reason(Run("gn@1", "gn", "gn", 1.0, 1, None), 283_363)
    assert skip_reason(Run("gn@1", "gn", "gn", 1.0, 1, None), 2410) is None
    assert skip_reason(Run("woodbury@1", "woodbury", "woodbury", 1.0, 1, None), 283_363) is None
    with pytest.raises(SystemExit):
        parse_args(["--stop-at", "not a time"])
    assert parse_args(["--stop-at", "2026-12-07T22:00"]).stop_at.tzinfo is not None


def test_kronecker_params_leave_out_batchnorm():
    from fastinfluence.models import PaperCNN

    cnn = PaperCNN(image_size=32, channels=(2, 2, 2, 2, 2))
    names = kronecker_params(cnn)
    assert names == ["features.0", "features.4", "features.8", "features.12", "features.16",
                     "classifier"]
    assert kronecker_params(nn.Sequential(nn.Linear(3, 2))) == "all"


def test_adam_training_is_deterministic_and_keeps_checkpoints():
    from fastinfluence.models import PaperCNN

    generator = torch.Generator().manual_seed(0)
    data = (torch.rand(40, 1, 32, 32, generator=generator),
            torch.randint(0, 3, (40,), generator=generator))
    trained = []
    for _ in range(2):
        torch.manual_seed(3)
        checkpoints: list = []
        model = fit_adam(PaperCNN(32, channels=(2, 2, 2, 2, 2)), data, 3, 7, 1e-3, checkpoints)
        trained.append(model.state_dict())
        assert len(checkpoints) == 2  # epochs 5 and 7 (the last)
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key
        assert torch.equal(value, checkpoints[-1][key]), key


def _row(method: str, lds: float, seconds: float, half: float = 0.01) -> dict:
    return {"method": method, "family": method, "damping": 0.01, "ensemble": 1, "lds": lds,
            "ci": [lds - half, lds + half], "seconds": seconds}


def test_goal_lines_compare_at_no_more_compute():
    report = {"tasks": {
        "wins": {"methods": {"a": _row("gn", 0.8, 1.0), "b": _row("trak", 0.6, 2.0)}},
        "slower": {"methods": {"a": _row("gn", 0.8, 5.0), "b": _row("kfac", 0.5, 0.1),
                               "c": _row("kronfluence-ekfac", 0.6, 1.0, half=0.2)}},
        "none": {"methods": {"a": _row("gn", 0.8, 5.0), "b": _row("trak", 0.6, 1.0)}},
        "tie": {"methods": {"a": _row("gn", 0.8391, 0.1), "b": _row("dattri-cg", 0.8389, 0.2)}}}}
    wins, slower, none, tie = goal_lines(report).splitlines()
    assert "0.839 in 0.10 s: **tie**, the intervals overlap" in tie
    assert "within the peer's seconds: gn at 0.01, 0.800 in 1.00 s: **yes**, the intervals " \
           "do not overlap" in wins
    assert "best fastinfluence gn" in slower and "kfac at 0.01, 0.500 in 0.10 s: **no**, " \
           "the intervals overlap" in slower
    assert none.endswith("no fastinfluence row is as fast as that peer row: **no**.")


def test_docs_page_is_the_committed_json():
    report = merged([ROOT / f"benchmarks/results/{name}.json" for name in RESULTS])
    page = (ROOT / "docs/benchmarks/lds.md").read_text()
    for part in summary(report).split("\n\n"):
        assert part in page
    for config in report["config"].values():
        assert re.search(rf"\b{config['date']}\b", page)
    # every LDS, interval end or LOO Pearson quoted in the prose is one of the tables'
    prose = page
    for part in summary(report).split("\n\n"):
        prose = prose.replace(part, "")
    quoted = set(re.findall(r"\b0\.\d{3}\b", prose))
    assert quoted and quoted <= set(re.findall(r"\b0\.\d{3}\b", summary(report))), quoted
