"""Image noise of the ISR/ISP paper, applied on the 0-255 intensity scale.

Images come in and go out in [0, 1]; the noise is defined on ``255 * x``. Every kind draws
fresh noise for every pixel of every image from one seeded generator, then clips the result
to [0, 255] and divides by 255 (values stay float: nothing is rounded to 8 bits).

Kinds (``n1, n2 ~ N(0, sigma^2)`` independent, ``v = 255 * x``):

* ``"gaussian"``: ``v + n1``; paper: ``sigma = 32`` (``mu = 0``).
* ``"rician"``: the magnitude model of MR physics, ``sqrt((v + n1)^2 + n2^2)``: each pixel is
  Rice-distributed with noncentrality ``v`` (the clean intensity) and scale ``sigma``; paper
  scale ``sigma = 16``. The paper's ``nu = 1`` plays no part here, the signal is the
  noncentrality. Dark background becomes Rayleigh noise with mean ``sigma * sqrt(pi / 2)``.
* ``"rician-additive"``: the literal reading of "Rician noise with nu = 1, sigma = 16" that
  the authors' code implements: ``v + sigma * R`` with ``R ~ Rice(b = nu)`` of unit scale
  (``scipy.stats.rice(b=nu, scale=sigma)``), i.e. noncentrality ``nu * sigma`` on the 0-255
  scale. It is always positive, with mean ``sigma * sqrt(pi/2) * L_1/2(-nu^2/2)`` (about 24.8
  for the paper's values): it brightens the image as well as adding spread.

Both Rician kinds have non-zero mean noise, as docs/design.md §5 records; :func:`rice_moments`
gives the closed-form mean and variance.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy import special

NoiseKind = Literal["gaussian", "rician", "rician-additive"]
NOISE_KINDS: tuple[str, ...] = ("gaussian", "rician", "rician-additive")
PAPER_SIGMA: dict[str, float] = {"gaussian": 32.0, "rician": 16.0, "rician-additive": 16.0}
PAPER_NU = 1.0

Seed = int | torch.Generator | None


def add_noise(
    images: torch.Tensor,
    kind: NoiseKind = "gaussian",
    *,
    sigma: float | None = None,
    nu: float = PAPER_NU,
    seed: Seed = 0,
) -> torch.Tensor:
    """Return noisy copies of ``images`` (float, values in [0, 1], first dim = images).

    Args:
        images: clean images in [0, 1]; any shape ``[N, ...]``.
        kind: ``"gaussian"``, ``"rician"`` (magnitude model) or ``"rician-additive"``
            (see the module docstring for the exact definitions).
        sigma: noise scale on the 0-255 scale; default the paper's (32 Gaussian, 16 Rician).
        nu: shape ``b`` of the unit-scale Rice draw of ``"rician-additive"`` (paper: 1);
            unused by the other kinds.
        seed: an int, a CPU ``torch.Generator`` (advanced in place), or None for torch's
            global generator. Noise is drawn on the CPU, so results do not depend on the
            device of ``images``.

    Returns:
        A new tensor like ``images``: noisy, clipped to [0, 255] on the 0-255 scale, in [0, 1].
    """
    _check_images(images)
    sigma = _check_noise(kind, sigma, nu)
    generator = _generator(seed)
    values = images.to(torch.float64) * 255.0
    first = torch.randn(values.shape, generator=generator, dtype=torch.float64)
    first = first.to(values.device)
    if kind == "gaussian":
        noisy = values + sigma * first
    else:
        second = torch.randn(values.shape, generator=generator, dtype=torch.float64)
        second = second.to(values.device)
        if kind == "rician":
            noisy = torch.sqrt((values + sigma * first) ** 2 + (sigma * second) ** 2)
        else:
            noisy = values + sigma * torch.sqrt((nu + first) ** 2 + second**2)
    return (noisy.clamp(0.0, 255.0) / 255.0).to(images.dtype)


def add_noise_to_fraction(
    images: torch.Tensor,
    fraction: float,
    kind: NoiseKind = "gaussian",
    *,
    sigma: float | None = None,
    nu: float = PAPER_NU,
    seed: Seed = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add noise to a random ``fraction`` of the images (the paper's ``rho_test``).

    ``round(fraction * N)`` images, chosen uniformly without replacement, get
    :func:`add_noise`; the rest are returned unchanged.

    Returns:
        ``(images, noisy)``: the partly noisy copy and a bool mask ``[N]`` of the noisy ones.
    """
    if not (isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    _check_images(images)
    _check_noise(kind, sigma, nu)
    generator = _generator(seed)
    n = images.shape[0]
    chosen = torch.randperm(n, generator=generator)[: int(np.floor(fraction * n + 0.5))]
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[chosen] = True
    out = images.clone()
    if chosen.numel():
        index = chosen.to(images.device)
        out[index] = add_noise(images[index], kind, sigma=sigma, nu=nu, seed=generator)
    return out, noisy.to(images.device)


def rice_moments(nu: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of ``Rice(nu, sigma)`` (noncentrality ``nu``, scale ``sigma``):

    ``mean = sigma * sqrt(pi/2) * L(-nu^2 / (2 sigma^2))`` and
    ``var = 2 sigma^2 + nu^2 - (pi sigma^2 / 2) * L(-nu^2 / (2 sigma^2))^2``, with the
    Laguerre polynomial ``L(x) = L_1/2(x) = exp(x/2) [(1 - x) I0(-x/2) - x I1(-x/2)]``
    (evaluated with exponentially scaled Bessel functions, stable for large ``nu/sigma``).
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not (np.isfinite(nu) and nu >= 0):
        raise ValueError(f"nu must be >= 0, got {nu}")
    x = -(nu**2) / (2.0 * sigma**2)
    laguerre = (1.0 - x) * special.ive(0, -x / 2.0) - x * special.ive(1, -x / 2.0)
    mean = sigma * np.sqrt(np.pi / 2.0) * laguerre
    var = 2.0 * sigma**2 + nu**2 - np.pi * sigma**2 / 2.0 * laguerre**2
    return float(mean), float(var)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError("images must be a floating-point torch.Tensor with values in [0, 1]")
    if images.ndim < 1 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, ...], got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"images must lie in [0, 1] (got [{images.min().item():.3g}, "
            f"{images.max().item():.3g}]); the noise is defined on 255 * images"
        )


def _check_noise(kind: str, sigma: float | None, nu: float) -> float:
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    sigma = PAPER_SIGMA[kind] if sigma is None else sigma
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not (np.isfinite(nu) and nu >= 0):
        raise ValueError(f"nu must be >= 0, got {nu}")
    return float(sigma)


def _generator(seed: Seed) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator
