"""Tiny synthetic image problems for the robust trainers' tests."""

from __future__ import annotations

import pytest
import torch

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
