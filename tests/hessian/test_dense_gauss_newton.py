"""The explicit Gauss-Newton matrix summed from Jacobian rows (what ``solver="direct"`` factors)
against the same matrix from products with identity columns, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem, relative_error

import fastinfluence as fi
from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian import gauss_newton
from fastinfluence.hessian.gauss_newton import GaussNewtonBackend
from fastinfluence.hessian.network import NetworkBackend
from fastinfluence.labelled_data import LabelledData
from fastinfluence.params import select_parameters


def squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((output - F.one_hot(y, output.shape[1]).to(output.dtype)) ** 2).sum(dim=1)


def concave(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(output**2).sum(dim=1)


def backend(kind: str, classes: int, loss_fn=None, n_train: int = 23) -> GaussNewtonBackend:
    model, (x, y), _ = make_problem(kind, seed=5, n_train=n_train)
    fmodel = FunctionalModel(model, select_parameters(model, "all"), loss_fn,
                             torch.device("cpu"))
    data = LabelledData((x, y % classes), "train", batch_size=6)
    return GaussNewtonBackend(fmodel, data, x[:2])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("loss_fn", [None, squared_error], ids=["cross-entropy", "squared"])
def test_rows_sum_to_the_matrix_of_products(kind, classes, loss_fn, monkeypatch):
    """Small blocks and row buffers (uneven against p and n), so that every update, the
    blocks below the diagonal and their mirror are exercised."""
    monkeypatch.setattr(gauss_newton, "GRAM_BLOCK", 7)
    monkeypatch.setattr(gauss_newton, "GRAM_ROWS", 5)
    curvature = backend(kind, classes, loss_fn)
    from_products = NetworkBackend.dense(curvature, chunk=9)
    passes = curvature.passes
    from_rows = curvature.dense(chunk=4)
    assert curvature.passes == passes + 1  # one pass of Jacobian rows
    assert relative_error(from_rows, from_products) < 1e-12
    assert torch.equal(from_rows, from_rows.T)


def test_rows_are_summed_a_few_thousand_at_a_time(monkeypatch):
    """Memory flat in n: no update sees more than the buffered rows and one chunk's."""
    monkeypatch.setattr(gauss_newton, "GRAM_ROWS", 8)
    seen = []
    add = gauss_newton._add_lower_gram
    monkeypatch.setattr(gauss_newton, "_add_lower_gram",
                        lambda gram, rows: (seen.append(len(rows)), add(gram, rows)))
    curvature = backend("mlp", 3, n_train=40)
    curvature.dense(chunk=3)
    assert sum(seen) == 40 * 2 and max(seen) <= 8 + 3 * 2 and len(seen) > 5


def test_a_non_convex_loss_falls_back_to_products_with_a_warning():
    curvature = backend("mlp", 3, concave)
    with pytest.warns(UserWarning, match="negative curvature in the model output"):
        from_rows = curvature.dense(chunk=4)
    assert relative_error(from_rows, NetworkBackend.dense(curvature, chunk=9)) < 1e-12


def test_direct_solve_on_rows_matches_woodbury():
    model, train, val = make_problem("cnn", seed=8, n_train=30, n_val=5)
    options = dict(params="all", hessian="gauss-newton", damping=0.05)
    direct = fi.Influence(model, train, val, solver="direct", **options)
    woodbury = fi.Influence(model, train, val, solver="woodbury", **options)
    assert direct.report.solve.hessian_products == 1
    assert relative_error(direct.scores(), woodbury.scores()) < 1e-10
    assert relative_error(direct.pairwise(val), woodbury.pairwise(val)) < 1e-10


def test_a_float32_direct_solve_is_refined_to_the_float64_one():
    """At a small damping the float32 Cholesky solve alone leaves a relative residual of 2e-4
    here; one step of refinement with the residual in float64 brings it under 1e-5."""
    model, train, val = make_problem("cnn", seed=9, n_train=60, n_val=5)
    options = dict(params="all", hessian="gauss-newton", solver="direct", damping=1e-4)
    exact = fi.Influence(model, train, val, **options).scores()
    single = fi.Influence(model.float(), (train[0].float(), train[1]),
                          (val[0].float(), val[1]), **options)
    assert single.report.solve.relative_residual < 1e-5
    # the rest is float32 itself: its Jacobians, G and gradients, amplified by the conditioning
    assert relative_error(single.scores().double(), exact) < 1e-3


@pytest.mark.parametrize("hessian", ["gauss-newton", "exact"])
def test_an_unconverged_iterative_solve_names_the_exact_solvers(hessian):
    model, train, val = make_problem("mlp", seed=3, n_train=20, n_val=4)
    with pytest.warns(RuntimeWarning, match="did not reach") as caught:
        fi.Influence(model, train, val, params="all", hessian=hessian, solver="cg",
                     max_iter=1, tol=1e-12)
    message = str(caught[0].message)
    if hessian == "gauss-newton":
        dim = sum(p.numel() for p in model.parameters())
        assert (f"exact without iterations: solver='direct' ({dim**2 * 8 / 2**30:.3g} GiB for "
                f"the p × p matrix, p = {dim}) or solver='woodbury'") in message
    else:  # no Jacobian rows for the exact Hessian
        assert "exact without iterations" not in message
