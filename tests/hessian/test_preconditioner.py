"""Preconditioned CG (``CGConfig(preconditioner=)``) against the direct solve of the explicit
float64 curvature, and CG with and without a preconditioner on an ill-conditioned problem."""

from __future__ import annotations

import pytest
import torch
from problems import make_problem
from torch import nn

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.hessian.solvers import CGConfig

CURVATURE = {"gauss-newton": reference.gauss_newton, "exact": reference.hessian}


def explicit_ihvp(model: nn.Module, train, val, hessian: str, damping: float) -> torch.Tensor:
    """``(C + λI)^{-1}∇L(val)`` from the textbook curvature, after checking that it is PD."""
    params = list(model.parameters())
    matrix = CURVATURE[hessian](model, params, *train)
    damped = matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype)
    assert float(torch.linalg.eigvalsh(damped)[0]) > 0
    return torch.linalg.solve(damped, reference.mean_loss_grad(model, params, *val))


@pytest.mark.parametrize("preconditioner", ["kfac", "ekfac"])
@pytest.mark.parametrize("hessian", ["gauss-newton", "exact"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_preconditioned_cg_reaches_the_direct_solution(kind, hessian, preconditioner):
    """The small CNN's BatchNorm has no K-FAC factors: its block is the scalar one. The
    exact Hessians' smallest eigenvalues are −0.18 (MLP) and −0.83 (CNN): damping 1 makes
    them positive definite."""
    model, train, val = make_problem(kind)
    damping = 0.5 if hessian == "gauss-newton" else 1.0
    influence = fi.Influence(model, train, val, params="all", solver="cg", hessian=hessian,
                             damping=damping, preconditioner=preconditioner, tol=1e-11)
    expected = explicit_ihvp(model, train, val, hessian, damping)
    torch.testing.assert_close(influence.ihvp, expected, rtol=1e-8, atol=1e-10)
    solve = influence.report.solve
    assert solve.converged and solve.relative_residual <= 1e-11
    assert solve.preconditioner == preconditioner
    assert solve.preconditioner_passes == (2 if preconditioner == "ekfac" else 1)
    plain = fi.Influence(model, train, val, params="all", solver="cg", hessian=hessian,
                         damping=damping, tol=1e-11).report.solve
    assert plain.preconditioner is None and plain.preconditioner_passes == 0


def ill_conditioned_problem():
    """An MLP trained to fit its data, on features of scales 10⁻²–10²."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    scales = torch.logspace(-2, 2, 6, dtype=torch.float64)
    x = torch.randn(80, 6, generator=generator, dtype=torch.float64) * scales
    y = (x[:, 0] * 50 + x[:, 5] / 50 > 0).long() + (x[:, 3] > 0).long()
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), (x, y), (x[:10], y[:10])


@pytest.mark.parametrize("preconditioner", ["kfac", "ekfac"])
def test_preconditioned_cg_takes_fewer_products_on_an_ill_conditioned_problem(preconditioner):
    model, train, val = ill_conditioned_problem()
    options = {"params": "all", "solver": "cg", "hessian": "gauss-newton", "damping": 1e-4,
               "tol": 1e-8}
    plain = fi.Influence(model, train, val, **options)
    preconditioned = fi.Influence(model, train, val, preconditioner=preconditioner, **options)
    assert plain.report.solve.converged and preconditioned.report.solve.converged
    print(plain.report.solve, preconditioned.report.solve)
    products = preconditioned.report.solve.hessian_products
    assert products + preconditioned.report.solve.preconditioner_passes <= (
        plain.report.solve.hessian_products)


def test_bad_preconditioners_are_refused_before_any_work():
    model, train, val = make_problem("mlp")
    with pytest.raises(ValueError, match=r"preconditioner must be None or one of \('kfac', "
                                         r"'ekfac'\), got 'jacobi'"):
        CGConfig(preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner must be None"):
        fi.Influence(model, train, val, params="all", solver="cg", preconditioner="jacobi")
    with pytest.raises(TypeError, match=r"'preconditioner' is an option of solver=cg"):
        fi.Influence(model, train, val, params="all", solver="lissa", preconditioner="kfac")
    with pytest.raises(ValueError, match="needs damping > 0"):
        fi.Influence(model, train, val, params="all", solver="cg", damping=0.0,
                     preconditioner="kfac")
    with pytest.raises(ValueError, match="not on the 'kfac' curvature"):
        fi.Influence(model, train, val, params="all", solver="cg", hessian="kfac",
                     preconditioner="kfac")
    with pytest.raises(ValueError, match="not on the 'head-closed-form' curvature"):
        fi.Influence(model, train, val, params="last", solver="cg", preconditioner="ekfac")
