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
    bootstrap_mean,
    cache_path,
    cache_settings,
    digits_data,
    lds_per_query,
    main,
    parse_args,
    random_subsets,
    retrained_targets,
    table,
)
from scipy.stats import spearmanr
from torch import nn

import fastinfluence

ROOT = Path(__file__).resolve().parents[1]


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
    argv = ["--tasks", "digits-logreg", "--n-train", "40", "--n-query", "5", "--subsets", "4",
            "--methods", "gn", "kfac", "trak", "--trak-proj-dim", "128", "--trak-lambdas", "1",
            "--dampings", "0.01",
            "--loo", "3",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lds.json"),
            "--plot", str(tmp_path / "lds.png")]
    first = main(argv)
    entry = first["tasks"]["digits-logreg"]
    assert entry["retrained_now"] == 4
    assert set(entry["methods"]) == {"gn@0.01", "kfac@0.01", "trak@1"}
    for name, row in entry["methods"].items():
        if row.get("error") == "trak is not installed":  # TRAK comes with the peers
            continue
        assert -1 <= row["lds"] <= 1 and row["seconds"] > 0 and "loo" in row, name
        assert f"| digits-logreg | {row['method']} |" in table(first)
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
        retrained_targets("digits-logreg", train, query, random_subsets(40, 4, 0.5, 0), args,
                          lambda line: None)


def test_docs_table_is_the_committed_json():
    report = json.loads((ROOT / "benchmarks/results/lds_cpu.json").read_text())
    page = (ROOT / "docs/benchmarks/lds.md").read_text()
    assert table(report) in page
    assert re.search(rf"\b{report['config']['date']}\b", page)
    # every LDS, interval end or LOO Pearson quoted in the prose is one of the table's
    prose = page.replace(table(report), "")
    quoted = set(re.findall(r"\b0\.\d{3}\b", prose))
    assert quoted and quoted <= set(re.findall(r"\b0\.\d{3}\b", table(report))), quoted
