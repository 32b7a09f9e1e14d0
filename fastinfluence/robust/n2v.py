"""N2V-Training: a Noise2Void denoiser (Krull et al. 2019), then a classifier on its output.

Noise2Void learns to denoise from the noisy images alone. A U-Net predicts every pixel from
its surroundings; during training a few pixels per patch (``~0.2 %``) are *blind spots*:
their input value is replaced by a pixel drawn uniformly from the ``(2ρ+1)²`` neighbourhood
without the centre (``ρ = 5``: 11×11), and the loss is the mean squared error between the
prediction and the original noisy value on those pixels only,

    ``L = Σ_i Σ_{p∈M_i} (f(x̃_i)_p − x_{i,p})² / Σ_i |M_i|``.

Since a pixel never sees its own value, the network cannot learn the identity; with noise
independent between pixels and zero-mean given the signal, the minimiser is the expected
clean value (non-zero-mean noise such as Rician keeps its bias, as the paper observed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastinfluence.robust.config import TrainConfig, _check_int, _check_positive
from fastinfluence.robust.loop import (
    Split,
    TestSets,
    Trainer,
    TrainResult,
    check_split,
    check_test_sets,
)


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """The Noise2Void U-Net: ``depth`` levels of two ``3×3 conv + BN + ReLU`` with 2×2
    max-pooling, channels ``channels·2^d`` at level ``d``, nearest up-sampling with skip
    concatenation, and a linear ``1×1`` output. Inputs need sides divisible by ``2^depth``.

    Args:
        depth: number of down-sampling levels (N2V default 2).
        channels: channels of the first level (N2V default 32).
        in_channels: image channels.
    """

    def __init__(self, depth: int = 2, channels: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        _check_int("depth", depth, 1)
        _check_int("channels", channels, 1)
        self.depth = depth
        widths = [channels * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths[:-1]:
            self.down.append(_block(previous, width))
            previous = width
        self.bottom = _block(previous, widths[-1])
        self.up = nn.ModuleList(
            _block(widths[level + 1] + widths[level], widths[level])
            for level in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(
                f"image sides must be divisible by {2**self.depth}, got {tuple(x.shape[-2:])}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for block in self.up:
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.out(x)


def blind_spot_mask(
    patches: torch.Tensor,
    fraction: float = 0.002,
    radius: int = 5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise2Void's blind-spot input: ``(masked copy of patches, boolean mask)``.

    In every patch ``[C, H, W]`` exactly ``k = max(1, round(fraction·H·W))`` distinct pixels
    (uniformly chosen) get, in all channels, the original value of another pixel drawn
    uniformly from the window ``|Δrow|, |Δcol| <= radius`` inside the patch, centre excluded.
    Every other pixel is unchanged. The mask ``[n, 1, H, W]`` marks the replaced pixels.

    Args:
        patches: ``[n, C, H, W]``.
        fraction: fraction of pixels masked per patch (``0 < fraction < 1``; ~0.2 % in N2V).
        radius: ``ρ >= 1``, the window's half-width (5: 11×11).
        generator: CPU generator of the positions and replacements.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    _check_int("radius", radius, 1)
    n, _, height, width = patches.shape
    if height * width < 2:
        raise ValueError("patches need at least two pixels")
    k = max(1, round(fraction * height * width))
    positions = torch.rand(n, height * width, generator=generator).argsort(1)[:, :k]
    rows, cols = positions // width, positions % width

    def draw(centre: torch.Tensor, size: int) -> torch.Tensor:
        low = (centre - radius).clamp(min=0)
        span = (centre + radius).clamp(max=size - 1) - low + 1
        return low + (torch.rand(centre.shape, generator=generator) * span).long().minimum(
            span - 1
        )

    source_rows, source_cols = draw(rows, height), draw(cols, width)
    centre = (source_rows == rows) & (source_cols == cols)
    while bool(centre.any()):
        source_rows[centre] = draw(rows[centre], height)
        source_cols[centre] = draw(cols[centre], width)
        centre = (source_rows == rows) & (source_cols == cols)

    device = patches.device
    batch = torch.arange(n)[:, None].expand(n, k).to(device)
    rows, cols = rows.to(device), cols.to(device)
    masked = patches.clone()
    masked[batch, :, rows, cols] = patches[batch, :, source_rows.to(device), source_cols.to(device)]
    mask = torch.zeros(n, 1, height, width, dtype=torch.bool, device=device)
    mask[batch, 0, rows, cols] = True
    return masked, mask


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only (all channels)."""
    mask = mask.expand_as(target)
    return ((prediction - target)[mask] ** 2).mean()


@dataclass
class N2VConfig(TrainConfig):
    """N2V-Training: a Noise2Void denoiser trained on the training images, then the classifier
    trained and evaluated (as in :class:`TrainConfig`) on denoised train/val/test images.

    Denoiser defaults follow the Noise2Void reference settings (U-Net depth 2 with 32
    channels, 64² patches, 0.2 % blind spots from an 11×11 window, Adam ``4e-4``, batch 128,
    100 epochs); on a CPU, lower ``denoiser_epochs``.

    Attributes:
        denoiser_epochs: epochs over the training images (>= 1).
        denoiser_lr: Adam learning rate of the denoiser (> 0).
        denoiser_batch_size: patches per step (>= 1).
        patch_size: side of the random square crops (divisible by ``2^depth``, at most the
            image side).
        mask_fraction: blind-spot fraction per patch (``0 < f < 1``).
        radius: half-width of the replacement window (>= 1).
        depth: U-Net levels (>= 1).
        channels: U-Net first-level channels (>= 1).
    """

    denoiser_epochs: int = 100
    denoiser_lr: float = 4e-4
    denoiser_batch_size: int = 128
    patch_size: int = 64
    mask_fraction: float = 0.002
    radius: int = 5
    depth: int = 2
    channels: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("denoiser_epochs", self.denoiser_epochs, 1)
        _check_positive("denoiser_lr", self.denoiser_lr)
        _check_int("denoiser_batch_size", self.denoiser_batch_size, 1)
        _check_int("depth", self.depth, 1)
        _check_int("channels", self.channels, 1)
        _check_int("patch_size", self.patch_size, 2**self.depth)
        if self.patch_size % 2**self.depth:
            raise ValueError(
                f"patch_size must be divisible by 2^depth = {2**self.depth}, "
                f"got {self.patch_size}"
            )
        _check_positive("mask_fraction", self.mask_fraction)
        if self.mask_fraction >= 1:
            raise ValueError(f"mask_fraction must be < 1, got {self.mask_fraction!r}")
        _check_int("radius", self.radius, 1)


class Denoiser(nn.Module):
    """A U-Net on standardised images: ``x ↦ f((x − μ)/σ)·σ + μ`` with the training images'
    mean ``μ`` and standard deviation ``σ``."""

    def __init__(self, net: UNet, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std) * self.std + self.mean

    @torch.no_grad()
    def denoise(self, images: torch.Tensor, batch_size: int = 64,
                bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Eval-mode denoised ``images`` (whole images), clipped to ``bounds``, on their device."""
        self.eval()
        device = self.mean.device
        return torch.cat([
            self(part.to(device)).clamp(*bounds).to(images.device)
            for part in images.split(batch_size)
        ])


def random_patches(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size²`` crop of each image, randomly rotated by k·90° and mirrored."""
    n, _, height, width = images.shape
    tops = torch.randint(height - size + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(width - size + 1, (n,), generator=generator).tolist()
    turns = torch.randint(4, (n,), generator=generator).tolist()
    mirror = torch.randint(2, (n,), generator=generator).tolist()
    patches = []
    for image, top, left, turn, flip in zip(images, tops, lefts, turns, mirror, strict=True):
        patch = torch.rot90(image[:, top:top + size, left:left + size], turn, dims=(1, 2))
        patches.append(patch.flip(-1) if flip else patch)
    return torch.stack(patches)


class N2VDenoiserTrainer(Trainer):
    """The Noise2Void denoiser on the shared loop (:meth:`Trainer.fit_unlabelled`): the
    batch ``B`` of (whole) training images becomes one random patch per image
    (:func:`random_patches`), standardised by the denoiser's ``μ, σ``, and its loss is
    :func:`masked_mse` of the U-Net on :func:`blind_spot_mask` inputs; every draw comes from
    the loop's generator.

    Args:
        denoiser: the :class:`Denoiser` to train (its U-Net's parameters are optimised).
        config: the N2V settings; the loop takes ``denoiser_epochs``, ``denoiser_lr`` (Adam)
            and ``denoiser_batch_size`` from them, without flips (the patches are rotated
            and mirrored already) and with a last batch of one trained alone.
        generator: the random stream to draw from (continued in place).
    """

    method = "n2v denoiser"

    def __init__(self, denoiser: Denoiser, config: N2VConfig,
                 generator: torch.Generator) -> None:
        super().__init__(denoiser, TrainConfig(
            epochs=config.denoiser_epochs, lr=config.denoiser_lr,
            batch_size=config.denoiser_batch_size, seed=config.seed, flip=False,
            progress=config.progress, join_single_batch=False,
        ), generator=generator)
        self.n2v = config

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        patches = random_patches(x, self.n2v.patch_size, self.generator)
        standard = (patches - self.model.mean) / self.model.std
        masked, mask = blind_spot_mask(standard, self.n2v.mask_fraction, self.n2v.radius,
                                       self.generator)
        return masked_mse(self.model.net(masked), standard, mask)


def train_denoiser(
    images: torch.Tensor,
    config: N2VConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[Denoiser, list[float]]:
    """Train a Noise2Void :class:`Denoiser` on ``images`` (``[n, C, H, W]``, noisy) with
    :class:`N2VDenoiserTrainer`, drawing from ``generator``.

    Each epoch visits every image once, as one random patch per image, in batches; the loss
    is :func:`masked_mse` on :func:`blind_spot_mask` inputs. Returns the denoiser (eval mode)
    and the mean loss of every epoch.
    """
    if min(images.shape[-2:]) < config.patch_size:
        raise ValueError(
            f"patch_size {config.patch_size} exceeds the image size {tuple(images.shape[-2:])}"
        )
    mean, std = float(images.mean()), float(images.std())
    denoiser = Denoiser(
        UNet(config.depth, config.channels, images.shape[1]), mean, max(std, 1e-6)
    ).to(device)
    losses = N2VDenoiserTrainer(denoiser, config, generator).fit_unlabelled(images)
    return denoiser, losses


class N2VTrainer(Trainer):
    """N2V-Training: :func:`train_denoiser` on the training images, then the shared loop
    (plain cross-entropy) on the denoised training images, evaluated on denoised validation
    and test images. After :meth:`fit`, ``denoiser`` holds the denoiser and ``extras`` its
    per-epoch losses and training seconds."""

    method = "n2v"
    config_type = N2VConfig
    config: N2VConfig

    def __init__(self, model: nn.Module, config: N2VConfig | None = None) -> None:
        super().__init__(model, config)
        self.denoiser: Denoiser | None = None
        self.denoiser_losses: list[float] = []
        self.denoiser_seconds = math.nan

    def fit(self, train: Split, val: Split, test: TestSets) -> TrainResult:
        if self.denoiser is not None:
            raise RuntimeError(f"this {type(self).__name__} has already been fitted")
        start = time.perf_counter()
        train, val = check_split(train, "train"), check_split(val, "val")
        tests = check_test_sets(test)
        self.denoiser, self.denoiser_losses = train_denoiser(
            train[0], self.config, self.generator, self.device
        )

        def denoised(split: Split) -> Split:
            assert self.denoiser is not None
            return self.denoiser.denoise(split[0], self.config.eval_batch_size), split[1]

        train, val = denoised(train), denoised(val)
        tests = {name: denoised(split) for name, split in tests.items()}
        self.denoiser_seconds = time.perf_counter() - start
        result = super().fit(train, val, tests)
        result.seconds = time.perf_counter() - start  # the whole run, denoiser included
        return result

    def extras(self) -> dict[str, Any]:
        return {"denoiser_losses": self.denoiser_losses,
                "denoiser_seconds": self.denoiser_seconds}
