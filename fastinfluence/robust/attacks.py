"""Adversarial attacks for the denoising paper's evaluation: FGSM, I-FGSM and Carlini-Wagner L2.

FGSM (Goodfellow et al. 2015) and I-FGSM (Kurakin et al. 2016) are our own batched
implementations (``tests/robust/test_attacks.py`` checks them against a per-image float64
twin and against the adversarial-robustness-toolbox); Carlini-Wagner L2 with its binary
search over the constant is the toolbox's (``art.attacks.evasion.CarliniL2Method``), an
optional dependency (the ``dev`` extra). Every attack runs the model in eval mode, leaves its
``training`` flag and parameters' gradients as they were, and returns images in ``[0, 1]``.
Black-box use, as the paper: craft on one model (the source), evaluate another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPSILONS: tuple[float, ...] = (4 / 255, 8 / 255)
"""The paper's L∞ radii ε ∈ {4, 8}/255 for FGSM and I-FGSM."""


@contextmanager
def _attacking(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def _check(images: torch.Tensor, labels: torch.Tensor, epsilon: float) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [n, C, H, W], got {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [n] = [{len(images)}], got {tuple(labels.shape)}")
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")


def _input_gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    # the sum, not the mean: the sign per image is the same and no gradient underflows
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, x)
    return gradient.sign()


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float,
         batch_size: int = 256) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + ε·sign ∇_x CE(f(x), y), 0, 1)``, untargeted.

    Args:
        model: the classifier attacked (eval mode while attacking).
        images: ``[n, C, H, W]`` in ``[0, 1]``.
        labels: true labels ``[n]``.
        epsilon: the L∞ radius ``ε``.
        batch_size: images per gradient pass.
    """
    _check(images, labels, epsilon)
    device = next(model.parameters()).device
    out = []
    with _attacking(model):
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            x, y = x.to(device), y.to(device)
            out.append((x + epsilon * _input_gradient_sign(model, x, y)).clamp(0, 1).cpu())
    return torch.cat(out)


def ifgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float,
          iterations: int = 10, step: float | None = None, batch_size: int = 256) -> torch.Tensor:
    """Iterative FGSM (Kurakin et al.'s basic iterative method), untargeted.

    ``x_0 = x``; ``x_{t+1} = clip_{x,ε}(x_t + α·sign ∇ CE(f(x_t), y))`` where ``clip_{x,ε}``
    projects onto the L∞ ball of radius ``ε`` around ``x`` and onto ``[0, 1]``.

    Args:
        model, images, labels, epsilon, batch_size: as :func:`fgsm`.
        iterations: number of steps (the paper's IFGSM10: 10).
        step: ``α`` (default ``ε / iterations``, so the last step can reach the ball's edge).
    """
    _check(images, labels, epsilon)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    step = epsilon / iterations if step is None else step
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be a finite number > 0, got {step!r}")
    device = next(model.parameters()).device
    out = []
    with _attacking(model):
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            x, y = x.to(device), y.to(device)
            low, high = (x - epsilon).clamp(min=0), (x + epsilon).clamp(max=1)
            adversarial = x.clone()
            for _ in range(iterations):
                moved = adversarial + step * _input_gradient_sign(model, adversarial, y)
                adversarial = torch.maximum(torch.minimum(moved, high), low)
            out.append(adversarial.cpu())
    return torch.cat(out)


def carlini_wagner_l2(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                      num_classes: int, binary_search_steps: int = 5, max_iter: int = 1000,
                      initial_const: float = 1.0, learning_rate: float = 0.01,
                      confidence: float = 0.0, batch_size: int = 64,
                      verbose: bool = False) -> torch.Tensor:
    """Carlini-Wagner L2 (untargeted) by the adversarial-robustness-toolbox.

    ``art.attacks.evasion.CarliniL2Method`` on ``art.estimators.classification.
    PyTorchClassifier(model, clip_values=(0, 1))``: per image a binary search of
    ``binary_search_steps`` over the constant ``c`` (from ``initial_const``), each step
    ``max_iter`` iterations on ``‖δ‖² + c·max(Z_y − max_{k≠y} Z_k, −κ)``; images the attack
    fails on come back unchanged (the toolbox's behaviour). The paper: 5 searches, 1,000
    iterations; its confidence ``κ`` and learning rate are not given (here ART's defaults,
    0 and 0.01). ``initial_const=1.0``: ART's default 0.01 changed no prediction at 50
    iterations when we tried it.

    Raises ``ImportError`` naming the ``dev`` extra when the toolbox is not installed.
    """
    try:
        from art.attacks.evasion import CarliniL2Method
        from art.estimators.classification import PyTorchClassifier
    except ImportError as error:  # an optional dependency: say which one
        raise ImportError("carlini_wagner_l2 needs adversarial-robustness-toolbox (pip install "
                          "'fastinfluence[dev]', or adversarial-robustness-toolbox six)") from error
    _check(images, labels, 1.0)
    device = next(model.parameters()).device
    with _attacking(model):
        classifier = PyTorchClassifier(
            model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
            nb_classes=num_classes, clip_values=(0.0, 1.0),
            device_type="gpu" if device.type == "cuda" else "cpu",
        )
        attack = CarliniL2Method(
            classifier, confidence=confidence, targeted=False, learning_rate=learning_rate,
            binary_search_steps=binary_search_steps, max_iter=max_iter,
            initial_const=initial_const, batch_size=batch_size, verbose=verbose,
        )
        x = images.detach().cpu().numpy().astype(np.float32)
        y = np.eye(num_classes, dtype=np.float32)[labels.cpu().numpy()]
        adversarial = attack.generate(x, y=y)
    return torch.from_numpy(np.clip(adversarial, 0.0, 1.0)).to(images.dtype)
