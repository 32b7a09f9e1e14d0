"""Models as users write them: tuple/dict outputs, an LSTM, half precision, the default
curvature of an untrained network; and the report of queries."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from problems import LSTMClassifier, make_problem
from torch import nn

import fastinfluence as fi
from fastinfluence import reference


class TwoOutputs(nn.Module):
    """Returns ``(logits, features)`` or ``{"logits": ..., "features": ...}``."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        features = self.body(x)
        logits = self.head(features)
        return {"logits": logits, "features": features} if self.as_dict else (logits, features)


class Plain(nn.Module):
    def __init__(self, twin: TwoOutputs) -> None:
        super().__init__()
        self.body, self.head = twin.body, twin.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def data(seed: int = 0, n: int = 30):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return X, y


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("params", ["last", "all"])
def test_tuple_and_dict_outputs_score_through_an_output_selector(as_dict, params):
    torch.manual_seed(0)
    model = TwoOutputs(as_dict).double().eval()
    train, val = data(0), data(1, 8)
    pick = (lambda out: out["logits"]) if as_dict else (lambda out: out[0])
    options = {"params": params, "damping": 1.0, "hessian": "exact"}
    inf = fi.Influence(model, train, val, output=pick, **options)
    plain = fi.Influence(Plain(model), train, val, **options)
    assert inf.report.path == plain.report.path
    torch.testing.assert_close(inf.scores(), plain.scores(), rtol=1e-10, atol=1e-12)


def test_a_loss_fn_that_unpacks_the_output_needs_no_selector():
    torch.manual_seed(0)
    model = TwoOutputs().double().eval()
    train, val = data(0), data(1, 8)

    def unpacking_loss(out, y):
        return F.cross_entropy(out[0], y, reduction="none")

    inf = fi.Influence(model, train, val, params="all", loss_fn=unpacking_loss, damping=1.0)
    assert inf.report.hessian == "exact"  # Gauss-Newton needs a tensor output
    plist = list(model.parameters())
    plain = Plain(model)
    s = reference.ihvp_direct(reference.hessian(plain, plist, *train),
                              reference.mean_loss_grad(plain, plist, *val), 1.0)
    expected = -(reference.per_sample_grads(plain, plist, *train) @ s)
    torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="tensor model output"):
        fi.Influence(model, train, val, params="all", loss_fn=unpacking_loss,
                     hessian="gauss-newton")
    with pytest.raises(ValueError, match="output="):
        fi.Influence(model, train, val)


def test_an_lstm_scores_in_reverse_mode_and_says_why():
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    X, y = torch.randn(16, 5, 3), torch.randint(0, 3, (16,))
    inf = fi.Influence(model, (X, y), (X[:4], y[:4]), params="all", damping=0.1)
    assert inf.report.scoring == "reverse-mode"
    assert "mkldnn" in inf.report.scoring_reason or "forward" in inf.report.scoring_reason
    double = copy.deepcopy(model).double()
    expected = -(reference.per_sample_grads(double, list(double.parameters()), X.double(), y)
                 @ inf.ihvp.double())
    torch.testing.assert_close(inf.scores().double(), expected, rtol=1e-4, atol=1e-6)
    # self-influence ∇l(z)ᵀ(G + λI)^{-1}∇l(z) through the same reverse-mode path
    assert inf.report.hessian == "gauss-newton"
    plist = list(double.parameters())
    gradients = reference.per_sample_grads(double, plist, X.double(), y)
    damped = reference.gauss_newton(double, plist, X.double(), y) + 0.1 * torch.eye(
        len(gradients.T), dtype=torch.float64)
    expected_self = (gradients * torch.linalg.solve(damped, gradients.T).T).sum(dim=1)
    torch.testing.assert_close(inf.self_influence().double(), expected_self, rtol=1e-3,
                               atol=1e-5)


def test_half_precision_models_are_scored_in_float32():
    model, train, val = make_problem("mlp", seed=2)
    low = copy.deepcopy(model).to(torch.bfloat16)
    train32 = (train[0].float(), train[1])
    val32 = (val[0].float(), val[1])
    inf = fi.Influence(low, train32, val32, params="all", damping=0.3)
    assert inf.report.dtype == torch.float32 and inf.ihvp.dtype == torch.float32
    twin = fi.Influence(copy.deepcopy(low).float(), train32, val32, params="all", damping=0.3)
    torch.testing.assert_close(inf.scores(), twin.scores(), rtol=1e-5, atol=1e-7)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())


def test_perturbation_keeps_the_input_dtype_and_rejects_integer_inputs():
    model, train, val = make_problem("mlp", seed=3)
    inf = fi.Influence(model, train, val, damping=0.3)
    x32 = train[0][:4].float()
    maps = inf.perturbation(x32, train[1][:4])
    assert maps.dtype == torch.float32 and maps.shape == x32.shape
    torch.testing.assert_close(maps.double(), inf.perturbation(train[0][:4], train[1][:4]),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="floating-point inputs"):
        inf.perturbation(torch.randint(0, 5, (4, 5)), train[1][:4])


def test_unknown_keywords_are_reported_as_keywords_of_score():
    model, train, val = make_problem("logistic")
    with pytest.raises(TypeError, match=r"dampign.*score/Influence") as caught:
        fi.score(model, train, val, dampign=0.1)
    assert "solver=" not in str(caught.value)


def test_singular_psd_head_is_not_told_to_use_gauss_newton():
    """More head parameters than samples: the head's Hessian is PSD and singular."""
    model, train, val = make_problem("logistic", n_train=4)
    with pytest.raises(fi.NotPositiveDefiniteError) as caught:
        fi.Influence(model, train, val, damping=0.0, solver="direct")
    assert "gauss-newton" not in str(caught.value)
    assert "positive semi-definite but singular" in str(caught.value)


def test_queries_keep_the_construction_solve_report():
    model, train, val = make_problem("mlp", seed=4)
    inf = fi.Influence(model, train, val, params="all", damping=0.5, solver="cg", tol=1e-10)
    construction = inf.report.solve
    inf.pairwise((val[0][:3], val[1][:3]))
    assert inf.report.solve is construction
    assert inf.report.query_solve is not None and inf.report.query_solve is not construction


def test_default_curvature_of_an_untrained_relu_network_is_gauss_newton():
    """The exact Hessian of this untrained ReLU network is indefinite beyond the default
    damping, so the default call would fail with it; Gauss-Newton is PSD and solves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    train, val = data(0, 40), data(1, 10)
    plist = list(model.parameters())
    assert float(torch.linalg.eigvalsh(reference.hessian(model, plist, *train))[0]) < -0.01
    with pytest.raises(fi.NotPositiveDefiniteError):
        fi.score(model, train, val, params="all", hessian="exact", solver="direct")
    inf = fi.Influence(model, train, val, params="all", solver="direct")
    assert inf.report.hessian == "gauss-newton"
    matrix = reference.gauss_newton(model, plist, *train) + 0.01 * torch.eye(len(inf.ihvp),
                                                                             dtype=torch.float64)
    s = torch.linalg.solve(matrix, reference.mean_loss_grad(model, plist, *val))
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-8, atol=1e-10)


class HeadRegisteredFirst(nn.Module):
    """The output layer is registered before the body: "last" must mean last to run."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def test_last_means_the_last_module_to_run():
    torch.manual_seed(0)
    model = HeadRegisteredFirst().double().eval()
    train, val = data(0), data(1, 8)
    inf = fi.Influence(model, train, val, damping=0.1)
    assert inf.selection.names == ("out.weight", "out.bias")
    assert inf.report.path == "head-closed-form"
    by_name = fi.Influence(model, train, val, params=["out"], damping=0.1)
    torch.testing.assert_close(inf.scores(), by_name.scores(), rtol=1e-12, atol=1e-14)
    model.out.requires_grad_(False)
    with pytest.raises(ValueError, match="out"):
        fi.Influence(model, train, val)


@pytest.mark.parametrize("solver", ["cg", "woodbury"])
def test_torch_notes_on_missing_batching_rules_do_not_reach_the_caller(solver):
    """The float32 CPU LSTM kernel has no vmap batching rule: torch loops over the batch and
    warns "There is a performance drop ..." from our vmaps (per-sample gradients, Gauss-Newton
    products, Woodbury's rows). Same numbers, nothing for the caller to do: not shown."""
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    X, y = torch.randn(8, 5, 3), torch.randint(0, 3, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = fi.Influence(model, (X, y), (X[:4], y[:4]), params="all", damping=0.1,
                           solver=solver)
        inf.scores()
        inf.self_influence()
    shown = [str(w.message) for w in caught if "performance drop" in str(w.message)]
    assert not shown, shown[0]
