"""Shape and wiring: flatten, transpose, constant padding, identity and eval-mode dropout,
residual adds (parameter-free)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import Options, Rule, Site, add_tangents, register_layer


@register_layer(nn.Dropout, nn.Identity)
class Identity(Rule):
    """Dropout (eval mode) and Identity: dropped from the program."""

    kind = "identity"

    def run(self, step, at, x, dx):
        return x, dx


@register_layer(nn.Flatten, torch.flatten, "flatten")
class Flatten(Rule):
    """``flatten(start, end)`` of primal and tangent (never over the batch dimension)."""

    kind = "flatten"

    def configure(self, site: Site) -> Options | str:
        if site.module is not None:
            start, end = site.module.start_dim, site.module.end_dim
        else:
            values = site.arguments(("start_dim", "end_dim"))
            if values is None:
                return f"{site.name}: flatten with extra arguments is not supported"
            start, end = values.get("start_dim", 0), values.get("end_dim", -1)
        if start % len(site.input_shape) == 0:
            return "a flatten over the batch dimension is not supported"
        return {"dims": (start, end)}

    def run(self, step, at, x, dx):
        start, end = step.options["dims"]
        return x.flatten(start, end), None if dx is None else dx.flatten(start, end)


@register_layer(torch.transpose, "transpose")
class Transpose(Rule):
    """``transpose(dim0, dim1)`` of primal and tangent (never of the batch dimension)."""

    kind = "transpose"

    def configure(self, site: Site) -> Options | str:
        values = site.arguments(("dim0", "dim1"))
        if values is None or set(values) != {"dim0", "dim1"}:
            return f"{site.name}: transpose needs exactly dim0 and dim1"
        dims = (values["dim0"], values["dim1"])
        if any(not isinstance(d, int) or d % len(site.input_shape) == 0 for d in dims):
            return f"{site.name}: a transpose of the batch dimension is not supported"
        return {"dims": dims}

    def run(self, step, at, x, dx):
        dims = step.options["dims"]
        return x.transpose(*dims), None if dx is None else dx.transpose(*dims)


@register_layer(nn.ConstantPad1d, nn.ConstantPad2d, nn.ZeroPad1d, nn.ZeroPad2d)
class ConstantPad(Rule):
    """Constant padding (ConstantPad1d/2d, ZeroPad1d/2d): the primal is padded with the
    module's value, the tangent with 0 (the padding does not move with θ)."""

    kind = "pad"

    def configure(self, site: Site) -> Options | str:
        return {"padding": tuple(site.module.padding), "value": float(site.module.value)}

    def run(self, step, at, x, dx):
        padding, value = step.options["padding"], step.options["value"]
        y = F.pad(x, padding, value=value)
        return y, None if dx is None else F.pad(dx, padding)


@register_layer(operator.add, torch.add, "add")
class Add(Rule):
    """``a + b`` of two computed values of one shape (a residual connection): the tangents
    add."""

    kind = "add"
    arity = 2

    def configure(self, site: Site) -> Options | str:
        if len(site.node.args) != 2 or site.node.kwargs:
            return f"{site.name}: add with extra arguments is not supported"
        if site.inputs[0] != site.inputs[1]:
            return (f"{site.name}: add of shapes {site.inputs[0]} and {site.inputs[1]} "
                    f"(broadcasting) is not supported")
        return {}

    def run(self, step, at, a, da, b, db):
        return a + b, add_tangents(da, db)
