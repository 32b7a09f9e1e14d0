"""Convolutions: ``nn.Conv1d`` and ``nn.Conv2d`` (tangent rules; K-FAC for 2-d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.linear import Affine
from fastinfluence.layers.registry import (
    KroneckerRule,
    NotCovered,
    Options,
    Site,
    Step,
    register_layer,
)


class Convolution(Affine):
    """A zero-padded 1-d or 2-d convolution on ``[B, C, L]`` or ``[B, C, H, W]``."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.function = F.conv1d if dims == 1 else F.conv2d

    def configure(self, site: Site) -> Options | str:
        name = type(site.module).__name__
        if site.module.padding_mode != "zeros":
            return f"{site.name}: {name} padding_mode {site.module.padding_mode!r}"
        if isinstance(site.module.padding, str):
            return f"{site.name}: {name} padding={site.module.padding!r} (give it as numbers)"
        if len(site.input_shape) != self.dims + 2:
            return (f"{site.name}: {name} on a {len(site.input_shape)}-d input (needs "
                    f"{self.dims + 2}-d [B, C, ...])")
        return {}

    def apply(self, step, inputs, weight, bias=None):
        m = step.module
        return self.function(inputs, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def channel_dim(self, ndim: int) -> int:
        return 1

    def groups(self, step: Step) -> int:
        return step.module.groups

    def prepare_weight(self, weight, x):
        if x.is_contiguous(memory_format=torch.channels_last):
            return weight.contiguous(memory_format=torch.channels_last)
        return weight


class Conv2dFactors(KroneckerRule):
    """A Conv2d's input patches (``unfold``) at every output pixel ``t`` (Grosse & Martens
    2016)."""

    def check(self, module):
        if module.groups != 1 or module.padding_mode != "zeros":
            return "K-FAC supports Conv2d with groups=1 and zero padding only"
        return None

    def patches(self, module, x):
        unfolded = F.unfold(x, module.kernel_size, module.dilation, module.padding,
                            module.stride)
        return unfolded.transpose(1, 2)

    def positions(self, gradient):
        return gradient.flatten(2).transpose(1, 2)

    def projected_patches(self, module, x, projection):
        # Projecting every patch is a convolution with the projection's rows as its k
        # filters (unfold orders a patch as the weight does: channel, then kernel row and
        # column), without the T·in·k² patches: on the gradient store of the paper CNN at
        # 32², unfold and the product were half of the build.
        filters = projection.view(len(projection), x.shape[1], *module.kernel_size)
        projected = F.conv2d(x, filters, None, module.stride, module.padding, module.dilation)
        return projected.flatten(2).transpose(1, 2)


register_layer(nn.Conv1d, kfac=NotCovered(
    "K-FAC's factors are implemented for Conv2d, not Conv1d"))(Convolution(dims=1))
register_layer(nn.Conv2d, kfac=Conv2dFactors())(Convolution(dims=2))
