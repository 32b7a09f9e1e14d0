"""Image noise: statistics against theory, clipping, seeding, rho_test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fastinfluence.datasets import add_noise, add_noise_to_fraction, rice_moments

N = 400_000  # pixels per statistic: sample variance is within ~0.5% (1 sd)


def constant(value_255: float, n: int = N) -> torch.Tensor:
    return torch.full((n // 1000, 1, 25, 40), value_255 / 255.0, dtype=torch.float64)


def test_gaussian_mean_and_variance():
    noise = add_noise(constant(128), "gaussian", seed=0) * 255 - 128
    assert abs(noise.mean().item()) < 0.3  # sd of the mean: 32 / sqrt(N) = 0.05
    assert noise.var().item() == pytest.approx(32.0**2, rel=0.02)


@pytest.mark.parametrize("signal", [0.0, 20.0, 100.0])
def test_rician_magnitude_matches_rice(signal):
    noisy = add_noise(constant(signal), "rician", seed=1) * 255
    sigma = 16.0
    expected = stats.rice(b=signal / sigma, scale=sigma)
    mean, var = rice_moments(signal, sigma)
    assert mean == pytest.approx(expected.mean(), rel=1e-9)
    assert var == pytest.approx(expected.var(), rel=1e-9)
    assert noisy.mean().item() == pytest.approx(mean, rel=0.01)
    assert noisy.var().item() == pytest.approx(var, rel=0.02)
    # distribution, not just moments
    sample = noisy.flatten()[:20_000].numpy()
    assert stats.kstest(sample, expected.cdf).pvalue > 1e-3


def test_rician_additive_is_sigma_times_unit_rice():
    noise = add_noise(constant(40), "rician-additive", seed=2) * 255 - 40
    reference = stats.rice(b=1.0, scale=16.0)  # the authors' 16 * rice.rvs(b=1)
    mean, var = rice_moments(16.0, 16.0)
    assert mean == pytest.approx(reference.mean(), rel=1e-9)
    assert noise.min().item() > 0
    assert noise.mean().item() == pytest.approx(mean, rel=0.01)
    assert noise.var().item() == pytest.approx(var, rel=0.02)


@pytest.mark.parametrize(("nu", "sigma"), [(0.0, 1.0), (1.0, 16.0), (3.0, 2.0), (1e4, 1.0)])
def test_rice_moments_closed_form(nu, sigma):
    mean, var = rice_moments(nu, sigma)
    reference = stats.rice(b=nu / sigma, scale=sigma)
    if nu / sigma < 100:
        assert mean == pytest.approx(reference.mean(), rel=1e-8)
        assert var == pytest.approx(reference.var(), rel=1e-6)
    else:  # far from the origin Rice tends to N(sqrt(nu^2 + sigma^2), sigma^2)
        assert mean == pytest.approx(np.hypot(nu, sigma), rel=1e-6)
        assert var == pytest.approx(sigma**2, rel=1e-3)


def test_clipped_to_the_intensity_range():
    dark = add_noise(constant(0.0), "gaussian", seed=3)
    bright = add_noise(constant(255.0), "gaussian", seed=3)
    assert dark.min() >= 0 and bright.max() <= 1
    assert (dark == 0).double().mean().item() == pytest.approx(0.5, abs=0.01)
    # E[max(0, n)] = sigma / sqrt(2 pi) for n ~ N(0, sigma^2)
    assert dark.mean().item() * 255 == pytest.approx(32 / np.sqrt(2 * np.pi), rel=0.02)


def test_fresh_noise_per_image_and_seeded():
    images = torch.full((4, 1, 8, 8), 0.5)
    a = add_noise(images, "gaussian", seed=7)
    assert a.dtype == images.dtype and a.shape == images.shape
    assert not torch.equal(a[0], a[1])
    assert torch.equal(a, add_noise(images, "gaussian", seed=7))
    assert not torch.equal(a, add_noise(images, "gaussian", seed=8))
    assert torch.equal(images, torch.full((4, 1, 8, 8), 0.5))  # input untouched


def test_custom_sigma():
    noise = add_noise(constant(128), "gaussian", sigma=8.0, seed=0) * 255 - 128
    assert noise.std().item() == pytest.approx(8.0, rel=0.02)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_fraction_of_noisy_images(fraction):
    images = torch.rand(10, 1, 6, 6)
    out, noisy = add_noise_to_fraction(images, fraction, "rician", seed=0)
    assert noisy.dtype == torch.bool and int(noisy.sum()) == round(10 * fraction)
    changed = (out != images).flatten(1).any(1)
    assert torch.equal(changed, noisy)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x: add_noise(x, "speckle"), "kind"),
        (lambda x: add_noise(x, sigma=0.0), "sigma"),
        (lambda x: add_noise(x, "rician-additive", nu=-1.0), "nu"),
        (lambda x: add_noise(x * 2), r"\[0, 1\]"),
        (lambda x: add_noise((x * 255).to(torch.uint8)), "floating-point"),
        (lambda x: add_noise(x, seed="a"), "seed"),
        (lambda x: add_noise_to_fraction(x, 1.5), "fraction"),
        (lambda x: rice_moments(1.0, -1.0), "sigma"),
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call(torch.rand(2, 1, 4, 4) * 0.9 + 0.05)
