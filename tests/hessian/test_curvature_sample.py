"""Curvature on a subsample (``curvature_samples``): the textbook curvature of the drawn
training samples, in float64, while scores cover every training sample."""

from __future__ import annotations

import pytest
import torch
from problems import make_problem

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.hessian.selection import curvature_sample
from fastinfluence.labelled_data import LabelledData


@pytest.mark.parametrize("hessian", ["gauss-newton", "exact"])
def test_all_samples_give_the_full_curvature_exactly(hessian):
    model, train, val = make_problem("cnn")
    options = {"params": "all", "hessian": hessian, "solver": "direct", "damping": 1.0}
    full = fi.Influence(model, train, val, **options)
    every = fi.Influence(model, train, val, curvature_samples=len(train[1]), **options)
    assert torch.equal(every.ihvp, full.ihvp)
    assert torch.equal(every.scores(), full.scores())


@pytest.mark.parametrize(("hessian", "solver"), [("gauss-newton", "direct"), ("exact", "direct"),
                                                 ("gauss-newton", "cg"), ("kfac", "direct")])
def test_a_subsample_gives_the_curvature_of_those_samples(hessian, solver):
    """``H`` is the explicit curvature of the ``m`` drawn samples; ``∇L(val)`` and the scores
    are those of the full data (``n`` scores)."""
    model, train, val = make_problem("mlp")
    m, damping = 15, 1.0
    influence = fi.Influence(model, train, val, params="all", hessian=hessian, solver=solver,
                             damping=damping, curvature_samples=m, curvature_seed=7, tol=1e-12)
    indices = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(7))[:m]
    x, y = train[0][indices.sort().values], train[1][indices.sort().values]
    params = list(model.parameters())
    if hessian == "kfac":
        expected = fi.Influence(model, (x, y), val, params="all", hessian="kfac",
                                damping=damping).backend.dense()
    else:
        curvature = reference.gauss_newton if hessian == "gauss-newton" else reference.hessian
        expected = curvature(model, params, x, y)
    torch.testing.assert_close(influence.backend.dense(), expected, rtol=1e-10, atol=1e-12)
    assert influence.backend.num_samples == m
    solution = torch.linalg.solve(expected + damping * torch.eye(len(expected),
                                                                 dtype=expected.dtype),
                                  reference.mean_loss_grad(model, params, *val))
    torch.testing.assert_close(influence.ihvp, solution, rtol=1e-9, atol=1e-11)
    scores = influence.scores()
    assert scores.shape == (len(train[1]),)
    torch.testing.assert_close(scores, reference.scores_from_ihvp(model, params, *train,
                                                                  solution))


def test_the_draw_is_seeded_and_without_replacement():
    _, train, _ = make_problem("mlp")
    data = LabelledData(train, "train", 8)
    first, settings = curvature_sample(data, 25, 3)
    again, _ = curvature_sample(data, 25, 3)
    other, _ = curvature_sample(data, 25, 4)
    assert settings == {"curvature_samples": 25, "curvature_seed": 3}
    assert torch.equal(first.tensors[1], again.tensors[1])
    assert torch.equal(first.tensors[0], again.tensors[0])
    assert not torch.equal(first.tensors[0], other.tensors[0])
    assert len(torch.unique(first.tensors[0], dim=0)) == 25
    assert curvature_sample(data, None, 0) == (data, {})


@pytest.mark.parametrize(("samples", "seed", "error", "message"), [
    (0, 0, ValueError, "curvature_samples must be >= 1"),
    (41, 0, ValueError, "curvature_samples=41 exceeds the 40 training samples"),
    (2.5, 0, TypeError, "curvature_samples must be an integer"),
    (True, 0, TypeError, "curvature_samples must be an integer"),
    (10, -1, ValueError, "curvature_seed must be >= 0"),
    (10, "a", TypeError, "curvature_seed must be an integer"),
])
def test_bad_subsamples_are_refused(samples, seed, error, message):
    model, train, val = make_problem("mlp")
    with pytest.raises(error, match=message):
        fi.Influence(model, train, val, params="all", curvature_samples=samples,
                     curvature_seed=seed)
