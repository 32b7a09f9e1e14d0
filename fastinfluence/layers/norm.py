"""Normalisations: eval-mode BatchNorm (standing alone, or folded into the affine layer before
it — the one BatchNorm fold of the engine), LayerNorm and GroupNorm."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import (
    NotCovered,
    Options,
    Point,
    Rule,
    Site,
    Step,
    add_tangents,
    register_layer,
)

PER_FEATURE = ("its weight scales each feature: K-FAC has no Kronecker-factored block for it "
               "(leave it out of params)")


def batchnorm_affine(
    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
    weight: torch.Tensor | None, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``y = a·x + c`` per channel: ``a = γ/√(σ² + ε)``,
    ``c = β − μa`` (``γ = 1``, ``β = 0`` when absent); returns ``a``, ``c`` and
    ``1/√(σ² + ε)``."""
    inv_std = torch.rsqrt(running_var + eps)
    scale = inv_std if weight is None else weight * inv_std
    shift = -running_mean * scale if bias is None else bias - running_mean * scale
    return scale, shift, inv_std


def fold(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine layer ``(W, b)`` (output channels on the weight's first axis) followed by
    ``y = a·x + c`` per channel, as one: ``W' = aW``, ``b' = ab + c``."""
    folded_weight = weight * scale.view((-1,) + (1,) * (weight.ndim - 1))
    return folded_weight, shift if bias is None else bias * scale + shift


def folded_copy(affine: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of ``affine`` with the eval-mode BatchNorm ``norm`` folded in (:func:`fold`),
    for inference."""
    with torch.no_grad():
        scale, shift, _ = batchnorm_affine(norm.running_mean, norm.running_var, norm.eps,
                                           norm.weight, norm.bias)
        weight, bias = fold(affine.weight, affine.bias, scale, shift)
    fused = copy.deepcopy(affine)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def scale_and_shift(
    norm: Step, at: Point
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A BatchNorm step as ``y = a·x + c`` per channel, and ``da``, ``dc`` (``[k, C]`` or
    None): ``da = dγ/√(σ² + ε)``, ``dc = dβ − μ·da``."""
    mean = norm.tensor(at, "running_mean")
    scale, shift, inv_std = batchnorm_affine(mean, norm.tensor(at, "running_var"),
                                             norm.module.eps, norm.tensor(at, "weight"),
                                             norm.tensor(at, "bias"))
    dgamma = norm.tangent(at, "weight")
    dbeta = norm.tangent(at, "bias")
    dscale = None if dgamma is None else dgamma * inv_std
    dshift = add_tangents(None if dscale is None else -mean * dscale, dbeta)
    return scale, shift, dscale, dshift


def _per_channel_tangent(
    dy: torch.Tensor | None, x: torch.Tensor, normalized: torch.Tensor, k: int,
    dscale: torch.Tensor | None, dshift: torch.Tensor | None, per_channel: tuple[int, ...],
) -> torch.Tensor | None:
    """``dy + x̂·da + dc`` with ``da``, ``dc`` ``[k, C]`` on the channel axis, as
    ``[k·B, ...]``."""
    if dscale is not None:
        dy = add_tangents(dy, normalized * dscale.view(k, 1, *per_channel))
    if dshift is not None:
        term = dshift.view(k, 1, *per_channel)
        dy = term.expand(k, *x.shape) if dy is None else dy + term
    return None if dy is None else dy.reshape(k * len(x), *x.shape[1:])


class BatchNorm(Rule):
    """An eval-mode BatchNorm on its own: ``y = a·x + c`` per channel (dim 1)."""

    kind = "norm"
    reads = ("weight", "bias", "running_mean", "running_var")

    def configure(self, site: Site) -> Options | str:
        if site.module.running_mean is None or site.module.running_var is None:
            return f"{site.name}: BatchNorm without running statistics"
        return {}

    def run(self, step, at, x, dx):
        scale, shift, dscale, dshift = scale_and_shift(step, at)
        k = at.k
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        y = x * scale.view(per_channel) + shift.view(per_channel)
        dy = None if dx is None else (dx.view(k, *x.shape) * scale.view(per_channel))
        return y, _per_channel_tangent(dy, x, x, k, dscale, dshift, per_channel)


def _standardised(x: torch.Tensor, dims: tuple[int, ...],
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x̂ = (x − mean)/√(var + ε)`` over ``dims`` (biased variance) and ``1/√(var + ε)``."""
    centred = x - x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    return centred * inv_std, inv_std


def _standardised_tangent(d: torch.Tensor, normalized: torch.Tensor, inv_std: torch.Tensor,
                          dims: tuple[int, ...]) -> torch.Tensor:
    """The tangent of ``x̂`` for input tangents ``d`` ``[k, *x.shape]``:
    ``(dx − mean(dx) − x̂·mean(x̂·dx))/√(var + ε)`` over ``dims``."""
    return (d - d.mean(dims, keepdim=True)
            - normalized * (d * normalized).mean(dims, keepdim=True)) * inv_std


@register_layer(nn.LayerNorm, kfac=NotCovered(PER_FEATURE))
class LayerNorm(Rule):
    """``y = x̂·γ + β``, ``x̂`` standardised over the trailing ``normalized_shape`` axes;
    ``dy = γ·dx̂ + x̂·dγ + dβ`` (see :func:`_standardised_tangent`)."""

    kind = "layernorm"
    reads = ("weight", "bias")

    def configure(self, site: Site) -> Options | str:
        shape = tuple(site.module.normalized_shape)
        if len(site.input_shape) <= len(shape) or site.input_shape[-len(shape):] != shape:
            return (f"{site.name}: LayerNorm{list(shape)} on an input of shape "
                    f"{list(site.input_shape)}")
        return {"dims": tuple(range(-len(shape), 0))}

    def run(self, step, at, x, dx):
        module, dims, k = step.module, step.options["dims"], at.k
        weight = step.tensor(at, "weight")
        y = F.layer_norm(x, module.normalized_shape, weight, step.tensor(at, "bias"),
                         module.eps)
        normalized, inv_std = _standardised(x, dims, module.eps)
        dy = None
        if dx is not None:
            dy = _standardised_tangent(dx.view(k, *x.shape), normalized, inv_std, dims)
            if weight is not None:
                dy = dy * weight
        lead = (1,) * (x.ndim - len(dims))
        dweight, dbias = step.tangent(at, "weight"), step.tangent(at, "bias")
        if dweight is not None:
            dy = add_tangents(dy, normalized * dweight.view(k, *lead, *dweight.shape[1:]))
        if dbias is not None:
            term = dbias.view(k, *lead, *dbias.shape[1:])
            dy = term.expand(k, *x.shape) if dy is None else dy + term
        return y, None if dy is None else dy.reshape(k * len(x), *x.shape[1:])


@register_layer(nn.GroupNorm, kfac=NotCovered(PER_FEATURE))
class GroupNorm(Rule):
    """``y = x̂·γ + β`` per channel (dim 1), ``x̂`` standardised over each group of channels
    and all positions."""

    kind = "groupnorm"
    reads = ("weight", "bias")

    def configure(self, site: Site) -> Options | str:
        shape = site.input_shape
        if len(shape) < 2 or shape[1] != site.module.num_channels:
            return (f"{site.name}: GroupNorm of {site.module.num_channels} channels on an "
                    f"input of shape {list(shape)}")
        return {}

    def run(self, step, at, x, dx):
        module, k = step.module, at.k
        groups = module.num_groups
        weight = step.tensor(at, "weight")
        y = F.group_norm(x, groups, weight, step.tensor(at, "bias"), module.eps)
        normalized, inv_std = _standardised(x.reshape(len(x), groups, -1), (-1,), module.eps)
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        dy = None
        if dx is not None:
            dy = _standardised_tangent(dx.reshape(k, len(x), groups, -1), normalized,
                                       inv_std, (-1,)).reshape(k, *x.shape)
            if weight is not None:
                dy = dy * weight.view(per_channel)
        return y, _per_channel_tangent(dy, x, normalized.reshape(x.shape), k,
                                       step.tangent(at, "weight"), step.tangent(at, "bias"),
                                       per_channel)


BATCHNORM_KFAC = NotCovered("BatchNorm's per-channel scale and shift have no "
                            "Kronecker-factored block (leave them out of params)")
register_layer(nn.BatchNorm1d, kfac=BATCHNORM_KFAC,
               folds_into=(nn.Conv1d, nn.Linear))(BatchNorm())
register_layer(nn.BatchNorm2d, kfac=BATCHNORM_KFAC, folds_into=(nn.Conv2d,))(BatchNorm())
register_layer(nn.BatchNorm3d, kfac=BATCHNORM_KFAC, folds_into=(nn.Conv3d,))
