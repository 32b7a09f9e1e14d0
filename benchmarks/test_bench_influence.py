"""pytest-benchmark cases at small sizes: ``pytest benchmarks --benchmark-enable``.

Collected by the default test run too (``testpaths``), where ``--benchmark-disable`` runs each
case once, as a plain test: the benchmark script cannot rot unnoticed.
"""

from __future__ import annotations

import copy
import json

import float32_accuracy
import pytest
import torch
from bench_influence import TARGETS, main, make_problem, parse_args, selected_parameters

import fastinfluence
from fastinfluence import reference

SIZE = 32
ARGS = ["--sizes", str(SIZE), "--n-train", "32", "--n-val", "8", "--train-steps", "2"]


def _run(benchmark, fn, *args, **kwargs):
    """A few rounds after one warm-up: these cases are for trends, not precision."""
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=3, warmup_rounds=1)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    return make_problem(SIZE, parse_args(ARGS))


@pytest.mark.filterwarnings("ignore:cg solve did not reach:RuntimeWarning")
@pytest.mark.parametrize(
    ("params", "options"),
    [("last", {}), ("all", {"solver": "cg", "max_iter": 5})],  # capped, as in the script
)
def test_score(benchmark, problem, params, options):
    model, train, val = problem
    scores = _run(
        benchmark,
        fastinfluence.score,
        model,
        train,
        val,
        params=params,
        hessian="gauss-newton",
        **options,
    )
    assert scores.shape == (len(train[0]),) and torch.isfinite(scores).all()
    if params == "last":  # exact (the head's closed form): the float64 oracle's scores
        oracle = float64(model)
        expected = reference.influence_scores(oracle, selected_parameters(oracle, "last"),
                                              float64(train), float64(val), 0.01)
        assert relative_error(scores, expected) < 1e-4
    # params="all" stops CG at 5 iterations (timing only); its values against the oracle:
    # test_report_script_runs (the script's reference_loop_rel_error) and tests/test_scoring.py


def float64(value):
    """A float64 copy of a model, or of a data pair (labels kept)."""
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).double()
    x, y = value
    return x.double(), y


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_reference_scoring(benchmark, problem, method):
    model, train, val = problem
    params = selected_parameters(model, "last")
    s = reference.mean_loss_grad(model, params, *val)
    scores = _run(
        benchmark, reference.scores_from_ihvp, model, params, *train, s, per_sample=method
    )
    # -sᵀ∇l(z_i), one sample at a time through autograd
    expected = torch.stack([
        -torch.cat([g.flatten() for g in torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[None]), label[None]), params)]) @ s
        for x, label in zip(*train, strict=True)])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_reference_lissa_head(benchmark, problem):
    model, train, val = problem
    params = selected_parameters(model, "last")
    v = reference.mean_loss_grad(model, params, *val)
    damping, scale, depth = 0.01, 10.0, 10
    h = _run(benchmark, reference.lissa, model, params, *train, v, damping, scale=scale,
             depth=depth, batch_size=32)
    # batch_size = n_train: every step uses the whole set, so the recursion is deterministic
    # h_j = v + (I - (H + λI)/scale) h_{j-1}, h_0 = v, with the explicit Hessian
    H = reference.hessian(model, params, *train)
    identity = torch.eye(len(v), dtype=H.dtype)
    step = identity - (H + damping * identity) / scale
    expected = v.clone()
    for _ in range(depth):
        expected = v + step @ expected
    torch.testing.assert_close(h, expected / scale, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_report_script_runs(tmp_path):
    out = tmp_path / "report.json"
    small = ["--n-train", "16", "--n-val", "4", "--repeats", "1"]
    lissa = ["--lissa-depth", "4", "--lissa-timed-steps", "2"]
    report = main([*ARGS, *small, *lissa, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    result = report["results"][str(SIZE)]
    for which in ("last", "all"):
        assert result[which]["reference_loop_rel_error"] < 1e-3  # same s, same scores
        assert result[which]["reference_vmap_rel_error"] < 1e-3
    assert result["last"]["reference_lissa_extrapolated"]
    assert {row["key"] for row in report["ratios"]} == {key for key, *_ in TARGETS}
    assert {row["model"] for row in report["ratios"]} == {"cnn"}
    assert result["all"]["engine_scoring"] == "fused-tangent"
    assert result["all"]["engine_scoring_reason"] is None


@pytest.mark.slow
def test_report_script_runs_the_resnet(tmp_path):
    small = ["--n-train", "8", "--n-val", "4", "--repeats", "1", "--params", "all"]
    resnet = ["--models", "resnet18", "--resnet-width", "4"]
    report = main([*ARGS, *small, *resnet, "--out", str(tmp_path / "report.json")])
    assert set(report["results"]) == {f"resnet18-{SIZE}"}
    result = report["results"][f"resnet18-{SIZE}"]
    assert result["model"] == "resnet18" and result["all"]["engine_scoring"] == "fused-tangent"
    assert result["all"]["reference_loop_rel_error"] < 1e-3
    keys = {(row["model"], row["key"]) for row in report["ratios"]}
    assert ("resnet18", "loop_over_scoring_all") in keys


@pytest.mark.slow
def test_report_script_runs_the_vit(tmp_path):
    small = ["--n-train", "8", "--n-val", "4", "--repeats", "1", "--params", "all"]
    vit = ["--models", "vit", "--vit-dim", "8", "--vit-depth", "1"]
    report = main([*ARGS, *small, *vit, "--out", str(tmp_path / "report.json")])
    result = report["results"][f"vit-{SIZE}"]
    assert result["model"] == "vit" and result["all"]["engine_scoring"] == "fused-tangent"
    assert result["all"]["reference_vmap_rel_error"] < 1e-3
    keys = {(row["model"], row["key"]) for row in report["ratios"]}
    assert {("vit", "loop_over_scoring_all"), ("vit", "vmap_over_scoring_all")} <= keys


def test_default_out_names_the_device():
    assert parse_args(ARGS).out.name == "influence_cpu.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args([*ARGS, "--device", "cuda"])
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_report_script_runs_on_cuda(tmp_path):
    small = ["--n-train", "16", "--n-val", "4", "--repeats", "1", "--lissa-depth", "4"]
    report = main([*ARGS, *small, "--device", "cuda", "--out", str(tmp_path / "r.json")])
    result = report["results"][str(SIZE)]
    assert report["config"]["device"] == "cuda"
    for which in ("last", "all"):
        assert result[which]["reference_loop_rel_error"] < 1e-3
        assert result[which]["score_peak_gpu_mib"] > 0


def test_float32_accuracy_script_runs():
    results = float32_accuracy.main([*ARGS, "--n-train", "16", "--n-val", "4"])
    errors = results[SIZE]
    assert errors["scoring"] == "fused-tangent"
    assert 0 < errors["fastinfluence"] < 1e-3 and 0 < errors["reference_loop"] < 1e-3
