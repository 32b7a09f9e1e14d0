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
Adam on the shared loop (:meth:`~fastinfluence.robust.loop.Trainer.fit_unlabelled`);
:class:`DenoisedClassifier` chains one with a classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.robust.config import TrainConfig
from fastinfluence.robust.denoising import DenoisingNet
from fastinfluence.robust.loop import Trainer


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


class ReformerTrainer(Trainer):
    """MagNet's reformer on the shared loop: ``MSE(reformer(clip(x + N(0, noise²))), x)`` per
    batch, the noise drawn from the loop's generator (fresh per step)."""

    def __init__(self, reformer: ConvDenoiser, config: TrainConfig, noise: float) -> None:
        super().__init__(reformer, config)
        self.noise = noise

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator).to(x.device)
        return F.mse_loss(self.model((x + self.noise * noise).clamp(0, 1)), x)


def denoiser_config(epochs: int, lr: float, batch_size: int, seed: int) -> TrainConfig:
    """The shared loop's settings for a denoiser: Adam, no flips (an adversarial image and its
    clean partner must stay aligned), batches as :func:`~fastinfluence.robust.loop.
    split_batches` makes them."""
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, flip=False)


def train_reformer(reformer: ConvDenoiser, images: torch.Tensor, *, epochs: int = 10,
                   noise: float = 0.1, lr: float = 1e-3, batch_size: int = 64,
                   seed: int = 0) -> list[float]:
    """Train MagNet's reformer on clean images: minimise ``MSE(reformer(x + N(0, noise²)), x)``
    (the noisy input clipped to ``[0, 1]``, fresh noise per step) with
    :class:`ReformerTrainer`. Returns the mean loss per epoch; the reformer is left in eval
    mode."""
    trainer = ReformerTrainer(reformer, denoiser_config(epochs, lr, batch_size, seed), noise)
    return trainer.fit_unlabelled(images)


class GuidedDenoiserTrainer(Trainer):
    """HGD on the shared loop: trained on adversarial images, the loss of batch ``B`` is the
    mean ``|f(denoiser(x*_B)) − f(x_B)|`` against the frozen classifier's features ``f`` of
    the clean partners ``x_B``."""

    def __init__(self, denoiser: ConvDenoiser, config: TrainConfig, classifier: DenoisingNet,
                 clean: torch.Tensor) -> None:
        super().__init__(denoiser, config)
        self.classifier, self.clean = classifier, clean

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.classifier.parts(self.clean[index].to(x.device))[1]
        return F.l1_loss(self.classifier.parts(self.model(x))[1], target)


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
    was_training = classifier.training
    flags = [(p, p.requires_grad) for p in classifier.parameters()]
    classifier.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        trainer = GuidedDenoiserTrainer(denoiser, denoiser_config(epochs, lr, batch_size, seed),
                                        classifier, clean)
        return trainer.fit_unlabelled(adversarial)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        classifier.train(was_training)
