"""The ISR/ISP paper's classifier (Van, Carey & Wu, "Robust influence-based
training methods for noisy brain MRI", 2024, §6.1)."""

from __future__ import annotations

import torch
from torch import nn


class PaperCNN(nn.Module):
    """Five blocks of ``conv(k=5, same padding) -> BatchNorm -> ReLU -> 2x2 max-pool`` with
    channels 32/32/64/64/64, then one ``Linear`` on the flattened features.

    Args:
        image_size: side of the square input images (must be divisible by 32).
        in_channels: image channels (1 for MRI).
        num_classes: output logits (3 tumour classes in the paper).
        channels: channels of the five blocks.
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 1,
        num_classes: int = 3,
        channels: tuple[int, ...] = (32, 32, 64, 64, 64),
    ) -> None:
        super().__init__()
        downsample = 2 ** len(channels)
        if image_size <= 0 or image_size % downsample:
            raise ValueError(
                f"image_size must be a positive multiple of {downsample} "
                f"(one 2x2 pool per block), got {image_size}"
            )
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks += [
                nn.Conv2d(previous, width, kernel_size=5, padding=2),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*blocks)
        side = image_size // downsample
        self.classifier = nn.Linear(previous * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
