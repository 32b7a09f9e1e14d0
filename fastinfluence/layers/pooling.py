"""Pooling: average (1-d, 2-d, adaptive) and 2-d max pooling (parameter-free)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import Options, Rule, Site, register_layer


class AveragePool(Rule):
    """Average pooling (AvgPool1d/2d, AdaptiveAvgPool1d/2d): linear and parameter-free, so the
    tangent is the same pooling of the input tangent."""

    kind = "avgpool"

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def configure(self, site: Site) -> Options | str:
        if len(site.input_shape) != self.dims + 2:
            return (f"{site.name}: {type(site.module).__name__} on a "
                    f"{len(site.input_shape)}-d input (needs {self.dims + 2}-d [B, C, ...])")
        return {}

    def run(self, step, at, x, dx):
        return step.module(x), None if dx is None else step.module(dx)


@register_layer(nn.MaxPool2d)
class MaxPool2d(Rule):
    """Max-pooling; the tangent takes the element the primal's window picked. (The fused
    pass runs a ReLU read only by a max-pool after it: they commute.)"""

    kind = "maxpool"

    def configure(self, site: Site) -> Options | str:
        if site.module.return_indices:
            return f"{site.name}: MaxPool2d(return_indices=True)"
        if len(site.input_shape) != 4:
            return (f"{site.name}: MaxPool2d on a {len(site.input_shape)}-d input (needs "
                    f"[B, C, H, W])")
        return {}

    def run(self, step, at, x, dx):
        pool = step.module
        y, index = F.max_pool2d_with_indices(
            x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
        )
        if dx is None:
            return y, None
        index = index.flatten(2).repeat(at.k, 1, 1)
        return y, dx.flatten(2).gather(2, index).view(at.k * len(x), *y.shape[1:])


register_layer(nn.AvgPool1d, nn.AdaptiveAvgPool1d)(AveragePool(dims=1))
register_layer(nn.AvgPool2d, nn.AdaptiveAvgPool2d)(AveragePool(dims=2))
