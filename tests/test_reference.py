"""The textbook reference against closed forms, finite differences and retraining (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence import reference as ref
from fastinfluence.models import PaperCNN

DAMPING = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: intra-op threads only add overhead (a lot of it on a loaded
    machine, where thread pools spin), so run single-threaded and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _softmax_regression(seed: int = 0, n: int = 40, d: int = 3, k: int = 3):
    """A float64 softmax regression (``nn.Linear``) with random data."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=torch.float64))
        model.bias.copy_(0.5 * torch.randn(k, generator=gen, dtype=torch.float64))
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=gen)
    return model, X, y


def _augmented_to_param_order(d: int, k: int) -> torch.Tensor:
    """Indices mapping vec([W | b]) (row-major, k x (d+1)) to the order [vec(W), b]."""
    weight = [c * (d + 1) + j for c in range(k) for j in range(d)]
    bias = [c * (d + 1) + d for c in range(k)]
    return torch.tensor(weight + bias)


def _closed_form_grads(model: nn.Linear, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of softmax-CE: ``(p_i - y_i) ⊗ [x_i, 1]``, as [n, p]."""
    P = torch.softmax(model(X), dim=1).detach()
    residual = P - F.one_hot(y, P.shape[1]).double()
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    G = torch.einsum("nc,nj->ncj", residual, A).reshape(len(X), -1)
    return G[:, _augmented_to_param_order(X.shape[1], P.shape[1])]


def _closed_form_hessian(model: nn.Linear, X: torch.Tensor) -> torch.Tensor:
    """Softmax-CE Hessian of the mean loss: ``Σ_i (diag(p_i) - p_i p_iᵀ) ⊗ a_i a_iᵀ / n``."""
    P = torch.softmax(model(X), dim=1).detach()
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    H = sum(
        torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(a, a))
        for p, a in zip(P, A, strict=True)
    ) / len(X)
    order = _augmented_to_param_order(X.shape[1], P.shape[1])
    return H[order][:, order]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


# ---------------------------------------------------------------- gradients and curvature


def test_per_sample_grads_match_closed_form():
    model, X, y = _softmax_regression()
    G = ref.per_sample_grads(model, _params(model), X, y)
    torch.testing.assert_close(G, _closed_form_grads(model, X, y), rtol=1e-10, atol=1e-12)


def test_vmap_matches_loop_on_softmax_regression():
    model, X, y = _softmax_regression()
    params = _params(model)
    torch.testing.assert_close(
        ref.per_sample_grads_vmap(model, params, X, y, chunk_size=7),
        ref.per_sample_grads(model, params, X, y),
        rtol=1e-10,
        atol=1e-12,
    )


def test_vmap_matches_loop_on_cnn_in_eval_mode():
    torch.manual_seed(0)
    model = PaperCNN(image_size=32, channels=(2, 2, 3, 3, 3)).double()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    X = torch.randn(5, 1, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    params = [model.features[0].weight, model.classifier.weight]
    loop = ref.per_sample_grads(model, params, X, y)
    assert loop.shape == (5, 2 * 25 + 3 * 3)
    torch.testing.assert_close(ref.per_sample_grads_vmap(model, params, X, y), loop)
    assert model.training  # restored


def test_mean_loss_grad_is_mean_of_per_sample_grads():
    model, X, y = _softmax_regression()
    g = ref.mean_loss_grad(model, _params(model), X, y)
    torch.testing.assert_close(g, _closed_form_grads(model, X, y).mean(dim=0))


def test_hessian_and_hvp_match_closed_form():
    model, X, y = _softmax_regression()
    params = _params(model)
    H_true = _closed_form_hessian(model, X)
    H = ref.hessian(model, params, X, y)
    torch.testing.assert_close(H, H_true, rtol=1e-10, atol=1e-12)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref.hvp(model, params, X, y, v), H_true @ v)


def test_custom_loss_fn_least_squares_hessian():
    """Squared error on a linear model: H = 2 [X 1]ᵀ[X 1] / n."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(4, 1).double()
    X = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(30, generator=gen, dtype=torch.float64)

    def squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out.squeeze(1) - target) ** 2

    A = torch.cat([X, torch.ones(30, 1, dtype=torch.float64)], dim=1)
    H = ref.hessian(model, _params(model), X, y, loss_fn=squared_error)
    torch.testing.assert_close(H, 2 * A.T @ A / 30)


def test_ihvp_direct_solves_damped_system():
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    H = M @ M.T
    v = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    x = ref.ihvp_direct(H, v, damping=0.5)
    torch.testing.assert_close((H + 0.5 * torch.eye(6, dtype=torch.float64)) @ x, v)


# ---------------------------------------------------------------- LiSSA


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scale", [2.0, 10.0])
def test_lissa_converges_to_direct_when_deep_and_full_batch(scale):
    """Full batches and enough depth: the damped solve, whatever the scale."""
    model, X, y = _softmax_regression()
    params = _params(model)
    damping = 0.1
    v = ref.mean_loss_grad(model, params, X, y)
    direct = ref.ihvp_direct(ref.hessian(model, params, X, y), v, damping)
    estimate = ref.lissa(
        model, params, X, y, v, damping, scale=scale, depth=int(200 * scale), batch_size=len(X)
    )
    assert _relative_error(estimate, direct) < 1e-6


def test_lissa_textbook_depth_does_not_converge_with_small_damping():
    """Koh & Liang's depth 100 is far from enough when λ_min(H_λ) / scale is small."""
    model, X, y = _softmax_regression()
    params = _params(model)
    v = ref.mean_loss_grad(model, params, X, y)
    direct = ref.ihvp_direct(ref.hessian(model, params, X, y), v, DAMPING)
    shallow = ref.lissa(model, params, X, y, v, DAMPING, scale=10.0, depth=100, batch_size=len(X))
    assert _relative_error(shallow, direct) > 0.3


def test_lissa_minibatch_repeats_average_and_are_seeded():
    model, X, y = _softmax_regression()
    params = _params(model)
    v = ref.mean_loss_grad(model, params, X, y)
    kwargs = dict(damping=0.5, scale=5.0, depth=200, batch_size=10, repeats=4)
    a = ref.lissa(model, params, X, y, v, seed=1, **kwargs)
    torch.testing.assert_close(a, ref.lissa(model, params, X, y, v, seed=1, **kwargs))
    assert not torch.equal(a, ref.lissa(model, params, X, y, v, seed=2, **kwargs))
    direct = ref.ihvp_direct(ref.hessian(model, params, X, y), v, 0.5)
    assert _relative_error(a, direct) < 0.2  # noisy, but an estimate of the same thing


def test_lissa_reports_divergence():
    model, X, y = _softmax_regression()
    params = _params(model)
    v = ref.mean_loss_grad(model, params, X, y)
    with pytest.raises(RuntimeError, match="diverged"):
        ref.lissa(model, params, X, y, v, damping=0.0, scale=1e-3, depth=500, batch_size=40)


# ---------------------------------------------------------------- influence


def _fit(model: nn.Linear, X, y, damping: float, weights: torch.Tensor) -> None:
    """Minimise Σ_i w_i l_i / n + λ/2 ||θ||² to high precision (L-BFGS, float64)."""
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = (weights * F.cross_entropy(model(X), y, reduction="none")).sum() / len(X)
        loss = loss + damping / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)


def test_influence_scores_predict_upweighting_by_retraining():
    """At the optimum of L(D_train) + λ/2||θ||², d L(D_val) / dε for the objective with
    ε·l(z) added equals I(z): sign (positive = harmful) and no 1/n factor."""
    damping = 0.05
    model, X, y = _softmax_regression(seed=4)
    Xv, yv = _softmax_regression(seed=5, n=20)[1:]
    n = len(X)
    _fit(model, X, y, damping, torch.ones(n, dtype=torch.float64))
    theta = [p.detach().clone() for p in model.parameters()]
    scores = ref.influence_scores(model, _params(model), (X, y), (Xv, yv), damping)

    eps = 1e-4
    for i in (0, 7):
        val_losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, t in zip(model.parameters(), theta, strict=True):
                    p.copy_(t)
            weights = torch.ones(n, dtype=torch.float64)
            weights[i] += sign * eps * n  # adds ±ε l(z_i) to the mean objective
            _fit(model, X, y, damping, weights)
            with torch.no_grad():
                val_losses.append(F.cross_entropy(model(Xv), yv).item())
        derivative = (val_losses[0] - val_losses[1]) / (2 * eps)
        assert derivative == pytest.approx(scores[i].item(), rel=1e-3, abs=1e-6)


def test_influence_scores_closed_form_and_solvers_agree():
    model, X, y = _softmax_regression()
    Xv, yv = _softmax_regression(seed=9, n=15)[1:]
    params = _params(model)
    H = _closed_form_hessian(model, X) + 0.2 * torch.eye(12, dtype=torch.float64)
    s = torch.linalg.solve(H, _closed_form_grads(model, Xv, yv).mean(dim=0))
    expected = -_closed_form_grads(model, X, y) @ s
    direct = ref.influence_scores(model, params, (X, y), (Xv, yv), 0.2, per_sample="vmap")
    torch.testing.assert_close(direct, expected)
    lissa = ref.influence_scores(
        model, params, (X, y), (Xv, yv), 0.2, solver="lissa", scale=2.0, depth=300, batch_size=40
    )
    torch.testing.assert_close(lissa, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ref.scores_from_ihvp(model, params, X, y, s), expected)


def test_pairwise_and_self_influence_are_consistent():
    model, X, y = _softmax_regression()
    Xt, yt = _softmax_regression(seed=6, n=8)[1:]
    params = _params(model)
    pairwise = ref.pairwise_influence(model, params, (X, y), (Xt, yt), DAMPING)
    assert pairwise.shape == (40, 8)
    group = ref.influence_scores(model, params, (X, y), (Xt, yt), DAMPING)
    torch.testing.assert_close(pairwise.mean(dim=1), group)

    own = ref.pairwise_influence(model, params, (X, y), (X[:5], y[:5]), DAMPING)
    self_inf = ref.self_influence(model, params, (X, y), DAMPING, data=(X[:5], y[:5]))
    torch.testing.assert_close(self_inf, -torch.diagonal(own[:5]))
    assert (self_inf > 0).all()
    torch.testing.assert_close(ref.self_influence(model, params, (X, y), DAMPING)[:5], self_inf)


def test_pairwise_lissa_matches_direct():
    model, X, y = _softmax_regression()
    params = _params(model)
    test = (X[:3], y[:3])
    direct = ref.pairwise_influence(model, params, (X, y), test, 0.3)
    lissa = ref.pairwise_influence(
        model, params, (X, y), test, 0.3, solver="lissa", scale=2.0, depth=300, batch_size=40
    )
    torch.testing.assert_close(lissa, direct, rtol=1e-6, atol=1e-8)


def test_perturbation_influence_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    params = _params(model)
    s = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    pert = ref.perturbation_influence(model, params, X, y, s)
    assert pert.shape == X.shape

    def score(x: torch.Tensor, i: int) -> float:  # -sᵀ∇θ l(x, y_i)
        return -(ref.per_sample_grads(model, params, x[None], y[i : i + 1])[0] @ s).item()

    h = 1e-6
    for i in range(len(X)):
        for j in range(X.shape[1]):
            step = torch.zeros_like(X[i])
            step[j] = h
            fd = (score(X[i] + step, i) - score(X[i] - step, i)) / (2 * h)
            assert pert[i, j].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- state and input checks


def test_model_comes_back_unchanged():
    model, X, y = _softmax_regression()
    model.train()
    model.bias.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    scores = ref.influence_scores(model, _params(model), (X, y), (X, y), DAMPING)
    assert torch.isfinite(scores).all()
    assert model.training
    assert model.weight.requires_grad and not model.bias.requires_grad
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_eval_mode_is_used():
    """Dropout must be off: repeated per-sample gradients are identical."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    params = _params(model)
    torch.testing.assert_close(
        ref.per_sample_grads(model, params, X, y), ref.per_sample_grads(model, params, X, y)
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, X, y: ref.mean_loss_grad(m, _params(m), X, y[:-1]), "samples"),
        (lambda m, X, y: ref.mean_loss_grad(m, _params(m), X[:0], y[:0]), "empty"),
        (lambda m, X, y: ref.mean_loss_grad(m, _params(m), X * float("nan"), y), "NaN"),
        (lambda m, X, y: ref.mean_loss_grad(m, [], X, y), "empty"),
        (lambda m, X, y: ref.mean_loss_grad(m, [nn.Parameter(torch.ones(2))], X, y), "not a"),
        (lambda m, X, y: ref.mean_loss_grad(m, [m.bias, m.bias], X, y), "twice"),
        (lambda m, X, y: ref.mean_loss_grad(nn.ReLU(), [], X, y), "no parameters"),
        (
            lambda m, X, y: ref.mean_loss_grad(
                m, _params(m), X, y, loss_fn=lambda out, t: F.cross_entropy(out, t)
            ),
            "per-sample",
        ),
        (lambda m, X, y: ref.influence_scores(m, _params(m), (X, y), (X, y), -1.0), "damping"),
        (
            lambda m, X, y: ref.influence_scores(m, _params(m), (X, y), (X, y), 0.1, solver="x"),
            "unknown solver",
        ),
        (
            lambda m, X, y: ref.influence_scores(
                m, _params(m), (X, y), (X, y), 0.1, per_sample="x"
            ),
            "unknown per_sample",
        ),
        (lambda m, X, y: ref.influence_scores(m, _params(m), X, (X, y), 0.1), "tuple"),
        (lambda m, X, y: ref.hvp(m, _params(m), X, y, torch.ones(3)), "shape"),
        (
            lambda m, X, y: ref.lissa(m, _params(m), X, y, torch.ones(12), 0.1, scale=0.0),
            "scale",
        ),
        (
            lambda m, X, y: ref.lissa(m, _params(m), X, y, torch.ones(12), 0.1, depth=0),
            "depth",
        ),
        (lambda m, X, y: ref.ihvp_direct(torch.ones(3, 2), torch.ones(3), 0.1), "square"),
        (
            lambda m, X, y: ref.perturbation_influence(m, _params(m), X.long(), y, torch.ones(12)),
            "floating",
        ),
    ],
)
def test_bad_input_raises_value_error(call, message):
    model, X, y = _softmax_regression()
    with pytest.raises(ValueError, match=message):
        call(model, X, y)
