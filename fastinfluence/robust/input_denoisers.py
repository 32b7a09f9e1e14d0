"""Pre-processing defences that the denoising paper combines with its own (Table 4).

* **Reformer** (MagNet, Meng & Chen 2017): an auto-encoder trained to map clean images
  with small Gaussian noise back to the clean images (MagNet's "noise volume" 0.1), put in
  front of the classifier at test time: the classifier sees ``reformer(x)``.
* **HGD** (high-level representation guided denoiser, Liao et al. 2018): a residual denoiser
  ``D(x) = clip(x + g(x), 0, 1)`` trained with the classifier frozen so that the classifier's
  high-level features of the denoised adversarial image match those of the clean image,
  ``‖f(D(x*)) − f(x)‖₁`` (the feature-guided variant, ``f`` = the flattened last
  convolutional output, :meth:`DenoisingNet.parts`). Adversarial training images come from
  the caller (here: crafted on the black-box source model).

Both are the same small convolutional encoder-decoder (:class:`ConvDenoiser`), trained by
Adam; :class:`DenoisedClassifier` chains one with a classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.robust.denoising import DenoisingNet
from fastinfluence.robust.loop import split_batches


class ConvDenoiser(nn.Module):
    """Two 3×3 convolutions at full resolution, a 2× average-pool, two at half resolution,
    2× upsampling, two convolutions and a 3×3 output convolution (BatchNorm + ReLU between).

    Args:
        channels: image channels.
        width: feature channels.
        residual: output ``clip(x + g(x), 0, 1)`` (HGD predicts the perturbation) instead of
            ``sigmoid(g(x))`` (the Reformer reconstructs the image).
    """

    def __init__(self, channels: int = 3, width: int = 32, residual: bool = False) -> None:
        super().__init__()

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b),
                    nn.ReLU(inplace=True)]

        self.residual = residual
        self.layers = nn.Sequential(
            *conv(channels, width), *conv(width, width), nn.AvgPool2d(2),
            *conv(width, width), *conv(width, width), nn.Upsample(scale_factor=2),
            *conv(width, width), *conv(width, width), nn.Conv2d(width, channels, 3, padding=1),
        )
        if residual:  # start as the identity: the clean image is a good first guess
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return (x + out).clamp(0, 1) if self.residual else torch.sigmoid(out)


class DenoisedClassifier(nn.Module):
    """``classifier(denoiser(x))``: a pre-processing defence in front of a classifier."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random order of ``n`` indices in batches (:func:`~fastinfluence.robust.loop.
    split_batches`: no train-mode BatchNorm step on a single image)."""
    return split_batches(torch.randperm(n, generator=generator), batch_size)


def train_reformer(reformer: ConvDenoiser, images: torch.Tensor, *, epochs: int = 10,
                   noise: float = 0.1, lr: float = 1e-3, batch_size: int = 64,
                   seed: int = 0) -> list[float]:
    """Train MagNet's reformer on clean images: minimise ``MSE(reformer(x + N(0, noise²)), x)``
    (the noisy input clipped to ``[0, 1]``, fresh noise per step). Returns the mean loss per
    epoch; the reformer is left in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    device = next(reformer.parameters()).device
    optimizer = torch.optim.Adam(reformer.parameters(), lr=lr)
    losses = []
    reformer.train()
    for _ in range(epochs):
        total = 0.0
        batches = _batches(len(images), batch_size, generator)
        for index in batches:
            x = images[index]
            noisy = (x + noise * torch.randn(x.shape, generator=generator)).clamp(0, 1)
            loss = F.mse_loss(reformer(noisy.to(device)), x.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / len(batches))
    reformer.eval()
    return losses


def train_guided_denoiser(denoiser: ConvDenoiser, classifier: DenoisingNet,
                          clean: torch.Tensor, adversarial: torch.Tensor, *, epochs: int = 10,
                          lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Train an HGD denoiser guided by ``classifier``'s features (frozen, eval mode): minimise
    the mean ``|f(denoiser(x*)) − f(x)|`` over pairs of adversarial ``x*`` and clean ``x``
    training images. Returns the mean loss per epoch; the denoiser is left in eval mode and
    the classifier's ``training`` and ``requires_grad`` flags as they were."""
    if adversarial.shape != clean.shape:
        raise ValueError(f"adversarial {tuple(adversarial.shape)} and clean "
                         f"{tuple(clean.shape)} images must have the same shape")
    generator = torch.Generator().manual_seed(seed)
    device = next(denoiser.parameters()).device
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    was_training = classifier.training
    flags = [(p, p.requires_grad) for p in classifier.parameters()]
    classifier.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    losses = []
    try:
        denoiser.train()
        for _ in range(epochs):
            total = 0.0
            batches = _batches(len(clean), batch_size, generator)
            for index in batches:
                with torch.no_grad():
                    target = classifier.parts(clean[index].to(device))[1]
                features = classifier.parts(denoiser(adversarial[index].to(device)))[1]
                loss = F.l1_loss(features, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            losses.append(total / len(batches))
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        classifier.train(was_training)
        denoiser.eval()
    return losses
