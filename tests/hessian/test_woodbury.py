"""The Woodbury solver: exact Gauss-Newton solves through the Jacobian rows, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem, relative_error

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.distributed import DistributedBackend, Shards
from fastinfluence.hessian.gauss_newton import GaussNewtonBackend
from fastinfluence.hessian.solvers import make_solver


def squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((output - F.one_hot(y, output.shape[1]).to(output.dtype)) ** 2).sum(dim=1)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss_fn", [None, squared_error], ids=["cross-entropy", "squared"])
@pytest.mark.parametrize("chunking", [{}, dict(batch_size=5, chunk_size=2)],
                         ids=["one-chunk", "uneven-chunks"])
def test_rows_factor_the_explicit_gauss_newton_matrix(kind, loss_fn, chunking):
    model, train, val = make_problem(kind, seed=11, n_train=9, n_val=4)
    inf = fi.Influence(model, train, val, params="all", hessian="gauss-newton",
                       solver="woodbury", loss_fn=loss_fn, **chunking)
    rows = inf.solver.rows
    # rows per sample: the rank of the loss's output Hessian (3 classes: 2 for softmax
    # cross-entropy, whose Hessian has the null vector 1; 3 for the squared error)
    assert rows.shape == (9 * (2 if loss_fn is None else 3), inf.report.num_params)
    explicit = reference.gauss_newton(model, list(model.parameters()), *train, loss_fn=loss_fn)
    assert relative_error(rows.T @ rows, explicit) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_queries_match_the_direct_gauss_newton_solve(kind):
    model, train, val = make_problem(kind, seed=12, n_train=14, n_val=5)
    options = dict(params="all", hessian="gauss-newton", damping=0.05)
    woodbury = fi.Influence(model, train, val, solver="woodbury", **options)
    direct = fi.Influence(model, train, val, solver="direct", **options)
    assert woodbury.report.solver == "woodbury" and woodbury.report.solve.converged
    assert relative_error(woodbury.scores(), direct.scores()) < 1e-10
    assert relative_error(woodbury.self_influence(), direct.self_influence()) < 1e-10
    assert relative_error(woodbury.pairwise(val), direct.pairwise(val)) < 1e-10


@pytest.mark.parametrize("n_train", [10, 200], ids=["one-gram-block", "two-gram-blocks"])
def test_scores_match_the_explicit_solve(n_train):
    """200 samples × 2 rows (3 classes, rank 2) = 400 rows: ``BBᵀ`` is built from its lower
    block triangle in blocks of 384 rows, the second block uneven."""
    model, train, val = make_problem("mlp", seed=13, n_train=n_train, n_val=4)
    plist = list(model.parameters())
    damping = 0.2
    solution = reference.ihvp_direct(reference.gauss_newton(model, plist, *train),
                                     reference.mean_loss_grad(model, plist, *val), damping)
    expected = -reference.per_sample_grads(model, plist, *train) @ solution
    inf = fi.Influence(model, train, val, params="all", hessian="gauss-newton",
                       solver="woodbury", damping=damping)
    assert relative_error(inf.scores(), expected) < 1e-10


def concave(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(out ** 2).sum(dim=1)


@pytest.mark.parametrize(("options", "suggestion", "instead"), [
    (dict(params="all", hessian="exact"), "hessian='gauss-newton'",
     dict(hessian="gauss-newton")),
    (dict(params="last"), "solver='direct'", dict(solver="direct")),
    (dict(params="last", hessian="kfac"), "solver='direct'", dict(solver="direct")),
    (dict(params="all", hessian="ekfac"), "solver='direct'", dict(solver="direct")),
    (dict(params="all", damping=0.0), "damping > 0", dict(damping=0.01)),
    (dict(params="all", max_gib=1e-9), "max_gib", dict(max_gib=1.0)),
    (dict(params="all", loss_fn=concave), "solver='direct'", dict(solver="direct", damping=50.0)),
])
def test_refusals_suggest_a_setting_that_works(options, suggestion, instead):
    model, train, val = make_problem("mlp", seed=14, n_train=6, n_val=3)
    with pytest.raises(ValueError) as refused:
        fi.Influence(model, train, val, solver="woodbury", **options)
    assert suggestion in str(refused.value)
    followed = {"solver": "woodbury", **options, **instead}
    assert fi.Influence(model, train, val, **followed).report.solve.converged


def test_the_refusal_across_processes_suggests_cg():
    """Woodbury over a rank's shard would miss the other ranks' rows; CG runs across
    processes (tests/test_distributed.py). No collective runs before the refusal."""
    model, train, val = make_problem("mlp", seed=14, n_train=6, n_val=3)
    inf = fi.Influence(model, train, val, params="all", solver="cg")
    backend = DistributedBackend(lambda data, _sums: GaussNewtonBackend(inf.fmodel, data,
                                                                        val[0][:2]),
                                 inf.train, Shards(None, rank=0, world=2))
    with pytest.raises(ValueError, match="across processes.*use solver='cg'"):
        make_solver("woodbury", backend, 0.01, fi.WoodburyConfig())


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_gib"):
        fi.WoodburyConfig(max_gib=0)
    with pytest.raises(ValueError, match="chunk_size"):
        fi.WoodburyConfig(chunk_size=0)
    with pytest.raises(TypeError, match="unknown option"):
        fi.Influence(*make_problem("mlp", n_train=4, n_val=2), params="all", solver="woodbury",
                     depth=3)
