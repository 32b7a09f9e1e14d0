"""ResNets with basic or bottleneck blocks (He et al. 2016), parameter names as torchvision's.

Our own definition rather than ``torchvision.models``: the torchvision wheel that matches the
project's torch is a CUDA build that only imports beside the CPU torch after its C++ op
schemas are declared by hand, a fragile shim for two hundred
lines of model code. The module and parameter names follow torchvision's ``resnet18``
(``conv1, bn1, layer1..layer4, fc``; blocks ``conv1, bn1, conv2, bn2, downsample.0/1``) and
``resnet101`` (bottleneck blocks add ``conv3, bn3``), so a torchvision ImageNet checkpoint saved
to a local file loads into :func:`resnet18` or :func:`resnet101` with ``weights=path`` (no
weights can be downloaded here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

STEMS = ("imagenet", "small")


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3 convolutions; the
    shortcut is a strided 1×1 convolution + BatchNorm when the shape changes."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class Bottleneck(nn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``: a 1×1
    convolution to ``channels``, a 3×3 one (carrying the stride, as torchvision's "ResNet
    v1.5"), a 1×1 one to ``4·channels``; the shortcut is a strided 1×1 convolution +
    BatchNorm when the shape changes."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` or :class:`Bottleneck` stages, global average pooling
    and one ``Linear``.

    Args:
        blocks: blocks per stage (``(2, 2, 2, 2)`` is ResNet-18; ``(3, 4, 23, 3)`` with
            bottleneck blocks ResNet-101).
        widths: channels per stage (ResNet-18: 64/128/256/512; a bottleneck stage outputs 4×
            its width); stage ``s > 0`` halves the resolution.
        in_channels: image channels.
        num_classes: output logits.
        stem: ``"imagenet"``: 7×7 stride-2 convolution + 3×3 stride-2 max-pool (torchvision's;
            a 64² image reaches the last stage at 2²); ``"small"``: one 3×3 stride-1
            convolution (for tiny images; 16× the compute of ``"imagenet"``).
        block: ``"basic"`` (:class:`BasicBlock`, ResNet-18/34) or ``"bottleneck"``
            (:class:`Bottleneck`, ResNet-50/101/152).

    :meth:`features` returns the pooled penultimate vector ``[n, widths[-1]·expansion]`` that
    ``fc`` maps to logits (expansion 1 for basic blocks, 4 for bottlenecks).
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 3,
        num_classes: int = 2,
        stem: str = "imagenet",
        block: str = "basic",
    ) -> None:
        super().__init__()
        blocks, widths = tuple(blocks), tuple(widths)
        if not blocks or len(blocks) != len(widths):
            raise ValueError(
                f"blocks and widths must be non-empty and of equal length, got {blocks}, {widths}"
            )
        for name, values in (("blocks", blocks), ("widths", widths)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {tuple(BLOCKS)}, got {block!r}")
        unit = BLOCKS[block]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        previous = widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = [unit(previous, width, 1 if stage == 0 else 2)]
            previous = width * unit.expansion
            layers += [unit(previous, width) for _ in range(count - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features ``[n, fc.in_features]`` (the input of ``fc``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18(
    num_classes: int = 2,
    *,
    width: int = 64,
    in_channels: int = 3,
    stem: str = "imagenet",
    weights: str | Path | None = None,
) -> ResNet:
    """ResNet-18 (two basic blocks in each of four stages), widths ``width·(1, 2, 4, 8)``.

    Args:
        num_classes: output logits.
        width: channels of the first stage (64 is ResNet-18; smaller is cheaper on a CPU).
        in_channels: image channels.
        stem: see :class:`ResNet`.
        weights: a local ``torch.save``-d state dict (e.g. torchvision's ImageNet
            ``resnet18`` checkpoint; nothing is downloaded). Every tensor except a final
            ``fc`` of another shape must match; ``fc`` is kept freshly initialised when its
            shape differs (a new classification head), which is what fine-tuning needs.
    """
    model = ResNet((2, 2, 2, 2), tuple(width * m for m in (1, 2, 4, 8)), in_channels,
                   num_classes, stem)
    if weights is not None:
        load_weights(model, weights)
    return model


def resnet101(
    num_classes: int = 2,
    *,
    width: int = 64,
    in_channels: int = 3,
    stem: str = "imagenet",
    weights: str | Path | None = None,
) -> ResNet:
    """ResNet-101 (3, 4, 23 and 3 bottleneck blocks), widths ``width·(1, 2, 4, 8)`` (outputs 4×
    those). With the defaults it is torchvision's ``resnet101`` (44.5 M parameters with 1,000
    classes) with the same parameter and buffer names and shapes, so torchvision's ImageNet
    checkpoint, saved to a local file, loads with ``weights=path``. Without ``weights`` the
    network starts from random initialisation (Kaiming-normal convolutions).

    Args: as :func:`resnet18`.
    """
    model = ResNet((3, 4, 23, 3), tuple(width * m for m in (1, 2, 4, 8)), in_channels,
                   num_classes, stem, block="bottleneck")
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict into ``model``, keeping the model's own ``fc.*`` tensors when
    the file's head has another shape. Returns the names that were kept (not loaded).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the first
    missing, unexpected or mis-shaped tensor outside the head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path.name} must hold a state dict, got {type(state)}")
    own = model.state_dict()
    kept = [name for name in own if name.startswith("fc.") and name in state
            and state[name].shape != own[name].shape]
    loaded = {name: tensor for name, tensor in state.items() if name not in kept}
    missing = [name for name in own if name not in loaded and name not in kept]
    unexpected = [name for name in loaded if name not in own]
    shapes = [name for name in loaded if name in own and loaded[name].shape != own[name].shape]
    for problem, names in (("missing", missing), ("unexpected", unexpected),
                           ("mis-shaped", shapes)):
        if names:
            raise ValueError(f"weights file {path.name}: {len(names)} {problem} tensors, "
                             f"e.g. {names[0]!r}")
    model.load_state_dict({**own, **loaded})
    return kept
