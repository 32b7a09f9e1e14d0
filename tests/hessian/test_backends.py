"""Each curvature backend against its slow twin in ``fastinfluence.reference``, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from problems import LSTMClassifier, make_problem

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.differentiation import ForwardMode, FusedTangent, ReverseMode
from fastinfluence.hessian.exact import ExactHessianBackend
from fastinfluence.hessian.gauss_newton import GaussNewtonBackend
from fastinfluence.hessian.head import HeadBackend
from fastinfluence.hessian.network import NetworkBackend
from fastinfluence.hessian.probe import probe_model
from fastinfluence.hessian.protocol import Capability
from fastinfluence.hessian.selection import select_backend
from fastinfluence.labelled_data import LabelledData
from fastinfluence.params import select_parameters


def build(kind: str, params: str, hessian: str, *, differentiation=None, seed: int = 0):
    """A backend on a float64 test problem, the selected parameters and the data."""
    model, train, val = make_problem(kind, seed=seed, n_train=18, n_val=5)
    selection = select_parameters(model, params)
    fmodel = FunctionalModel(model, selection, None, torch.device("cpu"))
    data = LabelledData(train, "train", batch_size=7)
    example = val[0][:2]
    if hessian == "head":
        backend = HeadBackend(fmodel, data)
    else:
        kind_of = ExactHessianBackend if hessian == "exact" else GaussNewtonBackend
        backend = kind_of(fmodel, data, example, differentiation=differentiation)
    plist = [dict(model.named_parameters())[n] for n in selection.names]
    return backend, model, plist, data, train, val


FORWARD = None  # let the backend choose: the fused tangent pass where it compiles
JVP_ONLY = ForwardMode("forced by the test")
REVERSE_ONLY = ReverseMode("forced by the test")
CASES = [
    ("logistic", "last", "head", FORWARD),
    ("cnn", "last", "head", FORWARD),
    ("mlp", "all", "exact", FORWARD),
    ("mlp", "all", "exact", REVERSE_ONLY),
    ("cnn", "all", "exact", FORWARD),
    ("cnn", "all", "exact", REVERSE_ONLY),
    ("mlp", "all", "gauss-newton", FORWARD),
    ("cnn", "all", "gauss-newton", FORWARD),
    ("cnn", "all", "gauss-newton", JVP_ONLY),
    ("cnn", "all", "gauss-newton", REVERSE_ONLY),
]


def twin_curvature(hessian: str, model, plist, X, y) -> torch.Tensor:
    if hessian == "gauss-newton":
        return reference.gauss_newton(model, plist, X, y)
    return reference.hessian(model, plist, X, y)


@pytest.mark.parametrize(("kind", "params", "hessian", "differentiation"), CASES)
def test_backend_matches_its_textbook_twin(kind, params, hessian, differentiation):
    backend, model, plist, data, train, val = build(kind, params, hessian,
                                                    differentiation=differentiation)
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(3, backend.dim, generator=generator, dtype=torch.float64)
    matrix = twin_curvature(hessian, model, plist, *train)
    torch.testing.assert_close(backend.matvec(vectors), vectors @ matrix, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(backend.dense(chunk=5), matrix, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(backend.mean_gradient(LabelledData(val, "val", 2)),
                               reference.mean_loss_grad(model, plist, *val), rtol=1e-10,
                               atol=1e-12)
    grads = reference.per_sample_grads(model, plist, *train)
    torch.testing.assert_close(backend.per_sample_gradients(data), grads, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(backend.directional(data, vectors), grads @ vectors.T,
                               rtol=1e-9, atol=1e-11)
    other = (val[0][1:4], val[1][1:4])
    torch.testing.assert_close(backend.directional(LabelledData(other, "other", 2), vectors),
                               reference.per_sample_grads(model, plist, *other) @ vectors.T,
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("kind", "params", "hessian"),
                         [("cnn", "last", "head"), ("mlp", "all", "exact"),
                          ("cnn", "all", "gauss-newton")])
def test_subsample_is_the_curvature_of_the_drawn_samples(kind, params, hessian):
    backend, model, plist, _, train, _ = build(kind, params, hessian)
    part = backend.subsample(11, torch.Generator().manual_seed(3))
    indices = torch.randint(len(train[0]), (11,), generator=torch.Generator().manual_seed(3))
    matrix = twin_curvature(hessian, model, plist, train[0][indices], train[1][indices])
    vectors = torch.randn(2, backend.dim, dtype=torch.float64)
    assert part.num_samples == 11
    torch.testing.assert_close(part.matvec(vectors), vectors @ matrix, rtol=1e-9, atol=1e-11)


def test_head_declares_and_runs_minibatch_lissa_recursions():
    """On 18 copies of one sample every minibatch's Hessian is the full one, so the
    minibatch recursion h_j = v + (1 − λ/s)h_{j−1} − H h_{j−1}/s, h_0 = v, is known exactly."""
    model, train, _ = make_problem("cnn", seed=0, n_train=1, n_val=1)
    x, y = train[0].repeat(18, 1, 1, 1), train[1].repeat(18)
    selection = select_parameters(model, "last")
    fmodel = FunctionalModel(model, selection, None, torch.device("cpu"))
    backend = HeadBackend(fmodel, LabelledData((x, y), "train", batch_size=7))
    assert backend.capabilities == {Capability.MINIBATCH_LISSA}
    rhs = torch.randn(2, backend.dim, dtype=torch.float64)
    damping, scale, depth = 0.1, 2.0, 10
    estimate = backend.lissa_recursion(rhs, damping, scale, depth, 8, 0)
    plist = [dict(model.named_parameters())[n] for n in selection.names]
    hessian = reference.hessian(model, plist, x, y)
    expected = rhs.clone()
    for _ in range(depth):
        expected = rhs + (1 - damping / scale) * expected - expected @ hessian / scale
    torch.testing.assert_close(estimate, expected / scale, rtol=1e-10, atol=1e-12)


def test_network_backends_take_the_fused_pass_where_it_compiles():
    backend, *_ = build("cnn", "all", "gauss-newton")
    assert backend.scoring == "fused-tangent"
    assert isinstance(backend.differentiation, FusedTangent)
    forced, *_ = build("cnn", "all", "gauss-newton", differentiation=REVERSE_ONLY)
    assert forced.scoring == "reverse-mode" and forced.scoring_reason == "forced by the test"


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_models_without_forward_mode_fall_back_to_reverse_mode(hessian):
    """In float32 the CPU LSTM runs a kernel without forward-mode derivatives; the float64
    copy (another kernel) is the twin."""
    torch.manual_seed(0)
    model = LSTMClassifier().eval()
    X = torch.randn(10, 5, 3)
    y = torch.randint(0, 3, (10,))
    selection = select_parameters(model, "all")
    fmodel = FunctionalModel(model, selection, None, torch.device("cpu"))
    probe = probe_model(fmodel, X[:2])
    backend = select_backend(fmodel, probe, LabelledData((X, y), "train", 4), X[:2], hessian)
    assert isinstance(backend, NetworkBackend)
    assert backend.scoring == "reverse-mode" and "forward-mode" in backend.scoring_reason
    double = copy.deepcopy(model).double()
    plist = list(double.parameters())
    vectors = torch.randn(2, backend.dim, dtype=torch.float64)
    matrix = twin_curvature(hessian, double, plist, X.double(), y)
    torch.testing.assert_close(backend.matvec(vectors.float()).double(), vectors @ matrix,
                               rtol=1e-4, atol=1e-5)
    grads = reference.per_sample_grads(double, plist, X.double(), y)
    torch.testing.assert_close(
        backend.directional(LabelledData((X, y), "x", 4), vectors.float()).double(),
        grads @ vectors.T, rtol=1e-4, atol=1e-5,
    )


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_first_solve_reports_the_products_that_built_the_solver(hessian):
    model, train, val = make_problem("mlp", seed=2)
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, solver="direct",
                       damping=0.5, chunk=16)
    # the explicit Hessian: one product per 16 identity columns; the Gauss-Newton matrix: one
    # pass of Jacobian rows; the residual uses the matrix
    built = -(-inf.report.num_params // 16) if hessian == "exact" else 1
    assert inf.report.solve.hessian_products == built
    inf.pairwise((val[0][:2], val[1][:2]))
    assert inf.report.query_solve.hessian_products == 0


def test_optional_capabilities_are_declared_and_others_refused():
    from fastinfluence.errors import NotSupportedError

    exact, *_ = build("mlp", "all", "exact")
    gauss_newton, *_ = build("mlp", "all", "gauss-newton")
    assert exact.capabilities == frozenset()
    assert gauss_newton.capabilities == {Capability.FACTOR_ROWS}
    # softmax cross-entropy over 3 classes: C − 1 = 2 rows per sample
    assert gauss_newton.factor_rows(4).shape == (18 * 2, gauss_newton.dim)
    for call in (lambda: exact.factor_rows(4), lambda: exact.closed_form_inverse(None, 0.1),
                 lambda: gauss_newton.lissa_recursion(None, 0.1, 1.0, 1, 2, 0)):
        with pytest.raises(NotSupportedError, match="does not offer"):
            call()
