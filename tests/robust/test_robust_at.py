"""FGSM with uniform initialisation and the adversarial trainer."""

from __future__ import annotations

import torch
from torch import nn

from fastinfluence.robust import ATConfig, ATTrainer, fgsm_uniform


def test_perturbation_within_epsilon_and_valid_range(model, splits):
    x, y = splits[0]
    x = x.clone()
    x[:4] = 0.0  # on the lower bound: the uniform start must be clipped back into [0, 1]
    x[4:8] = 1.0
    for seed in range(3):
        adversarial = fgsm_uniform(model, x, y, 0.1, 0.03, torch.Generator().manual_seed(seed))
        assert (adversarial - x).abs().max() <= 0.1 + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1
        assert (adversarial != x).float().mean() > 0.5


def test_step_follows_the_loss_gradient_sign():
    # Two-class linear model: the sign of ∇_x CE does not depend on δ, so with α = 2ε the
    # result is exactly x + ε·sign(∇_x l), whatever the uniform start.
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.full((5, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1, 0, 1, 1])
    x_grad = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(linear(x_grad), y)
    (gradient,) = torch.autograd.grad(loss, x_grad)
    adversarial = fgsm_uniform(linear, x, y, 0.1, 0.2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(adversarial, x + 0.1 * gradient.sign())


def test_trainer_trains_on_adversarial_images_only(model, splits):
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone())
                                    if module.training else None)
    config = ATConfig(epochs=2, lr=1e-3, batch_size=16, flip=False)
    result = ATTrainer(model, config).fit(*splits)
    assert len(result.history) == 2
    x = splits[0][0]
    # Per batch: one forward for the attack, one for the update; every image in both is
    # perturbed (L∞ distance to its nearest clean image in (0, ε]).
    assert len(seen) == 4
    for batch in seen:
        distance = (batch[:, None] - x[None]).abs().flatten(2).amax(2).min(1).values
        assert distance.max() <= 0.1 + 1e-6 and distance.min() > 0
