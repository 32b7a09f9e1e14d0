"""``FunctionalModel``: logits and losses against the module itself; loss tangents and loss
Hessian-vector products against plain autograd (double backward) on random float64 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem

from fastinfluence.functional import FunctionalModel
from fastinfluence.modes import eval_mode
from fastinfluence.params import select_parameters


def squared_error_on_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom loss that is not cross-entropy (and not quadratic in the logits)."""
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return ((torch.softmax(logits, dim=1) - onehot) ** 2).sum(dim=1) + logits.pow(4).mean(dim=1)


LOSSES = {"cross-entropy": None, "custom": squared_error_on_softmax}


def functional_model(loss_fn=None, kind: str = "cnn", params="all"):
    model, train, val = make_problem(kind, seed=5)
    selection = select_parameters(model, params)
    return model, FunctionalModel(model, selection, loss_fn, torch.device("cpu")), train


@pytest.mark.parametrize("kind", ["logistic", "mlp", "cnn"])
@pytest.mark.parametrize("params", ["last", "all"])
def test_logits_and_losses_are_the_modules_own(kind, params):
    model, fmodel, (x, y) = functional_model(kind=kind, params=params)
    with eval_mode(model), torch.no_grad():
        expected_logits = model(x)
        logits = fmodel.logits(fmodel.theta, x)
        losses = fmodel.losses(fmodel.theta, x, y)
    assert torch.allclose(logits, expected_logits, rtol=1e-12, atol=1e-12)
    expected_losses = F.cross_entropy(expected_logits, y, reduction="none")
    assert torch.allclose(losses, expected_losses, rtol=1e-12, atol=1e-12)


def test_logits_follow_theta_not_the_modules_weights():
    model, fmodel, (x, _) = functional_model(kind="mlp", params="last")
    shifted = fmodel.theta + 0.5
    with torch.no_grad():
        expected = model[:2](x) @ (model[2].weight + 0.5).T + (model[2].bias + 0.5)
        assert torch.allclose(fmodel.logits(shifted, x), expected, rtol=1e-12, atol=1e-12)


def test_a_loss_without_one_value_per_sample_is_an_error():
    _, fmodel, (x, y) = functional_model(loss_fn=lambda z, t: F.cross_entropy(z, t), kind="mlp")
    with pytest.raises(ValueError, match="one loss per sample"):
        fmodel.losses(fmodel.theta, x, y)


def random_logits(batch: int = 6, classes: int = 4, tangents: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    directions = torch.randn(tangents, batch, classes, generator=generator, dtype=torch.float64)
    return logits, labels, directions


def autograd_gradient_and_hvp(loss, logits, labels, direction):
    """``∂l_i/∂z_i`` and ``∂²l_i/∂z_i² u_i`` by double backward: samples are independent, so
    the gradient of ``Σ_i l_i`` holds each sample's own gradient row by row."""
    z = logits.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss(z, labels).sum(), z, create_graph=True)
    (hvp,) = torch.autograd.grad((gradient * direction).sum(), z)
    return gradient.detach(), hvp


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_tangents_and_hessian_products_match_double_backward(loss_name, seed):
    loss_fn = LOSSES[loss_name]
    _, fmodel, _ = functional_model(loss_fn=loss_fn, kind="logistic")
    loss = F.cross_entropy if loss_fn is None else loss_fn
    logits, labels, directions = random_logits(seed=seed)

    def per_sample(z, t):
        return loss(z, t, reduction="none") if loss_fn is None else loss(z, t)

    tangents = fmodel.loss_tangents(logits, labels, directions)
    products = fmodel.loss_hessian_vp(logits, labels, directions)
    assert tangents.shape == (3, 6) and products.shape == directions.shape
    for index, direction in enumerate(directions):
        gradient, hvp = autograd_gradient_and_hvp(per_sample, logits, labels, direction)
        assert torch.allclose(tangents[index], (gradient * direction).sum(dim=1), rtol=1e-12,
                              atol=1e-12)
        assert torch.allclose(products[index], hvp, rtol=1e-12, atol=1e-12)


def test_loss_tangents_do_not_write_their_inputs():
    _, fmodel, _ = functional_model(kind="logistic")
    logits, labels, directions = random_logits()
    copies = [t.clone() for t in (logits, labels, directions)]
    fmodel.loss_tangents(logits, labels, directions)
    fmodel.loss_hessian_vp(logits, labels, directions)
    assert all(torch.equal(a, b) for a, b in zip(copies, (logits, labels, directions),
                                                strict=True))


def squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((logits - F.one_hot(targets, logits.shape[1]).to(logits.dtype)) ** 2).sum(dim=1)


def concave(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(logits ** 2).sum(dim=1) + logits[:, 0] ** 2


@pytest.mark.parametrize(("loss_fn", "convex"), [(None, True), (squared_error, True),
                                                 (concave, False)],
                         ids=["cross-entropy", "squared", "non-convex"])
def test_loss_hessian_roots_square_to_the_hessians_psd_part(loss_fn, convex):
    _, fmodel, _ = functional_model(loss_fn=loss_fn, kind="logistic")
    logits, labels, _ = random_logits(seed=3)
    loss = (lambda z, t: F.cross_entropy(z, t, reduction="none")) if loss_fn is None else loss_fn
    roots, is_convex = fmodel.loss_hessian_roots(logits, labels)
    assert roots.shape == (4, 6, 4) and is_convex == convex
    for i in range(len(labels)):
        label = labels[i:i + 1]
        hessian = torch.func.hessian(lambda z, t=label: loss(z[None], t)[0])(logits[i])
        values, vectors = torch.linalg.eigh(hessian)
        psd_part = vectors @ torch.diag(values.clamp_min(0)) @ vectors.T
        assert torch.allclose(roots[:, i].T @ roots[:, i], psd_part, rtol=1e-10, atol=1e-12)
