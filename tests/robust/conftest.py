"""Tiny synthetic image problems for the robust trainers' tests, and their textbook influence."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from fastinfluence import reference
from fastinfluence.models import PaperCNN


def make_split(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1] whose class (0, 1, 2) sets which third of the image is bright."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, size, size, generator=generator)
    third = size // 3
    for i, label in enumerate(y.tolist()):
        x[i, :, label * third:(label + 1) * third] += 0.5
    return x.clamp(0, 1), y


@pytest.fixture
def splits():
    return make_split(16, 0), make_split(6, 1), make_split(6, 2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PaperCNN(32)


def textbook_head_influence(model, train, val, damping):
    """Influence over the final Linear layer of a float64 copy of ``model`` (a
    :class:`PaperCNN`), by :mod:`fastinfluence.reference` alone: ``s = H_λ^{-1}∇L(val)``
    (explicit Hessian) and the scores ``I(z_i) = −sᵀ∇l(z_i)`` of ``train``."""
    model = copy.deepcopy(model).double()
    head = [model.classifier.weight, model.classifier.bias]
    (x, y), (x_val, y_val) = (train[0].double(), train[1]), (val[0].double(), val[1])
    g_val = reference.mean_loss_grad(model, head, x_val, y_val)
    s = reference.ihvp(model, head, x, y, g_val, damping)
    scores = reference.scores_from_ihvp(model, head, x, y, s)
    return SimpleNamespace(model=model, head=head, s=s, scores=scores)


@pytest.fixture
def head_influence():
    return textbook_head_influence
