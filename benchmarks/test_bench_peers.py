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
from bench_peers import PEER_MODULES, ResidualCNN, exact_gauss_newton_scores, main

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
    config = report["config"]
    assert len(config["load_average_start"]) == 3 and len(config["load_average_end"]) == 3
    (target,) = report["targets"]
    assert target["task"] == "cnn32-last" and "met" in target


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
