"""FGSM, I-FGSM and Carlini-Wagner L2 (fastinfluence.robust.attacks) against hand-written twins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastinfluence.robust.attacks import EPSILONS, carlini_wagner_l2, fgsm, ifgsm


def small_classifier(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).to(dtype)


def images(n: int = 12, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 8, 8, generator=generator, dtype=dtype)
    x[:2] = 0.0  # on the bounds: the result must be clipped back into [0, 1]
    x[2:4] = 1.0
    return x, torch.arange(n) % 3


def input_gradient_one_image(model: nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    """∇_x CE(f(x), y) of one image, by autograd on that image alone."""
    x = x[None].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([y]))
    loss.backward()
    return x.grad[0]


def fgsm_twin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Per image and per pixel: x + ε·sign(g), then clipped to [0, 1] by min/max."""
    model.eval()
    out = x.clone()
    for i in range(len(x)):
        gradient = input_gradient_one_image(model, x[i], int(y[i]))
        flat_x, flat_g, flat_out = x[i].flatten(), gradient.flatten(), out[i].view(-1)
        for k in range(len(flat_x)):
            sign = 1.0 if flat_g[k] > 0 else (-1.0 if flat_g[k] < 0 else 0.0)
            flat_out[k] = min(1.0, max(0.0, float(flat_x[k]) + eps * sign))
    return out


def ifgsm_twin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               iterations: int) -> torch.Tensor:
    """Per image: ``iterations`` steps of ε/iterations, each projected onto the ε-ball, then
    onto [0, 1]."""
    model.eval()
    out = x.clone()
    for i in range(len(x)):
        current = x[i].clone()
        for _ in range(iterations):
            gradient = input_gradient_one_image(model, current, int(y[i]))
            current = current + eps / iterations * gradient.sign()
            current = torch.minimum(torch.maximum(current, x[i] - eps), x[i] + eps).clamp(0, 1)
        out[i] = current
    return out


@pytest.mark.parametrize("eps", EPSILONS)
def test_fgsm_matches_its_twin_within_epsilon_and_range(eps):
    model, (x, y) = small_classifier(), images()
    adversarial = fgsm(model, x, y, eps, batch_size=5)
    torch.testing.assert_close(adversarial, fgsm_twin(model, x, y, eps), rtol=0, atol=1e-12)
    assert (adversarial - x).abs().max() <= eps + 1e-12
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert ((adversarial - x).abs() > eps / 2).double().mean() > 0.7  # it did move


@pytest.mark.parametrize("eps", EPSILONS)
def test_ifgsm_matches_its_twin_within_epsilon_and_range(eps):
    model, (x, y) = small_classifier(), images()
    adversarial = ifgsm(model, x, y, eps, iterations=10, batch_size=5)
    torch.testing.assert_close(adversarial, ifgsm_twin(model, x, y, eps, 10), rtol=0,
                               atol=1e-12)
    assert (adversarial - x).abs().max() <= eps + 1e-12
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_attacks_raise_the_loss_and_restore_the_model_state():
    model, (x, y) = small_classifier(), images(30)
    model.train()
    model[-1].weight.requires_grad_(False)
    loss = nn.functional.cross_entropy

    def loss_of(images):
        model.eval()
        with torch.no_grad():
            return float(loss(model(images), y))

    clean = loss_of(x)
    model.train()
    for attack in (fgsm, ifgsm):
        adversarial = attack(model, x, y, 8 / 255)
        assert model.training
        assert model[-1].weight.requires_grad is False and model[0].weight.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert loss_of(adversarial) > clean
        model.train()
    assert loss_of(ifgsm(model, x, y, 8 / 255)) > loss_of(fgsm(model, x, y, 8 / 255))


def test_ours_equal_the_adversarial_robustness_toolbox():
    art = pytest.importorskip("art.attacks.evasion")
    from art.estimators.classification import PyTorchClassifier

    model, (x, y) = small_classifier(torch.float32), images(10, torch.float32)
    model.eval()
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 8, 8),
                                   nb_classes=3, clip_values=(0.0, 1.0))
    for eps in EPSILONS:
        theirs = art.FastGradientMethod(classifier, norm=np.inf, eps=eps).generate(
            x.numpy(), y=np.eye(3, dtype=np.float32)[y.numpy()])
        torch.testing.assert_close(fgsm(model, x, y, eps), torch.from_numpy(theirs),
                                   rtol=0, atol=1e-6)
    eps = EPSILONS[-1]
    iterative = art.BasicIterativeMethod(classifier, eps=eps, eps_step=eps / 10, max_iter=10)
    theirs = iterative.generate(x.numpy(), y=np.eye(3, dtype=np.float32)[y.numpy()])
    torch.testing.assert_close(ifgsm(model, x, y, eps), torch.from_numpy(theirs), rtol=0,
                               atol=1e-5)


def test_carlini_wagner_flips_predictions_with_small_l2_in_range():
    pytest.importorskip("art")
    model, (x, _) = small_classifier(torch.float32), images(10, torch.float32)
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(1)  # attack the model's own predictions
    adversarial = carlini_wagner_l2(model, x, predicted, num_classes=3, binary_search_steps=3,
                                    max_iter=20)
    assert adversarial.shape == x.shape and adversarial.dtype == x.dtype
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        changed = model(adversarial).argmax(1) != predicted
    assert changed.double().mean() >= 0.5
    distance = (adversarial - x).flatten(1).norm(dim=1)
    # a minimal-distance attack: far below the image's own norm
    assert (distance[changed] < 0.5 * x[changed].flatten(1).norm(dim=1)).all()


def test_invalid_arguments_are_refused():
    model, (x, y) = small_classifier(), images()
    with pytest.raises(ValueError, match="epsilon"):
        fgsm(model, x, y, 0.0)
    with pytest.raises(ValueError, match="labels"):
        fgsm(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="iterations"):
        ifgsm(model, x, y, 0.1, iterations=0)
