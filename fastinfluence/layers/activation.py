"""Elementwise activations: ReLU, Tanh, Sigmoid, GELU (parameter-free: no K-FAC aspect)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import Options, Rule, Site, per_direction, register_layer


class Elementwise(Rule):
    """``y = f(x)`` elementwise, ``dy = f'(x)·dx`` with ``f'`` from ``x`` and ``y``."""

    def __init__(
        self,
        kind: str,
        function: Callable[[torch.Tensor], torch.Tensor],
        slope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        commutes_with_max_pool: bool = False,
    ) -> None:
        self.kind = kind
        self.function = function
        self.slope = slope
        self.commutes_with_max_pool = commutes_with_max_pool

    def configure(self, site: Site) -> Options | str:
        if site.module is not None:
            inplace = getattr(site.module, "inplace", False)
        else:
            values = site.arguments(("inplace",))
            if values is None:
                return f"{site.name}: {self.kind} with extra arguments is not supported"
            inplace = values.get("inplace", False)
        if inplace and len(site.node.args[0].users) > 1:  # the others would see the result
            return f"{site.name}: an in-place {self.kind} of a value that others read too"
        return {}

    def run(self, step, at, x, dx):
        y = self.function(x)
        return y, None if dx is None else per_direction(dx, x, at.k, self.slope(x, y))


RELU = Elementwise("relu", torch.relu, lambda x, y: x > 0, commutes_with_max_pool=True)
TANH = Elementwise("tanh", torch.tanh, lambda x, y: 1 - y * y)
SIGMOID = Elementwise("sigmoid", torch.sigmoid, lambda x, y: y * (1 - y))
register_layer(nn.ReLU, torch.relu, F.relu, "relu")(RELU)
register_layer(nn.Tanh, torch.tanh, "tanh")(TANH)
register_layer(nn.Sigmoid, torch.sigmoid, "sigmoid")(SIGMOID)


@register_layer(nn.GELU, F.gelu)
class GELU(Rule):
    """``y = x·Φ(x)`` (``approximate="none"``), ``dy = (Φ(x) + x·φ(x))·dx``; with
    ``approximate="tanh"``, ``y = x(1 + tanh u)/2``, ``u = √(2/π)(x + 0.044715x³)``,
    ``dy = [(1 + tanh u)/2 + x(1 − tanh² u)·√(2/π)(1 + 3·0.044715x²)/2]·dx``."""

    kind = "gelu"

    def configure(self, site: Site) -> Options | str:
        if site.module is not None:
            return {"approximate": site.module.approximate}
        values = site.arguments(("approximate",))
        if values is None:
            return f"{site.name}: gelu with extra arguments is not supported"
        return {"approximate": values.get("approximate", "none")}

    def run(self, step, at, x, dx):
        approximate = step.options["approximate"]
        y = F.gelu(x, approximate=approximate)
        if dx is None:
            return y, None
        if approximate == "tanh":
            root = math.sqrt(2 / math.pi)
            t = torch.tanh(root * (x + 0.044715 * x ** 3))
            slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * root * (1 + 3 * 0.044715 * x * x)
        else:
            slope = (0.5 * (1 + torch.erf(x / math.sqrt(2)))
                     + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))
        return y, per_direction(dx, x, at.k, slope)
