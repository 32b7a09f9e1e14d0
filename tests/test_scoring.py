"""The engine against explicit float64 Hessian solves (fastinfluence.reference is the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import TiedEncoderDecoder, make_problem, relative_error

import fastinfluence as fi
from fastinfluence import reference


def selected(model, params):
    return list(model[-1].parameters()) if params == "last" else list(model.parameters())


def safe_damping(model, plist, train) -> float:
    """A damping that makes H + λI positive definite (networks' exact Hessians are not)."""
    smallest = float(torch.linalg.eigvalsh(reference.hessian(model, plist, *train))[0])
    return max(0.01, 0.1 - smallest)


SOLVER_OPTIONS = {
    "direct": {},
    "cg": {"tol": 1e-11, "max_iter": 2000},
    "lissa": {"tol": 1e-11, "depth": 20000},
}


@pytest.mark.parametrize("params", ["last", "all"])
@pytest.mark.parametrize("solver", ["direct", "cg", "lissa"])
def test_scores_match_explicit_hessian_solve(problem, params, solver):
    kind, model, train, val = problem
    plist = selected(model, params)
    damping = safe_damping(model, plist, train)
    if solver == "lissa":
        damping = max(damping, 1.0)  # LiSSA contracts like (1 − λ/scale)^t: keep the test short
    expected = reference.influence_scores(model, plist, train, val, damping)
    inf = fi.Influence(model, train, val, params=params, solver=solver, damping=damping,
                       hessian="exact", **SOLVER_OPTIONS[solver])
    assert relative_error(inf.scores(), expected) < 1e-7
    assert inf.report.solve.converged
    uses_head = params == "last" or kind == "logistic"
    assert inf.report.path == ("head-closed-form" if uses_head else "autograd")


@pytest.mark.parametrize(("kind", "solver"),
                         [("mlp", "direct"), ("mlp", "cg"), ("mlp", "lissa"), ("cnn", "cg")])
def test_gauss_newton_matches_explicit_solve(kind, solver):
    model, train, val = make_problem(kind, seed=3)
    plist = list(model.parameters())
    matrix = reference.gauss_newton(model, plist, *train)
    damping = 0.05
    gradient = reference.mean_loss_grad(model, plist, *val)
    s = torch.linalg.solve(matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype), gradient)
    expected = -(reference.per_sample_grads(model, plist, *train) @ s)
    inf = fi.Influence(model, train, val, params="all", solver=solver, damping=damping,
                       hessian="gauss-newton", **SOLVER_OPTIONS[solver])
    assert relative_error(inf.ihvp, s) < 1e-7
    assert relative_error(inf.scores(), expected) < 1e-7


@pytest.mark.parametrize(("output_first", "params"), [
    (False, "last"), (False, ["decoder"]), (False, ["decoder.weight", "decoder.bias"]),
    (True, "last")])
def test_a_tied_weight_is_scored_at_every_use(output_first, params):
    """``decoder.weight is encoder.weight``: θ_S holds the shared tensor once and its
    influence counts both uses (with ``output_first`` the decoder is a final Linear whose
    weight the encoder uses too, so its closed form would be wrong)."""
    torch.manual_seed(0)
    model = TiedEncoderDecoder(output_first=output_first).double().eval()
    generator = torch.Generator().manual_seed(1)
    train, val = ((torch.randn(n, 5, generator=generator, dtype=torch.float64),
                   torch.randint(0, 5, (n,), generator=generator)) for n in (30, 8))
    plist = [model.decoder.weight, model.decoder.bias]
    damping = safe_damping(model, plist, train)
    expected = reference.influence_scores(model, plist, train, val, damping)
    inf = fi.Influence(model, train, val, params=params, damping=damping, hessian="exact")
    assert inf.report.num_params == 30 and inf.report.path == "autograd"
    first, other = ("decoder", "encoder") if output_first else ("encoder", "decoder")
    assert inf.report.shared_parameters == {f"{first}.weight": (f"{other}.weight",)}
    assert relative_error(inf.scores(), expected) < 1e-9


def test_gauss_newton_equals_exact_hessian_for_the_head():
    model, train, val = make_problem("cnn", seed=1)
    exact = fi.Influence(model, train, val, params=["5"], hessian="exact")
    gauss_newton = fi.Influence(model, train, val, params=[model[5].weight, model[5].bias],
                                hessian="gauss-newton", loss_fn=lambda z, y: F.cross_entropy(
                                    z, y, reduction="none"))
    assert gauss_newton.report.path == "autograd"
    assert relative_error(gauss_newton.ihvp, exact.ihvp) < 1e-9


def test_custom_loss_uses_autograd_and_matches_reference():
    model, train, val = make_problem("mlp", seed=2)

    def smoothed(logits, y):
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)

    plist = list(model[-1].parameters())
    expected = reference.influence_scores(model, plist, train, val, 0.1, loss_fn=smoothed)
    inf = fi.Influence(model, train, val, loss_fn=smoothed, damping=0.1)
    assert inf.report.path == "autograd"
    assert "loss_fn" in inf.report.path_reason
    assert relative_error(inf.scores(), expected) < 1e-9


@pytest.mark.parametrize("params", ["last", "all"])
def test_pairwise_and_self_influence_match_reference(params):
    model, train, val = make_problem("cnn", seed=4, n_train=24, n_val=6)
    plist = selected(model, params)
    damping = safe_damping(model, plist, train)
    inf = fi.Influence(model, train, val, params=params, damping=damping, hessian="exact")
    expected_pairwise = reference.pairwise_influence(model, plist, train, val, damping)
    assert relative_error(inf.pairwise(val), expected_pairwise) < 1e-8
    expected_self = reference.self_influence(model, plist, train, damping)
    assert relative_error(inf.self_influence(), expected_self) < 1e-8
    cg = fi.Influence(model, train, val, params=params, damping=damping, solver="cg", tol=1e-10,
                      hessian="exact")
    assert relative_error(cg.self_influence((val[0][:3], val[1][:3])), reference.self_influence(
        model, plist, train, damping, data=(val[0][:3], val[1][:3]))) < 1e-7
    # Eq. 3 averaged over the test set is Eq. 7 with the test set as validation data.
    assert relative_error(inf.pairwise(val).mean(dim=1), inf.scores()) < 1e-9


@pytest.mark.parametrize("params", ["last", "all"])
def test_perturbation_matches_reference_and_finite_differences(params):
    model, train, val = make_problem("cnn", seed=5, n_train=24, n_val=6)
    plist = selected(model, params)
    damping = safe_damping(model, plist, train)
    inf = fi.Influence(model, train, val, params=params, damping=damping, batch_size=7,
                       hessian="exact")
    x, y = train[0][:9], train[1][:9]
    maps = inf.perturbation(x, y)
    assert maps.shape == x.shape
    expected = reference.perturbation_influence(model, plist, x, y, inf.ihvp)
    assert relative_error(maps, expected) < 1e-9
    # Finite differences of the score along a random direction of one input.
    direction = torch.randn_like(x[:1])
    step = 1e-5
    up = inf.scores((x[:1] + step * direction, y[:1]))
    down = inf.scores((x[:1] - step * direction, y[:1]))
    # I_pert = −∇_x(sᵀ∇l) = ∇_x score, so the directional derivative of the score is ⟨I_pert, u⟩.
    numeric = (up - down) / (2 * step)
    assert torch.allclose(numeric, (maps[:1] * direction).sum(), rtol=1e-5, atol=1e-9)


def test_scores_of_other_data_equal_train_scores_on_the_same_samples():
    model, train, val = make_problem("mlp", seed=6)
    for params in ["last", "all"]:
        inf = fi.Influence(model, train, val, params=params, damping=0.5)
        subset = (train[0][5:15], train[1][5:15])
        assert torch.allclose(inf.scores(subset), inf.scores()[5:15], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("params", ["last", "all"])
def test_minibatch_lissa_approaches_the_direct_solve(params):
    model, train, val = make_problem("mlp", seed=7, n_train=120)
    options = {"damping": 0.5, "hessian": "gauss-newton", "params": params}
    direct = fi.Influence(model, train, val, **options)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        lissa = fi.Influence(model, train, val, solver="lissa", minibatch_size=40, depth=200,
                             repeats=2, **options)
    assert lissa.report.solve.iterations == 2 * 200
    # Minibatch noise keeps LiSSA near, not at, the solution; the residual is measured honestly.
    assert relative_error(lissa.ihvp, direct.ihvp) < 0.1
    assert lissa.report.solve.relative_residual < 0.1


def test_full_batch_lissa_stops_early_on_the_residual():
    model, train, val = make_problem("logistic", seed=8)
    inf = fi.Influence(model, train, val, solver="lissa", damping=1.0, tol=1e-8, depth=100_000)
    assert inf.report.solve.converged
    assert inf.report.solve.iterations < 1000
    assert inf.report.solve.scale > 1.0


@pytest.mark.parametrize("params", ["last", "all"])
def test_float32_engine_agrees_with_float64(params):
    """The same model and data in float32 and in float64: scores within float32 accuracy."""
    import copy

    model, train, val = make_problem("cnn", seed=7)
    single = copy.deepcopy(model).float()
    options = {"params": params, "damping": 0.1, "hessian": "gauss-newton", "solver": "direct"}
    wide = fi.Influence(model, train, val, **options).scores()
    narrow = fi.Influence(single, (train[0].float(), train[1]), (val[0].float(), val[1]),
                          **options)
    assert narrow.ihvp.dtype == torch.float32
    assert relative_error(narrow.scores().double(), wide) < 1e-4
