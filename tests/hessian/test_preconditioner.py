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


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum(dim=1)


def ill_conditioned_problem():
    """A Tanh MLP with squared error on features of scales 10⁻¹–10¹: the ill-conditioning
    sits in the input covariance, which K-FAC's activation factor holds (K-FAC is block
    diagonal, so where the layers' blocks couple strongly, as in a deep linear network, it
    can take more products than plain CG: docs/guide/curvature-and-solvers.md)."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    scales = torch.logspace(-1, 1, 6, dtype=torch.float64)
    x = torch.randn(80, 6, generator=generator, dtype=torch.float64) * scales
    targets = torch.randn(80, 3, generator=generator, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double().eval()
    return model, (x, targets), (x[:10], targets[:10])


@pytest.mark.parametrize("preconditioner", ["kfac", "ekfac"])
def test_preconditioned_cg_takes_fewer_products_on_an_ill_conditioned_problem(preconditioner):
    model, train, val = ill_conditioned_problem()
    options = {"params": "all", "solver": "cg", "hessian": "gauss-newton", "damping": 1e-4,
               "tol": 1e-8, "loss_fn": squared_error}
    plain = fi.Influence(model, train, val, **options).report.solve
    preconditioned = fi.Influence(model, train, val, preconditioner=preconditioner,
                                  **options).report.solve
    assert plain.converged and preconditioned.converged
    # 381 products without; 158 (K-FAC) and 147 (EK-FAC) with, factor passes aside
    assert preconditioned.hessian_products + preconditioned.preconditioner_passes < (
        plain.hessian_products / 2)


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
