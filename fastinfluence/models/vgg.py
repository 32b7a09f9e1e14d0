"""A compact VGG-16 with BatchNorm (Simonyan & Zisserman 2015), for small images.

Our own definition (the torchvision wheel that matches the project's torch is a CUDA build).
Thirteen 3×3 convolutions in five blocks of 2, 2, 3, 3, 3, each
block ending in a 2×2 max-pool, then three fully connected layers: sixteen weight layers as
VGG-16. Two changes for training from scratch on small images: BatchNorm after every
convolution (torchvision's ``vgg16_bn`` layout; plain VGG-16 does not train from scratch with
SGD at lr 0.01 in a few epochs) and global average pooling before a classifier of width
``8·width`` instead of a 7×7 pool and 4,096-wide layers (a 64² image is 2² after five pools).
ImageNet checkpoints therefore do not load into it.
"""

from __future__ import annotations

import torch
from torch import nn

VGG16_BLOCKS: tuple[int, ...] = (2, 2, 3, 3, 3)
"""Convolutions per block of VGG-16."""


class VGG(nn.Module):
    """Blocks of 3×3 convolution + BatchNorm + ReLU, each block closed by a 2×2 max-pool;
    global average pooling; ``Linear-ReLU-Dropout`` twice and a final ``Linear``.

    Args:
        blocks: convolutions per block (VGG-16: :data:`VGG16_BLOCKS`).
        widths: channels per block (VGG-16: 64/128/256/512/512).
        in_channels: image channels.
        num_classes: output logits.
        hidden: width of the two hidden fully connected layers.
        dropout: dropout probability of the hidden layers.

    ``blocks_output(x, upto)`` runs the first ``upto`` blocks (the attachment point of an
    embedded decoder); :meth:`features` is the pooled vector the classifier reads.
    """

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], in_channels: int = 3,
                 num_classes: int = 2, hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        if not blocks or len(blocks) != len(widths):
            raise ValueError(f"blocks and widths must be non-empty and of equal length, got "
                             f"{blocks}, {widths}")
        for name, values in (("blocks", blocks), ("widths", widths)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        stages = []
        previous = in_channels
        for count, width in zip(blocks, widths, strict=True):
            layers: list[nn.Module] = []
            for _ in range(count):
                layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                previous = width
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(stages)
        self.widths = tuple(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(previous, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled output of the last block ``[n, widths[-1]]`` (the classifier's input)."""
        for block in self.blocks:
            x = block(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg16(num_classes: int = 2, *, width: int = 64, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm (module docstring), block widths ``width·(1, 2, 4, 8, 8)`` and
    hidden layers of ``8·width`` (64 gives VGG-16's convolution widths)."""
    widths = tuple(width * m for m in (1, 2, 4, 8, 8))
    return VGG(VGG16_BLOCKS, widths, in_channels, num_classes, hidden=8 * width)
