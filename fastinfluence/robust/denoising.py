"""The denoising paper's defence: an embedded auto-encoder and the neighbour loss.

Xue et al., "Improving robustness of medical image diagnosis with denoising convolutional
neural networks". A classifier is split into
an *encoder* (its first stages), a *body* (the remaining convolutions, whose flattened output
``f(x)`` is the semantic feature vector) and a *head* (pooling and the fully connected
layers). Training minimises Eq. 3,

    L = L_c + λ_n·L_n + λ_a·L_a,

on each clean batch ``x`` and ``K`` noisy copies ``x' = clip(x + U(−σ, σ), 0, 1)``:

* ``L_c``: cross-entropy on the clean and the noisy images;
* ``L_n`` (neighbour loss, Eq. 1): the mean squared distance between ``f(x')`` and the
  *detached* ``f(x)``, so the noisy features move to the clean ones and never the reverse;
* ``L_a`` (Eq. 2): a decoder on the encoder's output reconstructs the clean image from the
  clean and from every noisy image (mean squared error to ``x``).

The paper leaves σ, ``K``, the distance and the decoder's position open; the defaults follow
the authors' public code: U(±0.2), 3 copies, squared
error to detached features, the decoder on ResNet's ``layer1`` (VGG: after block 2, the same
resolution). The classifier's input is always the original image: the decoder is used only by
the loss, and ``forward`` returns logits alone, so attacks and :class:`fastinfluence.Influence`
see a plain classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.models.resnet import ResNet
from fastinfluence.models.vgg import VGG
from fastinfluence.robust.config import TrainConfig, _check_int, _check_positive
from fastinfluence.robust.loop import Trainer


class ImageDecoder(nn.Module):
    """``upsamplings`` times (2× nearest upsampling, 3×3 convolution, BatchNorm, ReLU), halving
    the channels each time, then a 3×3 convolution to ``out_channels`` and a sigmoid (images
    are in ``[0, 1]``)."""

    def __init__(self, in_channels: int, out_channels: int, upsamplings: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(upsamplings):
            narrower = max(channels // 2, 8)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(channels, narrower, 3, padding=1, bias=False),
                       nn.BatchNorm2d(narrower), nn.ReLU(inplace=True)]
            channels = narrower
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class DenoisingNet(nn.Module):
    """A classifier split as ``head(body(encoder(x)))``, with an optional embedded decoder.

    Args:
        encoder: the first stages (shared by the classifier and the auto-encoder).
        body: the remaining convolutional stages; its output, flattened, is ``f(x)``.
        head: pooling and fully connected layers: ``f``'s map to logits.
        decoder: reconstructs the image from the encoder's output (``None``: no auto-encoder).

    ``forward`` gives the logits only; :meth:`parts` gives logits, ``f(x)`` and the
    reconstruction (``None`` without a decoder). Build one from a backbone with
    :meth:`from_resnet` or :meth:`from_vgg`.
    """

    def __init__(self, encoder: nn.Module, body: nn.Module, head: nn.Module,
                 decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.body = body
        self.head = head
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.encoder(x)))

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logits, f(x) flattened [n, D], reconstruction [n, C, H, W] or None)``."""
        h = self.encoder(x)
        feature_map = self.body(h)
        reconstruction = None if self.decoder is None else self.decoder(h)
        return self.head(feature_map), feature_map.flatten(1), reconstruction

    @classmethod
    def from_resnet(cls, resnet: ResNet, decoder: bool = True) -> DenoisingNet:
        """Split a :class:`~fastinfluence.models.ResNet` (its modules are shared, not copied):
        encoder = stem + ``layer1``, body = ``layer2..``, head = average pool + ``fc``; the
        decoder upsamples ``layer1``'s output back to the input size (``imagenet`` stem: 4×)."""
        encoder = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                resnet.layer1)
        body = nn.Sequential(*(getattr(resnet, f"layer{s + 1}")
                               for s in range(1, resnet.num_stages)))
        head = nn.Sequential(resnet.avgpool, nn.Flatten(1), resnet.fc)
        image_decoder = None
        if decoder:
            stride = 1 if isinstance(resnet.maxpool, nn.Identity) else 4
            image_decoder = ImageDecoder(resnet.layer1[-1].conv2.out_channels,
                                         resnet.conv1.in_channels, stride.bit_length() - 1)
        return cls(encoder, body, head, image_decoder)

    @classmethod
    def from_vgg(cls, vgg: VGG, decoder: bool = True) -> DenoisingNet:
        """Split a :class:`~fastinfluence.models.VGG`: encoder = blocks 1-2 (4× down, as
        ResNet's ``layer1``), body = the other blocks, head = average pool + classifier."""
        encoder = nn.Sequential(*vgg.blocks[:2])
        body = nn.Sequential(*vgg.blocks[2:])
        head = nn.Sequential(vgg.avgpool, nn.Flatten(1), vgg.classifier)
        first = vgg.blocks[0][0]
        image_decoder = (ImageDecoder(vgg.widths[1], first.in_channels, 2) if decoder else None)
        return cls(encoder, body, head, image_decoder)


def noisy_copies(x: torch.Tensor, copies: int, sigma: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``copies`` noisy versions of the batch, ``[copies·n, C, H, W]`` (copy-major):
    ``clip(x + U(−σ, σ), 0, 1)`` with fresh noise per pixel from ``generator`` (on the CPU)."""
    noise = torch.rand((copies, *x.shape), generator=generator, dtype=x.dtype)
    noisy = x.unsqueeze(0) + (2 * noise.to(x.device) - 1) * sigma
    return noisy.clamp(0, 1).flatten(0, 1)


def neighbour_loss(noisy_features: torch.Tensor, clean_features: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as the authors' code: mean squared distance of each noisy copy's features
    ``[K·n, D]`` (copy-major) to its clean image's features ``[n, D]``, the clean ones
    detached (no gradient flows into the clean branch)."""
    copies = len(noisy_features) // len(clean_features)
    if copies * len(clean_features) != len(noisy_features):
        raise ValueError(f"noisy features ({len(noisy_features)}) must be a multiple of the "
                         f"clean ones ({len(clean_features)})")
    target = clean_features.detach().repeat(copies, 1)
    return F.mse_loss(noisy_features, target)


def reconstruction_loss(reconstructions: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Eq. 2 as mean squared error: reconstructions ``[(1 + K)·n, C, H, W]`` (the clean
    images' first, then each copy's) against the clean images ``[n, C, H, W]``."""
    copies = len(reconstructions) // len(clean)
    if copies * len(clean) != len(reconstructions):
        raise ValueError(f"reconstructions ({len(reconstructions)}) must be a multiple of the "
                         f"images ({len(clean)})")
    return F.mse_loss(reconstructions, clean.repeat(copies, 1, 1, 1))


@dataclass
class DenoisingConfig(TrainConfig):
    """The denoising defence (Eq. 3) on the shared loop; defaults: the paper's SGD recipe.

    Attributes:
        lambda_n: ``λ_n``, weight of the neighbour loss (>= 0; paper's choice 1).
        lambda_a: ``λ_a``, weight of the reconstruction loss (>= 0; paper's choice 10; needs a
            model with a decoder when > 0).
        noise: ``σ`` of the uniform noise on ``[0, 1]`` images (> 0; authors' code 0.2).
        copies: noisy copies ``K`` per image and step (>= 1; authors' code 3).
    """

    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lambda_n: float = 1.0
    lambda_a: float = 10.0
    noise: float = 0.2
    copies: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambda_n", "lambda_a"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        _check_positive("noise", self.noise)
        _check_int("copies", self.copies, 1)


class DenoisingTrainer(Trainer):
    """Minimises ``L_c + λ_n·L_n + λ_a·L_a`` (module docstring) on a :class:`DenoisingNet`.

    Each step forwards the clean batch, then its ``copies`` noisy versions together (train
    mode; two passes, so that no gradient reaches the clean branch through BatchNorm's batch
    statistics). ``self.loss_terms`` holds the per-epoch means of
    the three terms (``{"L_c": [...], "L_n": [...], "L_a": [...]}``), also in
    ``result.extras["loss_terms"]``.
    """

    method = "denoising"
    config_type = DenoisingConfig
    config: DenoisingConfig

    def __init__(self, model: DenoisingNet, config: DenoisingConfig | None = None) -> None:
        if not isinstance(model, DenoisingNet):
            raise TypeError(f"DenoisingTrainer needs a DenoisingNet, got {type(model).__name__}")
        super().__init__(model, config)
        if self.config.lambda_a > 0 and model.decoder is None:
            raise ValueError("lambda_a > 0 needs a DenoisingNet with a decoder")
        self.loss_terms: dict[str, list[float]] = {"L_c": [], "L_n": [], "L_a": []}
        self._epoch_terms: dict[str, list[float]] = {}

    def before_epoch(self, epoch: int) -> None:
        self._close_epoch()
        self._epoch_terms = {name: [] for name in self.loss_terms}

    def _close_epoch(self) -> None:
        for name, values in self._epoch_terms.items():
            if values:
                self.loss_terms[name].append(sum(values) / len(values))

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        config = self.config
        noisy = noisy_copies(x, config.copies, config.noise, self.generator)
        # two passes, not one: in train mode BatchNorm's batch statistics would otherwise
        # carry the neighbour loss's gradient into the clean images' branch
        clean_logits, clean_features, clean_reconstruction = self.model.parts(x)
        noisy_logits, noisy_features, noisy_reconstruction = self.model.parts(noisy)
        classification = F.cross_entropy(torch.cat([clean_logits, noisy_logits]),
                                         y.repeat(1 + config.copies))
        neighbour = neighbour_loss(noisy_features, clean_features)
        loss = classification + config.lambda_n * neighbour
        reconstruction = torch.zeros(())
        if clean_reconstruction is not None and config.lambda_a > 0:
            reconstruction = reconstruction_loss(
                torch.cat([clean_reconstruction, noisy_reconstruction]), x)
            loss = loss + config.lambda_a * reconstruction
        for name, value in (("L_c", classification), ("L_n", neighbour),
                            ("L_a", reconstruction)):
            self._epoch_terms[name].append(float(value.detach()))
        return loss

    def extras(self) -> dict[str, object]:
        self._close_epoch()
        self._epoch_terms = {}
        return {"loss_terms": self.loss_terms}
