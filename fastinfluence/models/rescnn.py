"""The MRS paper's 1-D residual CNN (its Table 1) and class activation maps for it.

Lu et al., "Human-expert-level brain tumor detection using deep learning with data
distillation and augmentation", §4.3 and
Table 1: an input convolution, 8 residual blocks of two convolutions of width 32 with
BatchNorm, dropout 0.55 and ReLU, filters 16 → 128 doubling every other block, a subsample of
factor 2 every other block, global average pooling (GAP) and a dense layer with 2 outputs.

Decisions on what the paper leaves open (docs/design.md §5):

- **Strides**: Table 1's output sizes (288 → 144 after block 1, 72 after block 3, 36 after
  block 5, 18 after block 7) need stride 2 in blocks 1, 3, 5 and 7, although its "Stride"
  column says 1 for block 1: the output sizes are taken as right.
- **Block internals**: ``relu(bn2(conv2(dropout(relu(bn1(conv1(x)))))) + shortcut(x))``
  (He et al.'s post-activation basic block, the paper's reference [16]); the first
  convolution carries the block's stride. The paper's shortcut is "the identity
  transformation or max-pooling" (§4.3; as in its reference [10], Hannun et al.'s ECG
  network): ``shortcut="pool"`` is the identity when the shape is kept, else a max-pool by
  the stride with zero channels appended (He et al.'s option A). ``shortcut="projection"``
  (the default, which every committed run before the option existed used) is the identity
  when the shape is kept, else a strided 1×1 convolution + BatchNorm (He et al.'s option B).
- **Even kernel, "same" length**: a width-32 convolution has no symmetric padding that keeps
  the length, so each one is preceded by an explicit ``ConstantPad1d((15, 16))`` (15 zeros
  before, 16 after; PyTorch's ``padding="same"`` does the same but refuses strides).
- The input convolution is followed by BatchNorm and ReLU, as in a ResNet stem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("projection", "pool")
"""The residual blocks' shortcut when the shape changes (see the module docstring)."""
KERNEL = 32
"""The paper's filter width (32×1)."""
PADDING = ((KERNEL - 1) // 2, KERNEL // 2)
"""Zeros before and after each convolution's input: the output length is ``⌈L / stride⌉``."""


def _convolution(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    """A zero-padded width-32 convolution whose output length is ``⌈L / stride⌉``."""
    return nn.Sequential(nn.ConstantPad1d(PADDING, 0.0),
                         nn.Conv1d(in_channels, channels, KERNEL, stride, bias=False))


class PoolShortcut(nn.Module):
    """A parameter-free shortcut: max-pool by ``stride`` (windows of ``stride``; the last one
    partial, so the length is ``⌈L / stride⌉`` as the main branch's), then
    ``channels − in_channels`` zero channels appended."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        if channels < in_channels:
            raise ValueError(f"a pool shortcut cannot drop channels ({in_channels} -> "
                             f"{channels})")
        self.pool: nn.Module = (nn.MaxPool1d(stride, stride, ceil_mode=True) if stride > 1
                                else nn.Identity())
        self.extra_channels = channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.pool(x), (0, 0, 0, self.extra_channels))


class ResBlock1d(nn.Module):
    """One residual block (see the module docstring for its layout).

    Args:
        in_channels: input channels.
        channels: output channels of both convolutions.
        stride: the subsample factor of the first convolution and of the shortcut.
        dropout: dropout probability between the convolutions.
        shortcut: ``"projection"`` or ``"pool"`` (:data:`SHORTCUTS`), used when the shape
            changes; the identity otherwise.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 dropout: float = 0.55, shortcut: str = "projection") -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.conv1 = _convolution(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm1d(channels)
        self.relu1 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _convolution(channels, channels, 1)
        self.bn2 = nn.BatchNorm1d(channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = (PoolShortcut(in_channels, channels, stride) if shortcut == "pool"
                             else nn.Sequential(nn.Conv1d(in_channels, channels, 1, stride,
                                                          bias=False),
                                                nn.BatchNorm1d(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.relu1(self.bn1(self.conv1(x))))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResCNN1d(nn.Module):
    """The paper's ResCNN for spectra ``[n, 1, L]`` (Table 1 at ``width=16``, ``L = 288``).

    Block ``b`` (1-based) has ``width·2^⌊(b−1)/2⌋`` filters and stride 2 when ``b`` is odd,
    so ``L = 288`` ends at length 18 with 128 channels. :meth:`feature_maps` is the last
    block's output ``[n, C, L/16]``, :meth:`features` its GAP ``[n, C]``, and ``fc`` maps that
    to the logits; :func:`class_activation_maps` combines them.

    Args:
        num_classes: outputs of the dense layer (2: healthy, tumour).
        width: filters of the input convolution and the first two blocks (paper 16;
            smaller is cheaper on a CPU).
        blocks: residual blocks (paper 8).
        dropout: dropout probability in every block (paper 0.55).
        in_channels: input channels (1 for a spectrum).
        shortcut: the blocks' shortcut where the shape changes: ``"projection"`` (1×1
            convolution + BatchNorm) or ``"pool"`` (max-pool + zero channels, the paper's).
    """

    def __init__(self, num_classes: int = 2, *, width: int = 16, blocks: int = 8,
                 dropout: float = 0.55, in_channels: int = 1,
                 shortcut: str = "projection") -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("width", width),
                            ("blocks", blocks), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.conv = _convolution(in_channels, width, 1)
        self.bn = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        layers, previous = [], width
        for block in range(blocks):
            channels = width * 2 ** (block // 2)
            layers.append(ResBlock1d(previous, channels, 2 if block % 2 == 0 else 1, dropout,
                                     shortcut))
            previous = channels
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[n, C, L']`` (what GAP averages)."""
        return self.blocks(self.relu(self.bn(self.conv(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features ``[n, C]`` (the input of ``fc``)."""
        return self.flatten(self.pool(self.feature_maps(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@torch.no_grad()
def class_activation_maps(model: ResCNN1d, x: torch.Tensor,
                          classes: torch.Tensor | int | None = None) -> torch.Tensor:
    """Class activation maps (Zhou et al. 2016, the paper's §4.4) of spectra ``x [n, 1, L]``.

    ``CAM_c(t) = Σ_k w_{c,k} f_k(t)``: the last block's feature maps ``f`` weighted by the
    dense layer's row of class ``c`` (so the GAP of ``CAM_c`` plus the bias is the logit of
    ``c``), linearly interpolated back to the input length ``L``. The model runs in eval mode
    (its ``training`` flag is restored).

    Args:
        model: a :class:`ResCNN1d`.
        x: spectra ``[n, 1, L]``.
        classes: the class of each map: one for all, ``[n]`` per spectrum, or ``None`` for
            the predicted class.

    Returns:
        ``[n, L]`` maps, not normalised (their scale is the logit's).
    """
    was_training = model.training
    model.eval()
    try:
        maps = model.feature_maps(x)
        if classes is None:
            classes = model.fc(model.flatten(model.pool(maps))).argmax(1)
        classes = torch.as_tensor(classes, device=x.device).expand(len(x))
        weights = model.fc.weight[classes]  # [n, C]
        cam = torch.einsum("nc,ncl->nl", weights, maps)
        return F.interpolate(cam[:, None], size=x.shape[-1], mode="linear",
                             align_corners=False)[:, 0]
    finally:
        model.train(was_training)
