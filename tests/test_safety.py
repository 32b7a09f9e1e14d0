"""Bad input fails fast with a clear message; the caller's model and data come back unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import make_problem
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastinfluence as fi


@pytest.fixture
def mlp_problem():
    return make_problem("mlp", seed=11)


def with_value(x: torch.Tensor, index, value) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t, v: ((with_value(t[0], (0, 0), float("nan")), t[1]), v), "train X contains"),
        (lambda t, v: (t, (with_value(v[0], (1, 2), float("inf")), v[1])), "val X contains"),
        (lambda t, v: ((t[0][:0], t[1][:0]), v), "train is empty"),
        (lambda t, v: (t, (v[0], v[1][:-1])), "val X and y differ in length"),
        (lambda t, v: ((t[0], with_value(t[1], 3, 7)), v), r"labels in \[0, 7\]"),
        (lambda t, v: ((t[0], with_value(t[1], 0, -1)), v), r"labels in \[-1"),
        (lambda t, v: (t, (v[0], v[1].double())), "integer class indices"),
    ],
)
def test_bad_data_raises_clear_errors(mlp_problem, mutate, message):
    model, train, val = mlp_problem
    bad_train, bad_val = mutate(train, val)
    with pytest.raises(ValueError, match=message):
        fi.Influence(model, bad_train, bad_val)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"params": ["nope"]}, ValueError, "no module or parameter named 'nope'"),
        ({"params": "first"}, ValueError, "params must be"),
        ({"params": []}, ValueError, "empty list"),
        ({"params": [nn.Parameter(torch.zeros(2))]}, ValueError, "not a parameter of the model"),
        ({"solver": "newton"}, ValueError, "solver must be one of"),
        ({"hessian": "fisher"}, ValueError, "hessian must be one of"),
        ({"damping": -0.1}, ValueError, "damping must be"),
        ({"damping": float("nan")}, ValueError, "damping must be"),
        ({"batch_size": 0}, ValueError, "batch_size must be"),
        ({"solver": "cg", "depth": 3}, TypeError, r"unknown option\(s\) \['depth'\]"),
        ({"solver": "cg", "tol": -1.0}, ValueError, "tol must be > 0"),
        ({"solver": "lissa", "repeats": 0}, ValueError, "repeats must be >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(mlp_problem, kwargs, error, message):
    model, train, val = mlp_problem
    with pytest.raises(error, match=message):
        fi.Influence(model, train, val, **kwargs)


def test_model_without_parameters_and_bad_data_types(mlp_problem):
    _, train, val = mlp_problem
    with pytest.raises(ValueError, match="no parameters"):
        fi.Influence(nn.Identity(), train, val)
    model = mlp_problem[0]
    with pytest.raises(TypeError, match=r"\(X, y\) tuple"):
        fi.Influence(model, train[0], val)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fi.Influence(lambda x: x, train, val)


def test_bad_labels_in_a_loader_are_caught_while_reading(mlp_problem):
    model, (x, y), val = mlp_problem
    loader = DataLoader(TensorDataset(x, with_value(y, 5, 9)), batch_size=8)
    with pytest.raises(ValueError, match="labels in"):
        fi.Influence(model, loader, val)


def test_indefinite_hessian_is_reported_not_hidden():
    model, train, val = make_problem("cnn", seed=0)
    with pytest.raises(fi.NotPositiveDefiniteError, match="smallest eigenvalue"):
        fi.Influence(model, train, val, params="all", solver="direct", damping=0.0,
                     hessian="exact")
    with pytest.raises(fi.NotPositiveDefiniteError, match="non-positive curvature"):
        fi.Influence(model, train, val, params="all", solver="cg", damping=0.0, hessian="exact")
    with pytest.raises(fi.DivergenceError, match="diverged"):
        fi.Influence(model, train, val, params="all", solver="lissa", damping=1e-3,
                     depth=5000, hessian="exact")


def test_unconverged_solve_warns_and_reports():
    model, train, val = make_problem("mlp", seed=1)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        inf = fi.Influence(model, train, val, params="all", hessian="gauss-newton",
                           solver="cg", max_iter=2, damping=0.01)
    assert not inf.report.solve.converged
    assert inf.report.solve.iterations == 2
    assert inf.report.solve.relative_residual > inf.solver.config.tol


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


@pytest.mark.parametrize("params", ["last", "all"])
def test_model_and_inputs_come_back_unchanged(params):
    model, train, val = make_problem("cnn", seed=2)
    model.train()
    model[1].eval()
    model[0].bias.requires_grad_(False)
    before = snapshot(model)
    inputs_before = [t.clone() for t in (*train, *val)]
    inf = fi.Influence(model, train, val, params=params, damping=1.0, hessian="gauss-newton")
    inf.scores()
    inf.perturbation(*val)
    inf.self_influence(val)
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert all(torch.equal(a, b) for a, b in zip(inputs_before, (*train, *val), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_scores_use_eval_mode_even_for_a_model_in_training_mode():
    model, train, val = make_problem("cnn", seed=3)
    expected = fi.score(model, train, val)
    model.train()
    assert torch.allclose(fi.score(model, train, val), expected, rtol=1e-12, atol=0)


@settings(max_examples=8, deadline=None)
@given(
    batch_size=st.integers(1, 50),
    form=st.sampled_from(["tuple", "dataset", "loader"]),
    params=st.sampled_from(["last", "all"]),
    seed=st.integers(0, 2**16),
)
def test_data_form_and_batch_size_do_not_change_results(batch_size, form, params, seed):
    model, train, val = make_problem("mlp", seed=seed, n_train=30, n_val=7)
    expected = fi.Influence(model, train, val, params=params, damping=0.3,
                            hessian="gauss-newton")

    def wrap(pair):
        if form == "tuple":
            return pair
        dataset = TensorDataset(*pair)
        return dataset if form == "dataset" else DataLoader(dataset, batch_size=batch_size)

    inf = fi.Influence(model, wrap(train), wrap(val), params=params, damping=0.3,
                       hessian="gauss-newton", batch_size=batch_size)
    assert torch.allclose(inf.ihvp, expected.ihvp, rtol=1e-9, atol=1e-12)
    assert torch.allclose(inf.scores(), expected.scores(), rtol=1e-9, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), copies=st.integers(2, 4))
def test_repeating_the_validation_set_changes_nothing(seed, copies):
    """Influence is on the *mean* validation loss (property of Eq. 7)."""
    model, train, val = make_problem("logistic", seed=seed, n_train=25, n_val=6)
    once = fi.score(model, train, val, damping=0.2)
    repeated = (val[0].repeat(copies, 1), val[1].repeat(copies))
    assert torch.allclose(fi.score(model, train, repeated, damping=0.2), once, rtol=1e-9,
                          atol=1e-12)


def test_progress_bars_show_long_work(capsys):
    model, train, val = make_problem("mlp", seed=4)
    quiet = fi.score(model, train, val, params="all", hessian="gauss-newton", solver="cg",
                     damping=0.1)
    assert capsys.readouterr().err == ""
    shown = fi.score(model, train, val, params="all", hessian="gauss-newton", solver="cg",
                     damping=0.1, progress=True)
    err = capsys.readouterr().err
    assert "CG" in err and "scores (train)" in err
    assert torch.equal(quiet, shown)


def test_default_cpu_batch_keeps_activations_small():
    from fastinfluence.models import PaperCNN

    model = PaperCNN(image_size=64).eval()
    data = (torch.rand(4, 1, 64, 64), torch.tensor([0, 1, 2, 0]))
    # The first block's output is 32 × 64 × 64 float32 = 512 KiB per sample: 16 fit in 8 MiB.
    assert fi.Influence(model, data, data).batch_size == 16
    assert fi.Influence(model, data, data, batch_size=3).batch_size == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": True}, ValueError, "batch_size must be"),
        ({"batch_size": 8.0}, ValueError, "batch_size must be"),
        ({"solver": "lissa", "depth": 2.5}, TypeError, "depth must be an integer"),
        ({"solver": "lissa", "depth": "100"}, TypeError, "depth must be an integer"),
        ({"solver": "lissa", "repeats": True}, TypeError, "repeats must be an integer"),
        ({"solver": "lissa", "power_iters": 3.0}, TypeError, "power_iters must be an integer"),
        ({"solver": "lissa", "minibatch_size": 1.5}, TypeError, "minibatch_size must be an"),
        ({"solver": "lissa", "scale": float("inf")}, ValueError, "scale must be > 0 and finite"),
        ({"solver": "lissa", "scale": float("nan")}, ValueError, "scale must be > 0 and finite"),
        ({"solver": "lissa", "tol": float("inf")}, ValueError, "tol must be > 0 and finite"),
        ({"solver": "cg", "max_iter": 2.0}, TypeError, "max_iter must be an integer"),
        ({"solver": "cg", "tol": float("nan")}, ValueError, "tol must be > 0 and finite"),
        ({"solver": "direct", "chunk": True}, TypeError, "chunk must be an integer"),
    ],
)
def test_bad_numbers_in_options_raise_clear_errors(mlp_problem, kwargs, error, message):
    model, train, val = mlp_problem
    with pytest.raises(error, match=message):
        fi.Influence(model, train, val, **kwargs)


def test_full_batch_lissa_with_an_unreachable_tol_stops_and_says_so():
    """float32 cannot reach tol=1e-12; the recursion stops when its residual stalls instead of
    running all 10⁶ steps, and the solve is reported (and warned) as not converged."""
    model, (x, y), (xv, yv) = make_problem("mlp", seed=9)
    model.float()
    with pytest.warns(RuntimeWarning, match="lissa solve did not reach tol=1e-12"):
        inf = fi.Influence(model, (x.float(), y), (xv.float(), yv), solver="lissa",
                           tol=1e-12, depth=10**6, damping=0.1)
    assert not inf.report.solve.converged
    assert inf.report.solve.iterations < 20_000
    assert inf.report.solve.relative_residual < 1e-4
    exact = fi.Influence(model.double(), (x, y), (xv, yv), solver="direct", damping=0.1)
    assert torch.allclose(inf.ihvp.double(), exact.ihvp, rtol=1e-4, atol=1e-6)
