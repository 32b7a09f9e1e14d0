"""Affine layers: the :class:`Affine` tangent rule (with a BatchNorm folded in) and
``nn.Linear``'s rules."""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.norm import fold, scale_and_shift
from fastinfluence.layers.registry import KroneckerRule, Rule, Step, add_tangents, register_layer


class Affine(Rule):
    """``y = apply(x, W) + b`` with ``apply`` linear in each argument (a convolution, a matrix
    product), optionally with a BatchNorm folded in; subclasses say what ``apply`` is and
    which axis of the output holds its channels.

    An affine layer's primal and input tangent are one ``apply`` on the batch ``[x; dx]``
    (``W`` is shared), plus one for the parameter tangent ``apply(x, dW)``. With a BatchNorm
    ``y = a·x + c`` folded in (:func:`~fastinfluence.layers.norm.fold`), ``W' = aW``,
    ``b' = ab + c`` and ``dW' = a·dW + da·W``, ``db' = a·db + dc + da·b``: parameter-sized
    work instead of passes over activations.
    """

    kind = "affine"
    reads = ("weight", "bias")

    @abstractmethod
    def apply(self, step: Step, inputs: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on ``inputs`` with ``weight`` and ``bias``."""

    @abstractmethod
    def channel_dim(self, ndim: int) -> int:
        """The output's channel axis, for an output with ``ndim`` dimensions."""

    def groups(self, step: Step) -> int:
        """Groups of the layer's weight (1 but for grouped convolutions)."""
        return 1

    def prepare_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``weight`` in the layout the layer runs fastest with on ``x``."""
        return weight

    def folds(self, step: Step) -> bool:
        """Whether a BatchNorm (channels on dim 1) after this step can be folded into it."""
        return step.norm is None and self.channel_dim(len(step.shape)) == 1

    def run(self, step, at, x, dx):
        k = at.k
        weight = step.tensor(at, "weight")
        bias = step.tensor(at, "bias")
        dweight = step.tangent(at, "weight")
        dbias = step.tangent(at, "bias")
        if step.norm is not None:
            scale, shift, dscale, dshift = scale_and_shift(step.norm, at)
            per_out = (-1,) + (1,) * (weight.ndim - 1)
            if dweight is not None:
                dweight = dweight * scale.view(per_out)
            if dscale is not None:
                dweight = add_tangents(dweight, dscale.view(k, *per_out) * weight)
                if bias is not None:
                    dshift = dshift + dscale * bias
            if dbias is not None:
                dbias = dbias * scale
            dbias = add_tangents(dbias, dshift)
            weight, bias = fold(weight, bias, scale, shift)
        weight = self.prepare_weight(weight, x)
        channel_dim = self.channel_dim(x.ndim)
        if dx is None:
            y = self.apply(step, x, weight, bias)
            dy = None
        else:
            both = self.apply(step, torch.cat([x, dx]), weight)
            y, dy = both[: len(x)], both[len(x):]
            if bias is not None:
                y = y + bias.view((-1,) + (1,) * (y.ndim - channel_dim - 1))
        if dweight is not None:
            dy = add_tangents(dy, self._parameter_tangent(step, x, dweight, channel_dim, k))
        if dbias is not None:
            shape = (k,) + (1,) * channel_dim + (-1,) + (1,) * (y.ndim - channel_dim - 1)
            if dy is None:
                dy = dbias.view(shape).expand(k, *y.shape).reshape(k * len(y), *y.shape[1:])
            else:
                dy = (dy.view(k, *y.shape) + dbias.view(shape)).reshape(dy.shape)
        return y, dy

    def _parameter_tangent(
        self, step: Step, x: torch.Tensor, dweight: torch.Tensor, channel_dim: int, k: int
    ) -> torch.Tensor:
        """``apply(x, dW_j)`` for every direction j, as ``[k·B, ...]``: one call with
        ``k·C_out`` output channels (per direction for grouped convolutions, whose channel
        order differs)."""
        if k > 1 and self.groups(step) != 1:
            return torch.cat([self.apply(step, x, dweight[j]) for j in range(k)])
        out = self.apply(step, x, dweight.reshape(-1, *dweight.shape[2:]))
        channels = out.shape[channel_dim] // k
        out = out.unflatten(channel_dim, (k, channels)).movedim(channel_dim, 0)
        return out.reshape(k * len(x), *out.shape[2:])


class LinearFactors(KroneckerRule):
    """A Linear on ``[B, ..., in]``: every middle position is a position ``t`` (a
    transformer's sequence positions, like a convolution's pixels)."""

    def patches(self, module, x):
        return x.reshape(len(x), -1, x.shape[-1])

    def positions(self, gradient):
        return gradient.reshape(len(gradient), -1, gradient.shape[-1])


@register_layer(nn.Linear, kfac=LinearFactors())
class Linear(Affine):
    """``x Wᵀ + b`` over the last axis of ``[B, ..., F]``."""

    def apply(self, step, inputs, weight, bias=None):
        return F.linear(inputs, weight, bias)

    def channel_dim(self, ndim: int) -> int:
        return ndim - 1
