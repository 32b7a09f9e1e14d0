"""The Woodbury solver: exact Gauss-Newton solves through the Jacobian rows, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem, relative_error

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.hessian.solvers import _gram


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
    assert rows.shape == (9 * 3, inf.report.num_params)
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


def test_scores_match_the_explicit_solve():
    model, train, val = make_problem("mlp", seed=13, n_train=10, n_val=4)
    plist = list(model.parameters())
    damping = 0.2
    solution = reference.ihvp_direct(reference.gauss_newton(model, plist, *train),
                                     reference.mean_loss_grad(model, plist, *val), damping)
    expected = -reference.per_sample_grads(model, plist, *train) @ solution
    inf = fi.Influence(model, train, val, params="all", hessian="gauss-newton",
                       solver="woodbury", damping=damping)
    assert relative_error(inf.scores(), expected) < 1e-10


@pytest.mark.parametrize(("options", "message"), [
    (dict(params="all", hessian="exact"), "Gauss-Newton curvature of a network"),
    (dict(params="last"), "Gauss-Newton curvature of a network"),
    (dict(params="all", damping=0.0), "damping > 0"),
    (dict(params="all", max_gib=1e-9), "max_gib"),
    (dict(params="all", loss_fn=lambda out, y: -(out ** 2).sum(dim=1)), "convex"),
])
def test_refuses_what_it_cannot_solve(options, message):
    model, train, val = make_problem("mlp", seed=14, n_train=6, n_val=3)
    with pytest.raises(ValueError, match=message):
        fi.Influence(model, train, val, solver="woodbury", **options)


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_gib"):
        fi.WoodburyConfig(max_gib=0)
    with pytest.raises(ValueError, match="chunk_size"):
        fi.WoodburyConfig(chunk_size=0)
    with pytest.raises(TypeError, match="unknown option"):
        fi.Influence(*make_problem("mlp", n_train=4, n_val=2), params="all", solver="woodbury",
                     depth=3)


@pytest.mark.parametrize("block", [1, 3, 4, 10, 64])
def test_block_triangle_gram_equals_the_full_product(block):
    rows = torch.randn(10, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(block))
    assert torch.allclose(_gram(rows, block), rows @ rows.T, rtol=0, atol=1e-12)
