"""A fused forward-mode pass: per-sample directional derivatives of a layer chain.

For a direction ``d`` over θ_S, scoring needs ``dᵀ∇_θ l(z_i)`` for every sample — the
tangent of the per-sample losses when θ moves along ``d`` (docs/design.md §3). The general
engine gets it from ``torch.func.jvp``, which is this module's slow, obviously-right twin.
For models that are a plain chain of common eval-mode layers, :class:`TangentProgram` runs the
same derivative by hand, cheaper:

* an eval-mode BatchNorm right after a Conv2d/Linear is folded into it: with
  ``a = γ/√(σ² + ε)``, the pair is one affine layer ``W' = aW``, ``b' = a(b − μ) + β``, and
  its tangent ``dW' = a·dW + da·W``, ``db' = a·db + da·(b − μ) + dβ`` (``da = dγ/√(σ² + ε)``)
  costs parameter-sized work instead of passes over activations;
* an affine layer's primal and input tangent are one convolution on the batch ``[x; dx]``
  (``W'`` is shared), plus one for the parameter tangent ``conv(x, dW')``;
* a ReLU followed by max-pooling runs as pool-then-ReLU (they commute; the tangent picks the
  same window element), on a quarter of the values;
* on CPU, 4-d activations are kept channels-last: the contiguous-layout max-pool kernel is
  ~10× slower there, and the convolutions avoid layout conversions.

Several directions ``d_1..d_k`` share the primal pass: tangents are stacked as ``[k·B, ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

Tensors = dict[str, torch.Tensor]

_AFFINE = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_IDENTITIES = (nn.Dropout, nn.Identity)
_FUNCTIONS: dict[Callable[..., torch.Tensor], str] = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    torch.flatten: "flatten",
}
SUPPORTED = (
    "Conv2d (zero padding), Linear, eval-mode BatchNorm1d/2d with running statistics, ReLU, "
    "Tanh, Sigmoid, MaxPool2d, Flatten/torch.flatten (not over the batch), Dropout, Identity"
)


@dataclass(frozen=True)
class Step:
    """One stage of a :class:`TangentProgram`.

    ``kind`` is ``"affine"`` (``module`` a Conv2d or Linear, with ``norm`` folded in when an
    eval-mode BatchNorm follows it), ``"norm"`` (a BatchNorm on its own), ``"relu"``,
    ``"tanh"``, ``"sigmoid"``, ``"maxpool"`` or ``"flatten"`` (``flatten`` = start/end dims).
    """

    kind: str
    name: str = ""
    module: nn.Module | None = None
    norm_name: str = ""
    norm: nn.Module | None = None
    flatten: tuple[int, int] = (1, -1)


@dataclass(frozen=True)
class Point:
    """Where and along what the pass differentiates: every parameter and buffer by name, the
    ``k`` directions as ``[k, *shape]`` per selected parameter (others absent = zero)."""

    tensors: Tensors
    tangents: Tensors
    k: int


class TangentProgram:
    """Primal outputs and their tangents along several parameter directions, layer by layer.

    Build it with :meth:`compile`; it reads tensors by their ``named_parameters`` /
    ``named_buffers`` names (the same dictionary ``torch.func.functional_call`` takes), so the
    caller's module is never written to.
    """

    def __init__(self, steps: list[Step], channels_last: bool) -> None:
        self.steps = steps
        self.channels_last = channels_last

    @classmethod
    def compile(
        cls, model: nn.Module, example: torch.Tensor, tensors: Tensors, selected
    ) -> tuple[TangentProgram | None, str | None]:
        """The program for ``model``, or ``None`` and why it does not apply.

        The model must trace with ``torch.fx`` to a chain (each operation takes the previous
        one's output and nothing else computed) of the layers in :data:`SUPPORTED`.
        """
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception as error:  # any tracing failure means: use torch.func.jvp
            return None, f"torch.fx could not trace the model ({type(error).__name__}: {error})"
        steps: list[Step] = []
        previous: fx.Node | None = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if previous is not None:
                    return None, "the model takes more than one input"
                previous = node
                continue
            inputs = node.all_input_nodes
            if inputs != [previous] or len(previous.users) != 1:
                return None, f"the model is not a chain of layers (at {node.name!r})"
            if node.op == "output":
                break
            step = _step(model, node)
            if isinstance(step, str):
                return None, step
            steps.append(step)
            previous = node
        return cls(_fused(steps), channels_last=example.device.type == "cpu"), None

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the program prefers (channels-last 4-d on CPU)."""
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(
        self, tensors: Tensors, tangents: Tensors, x: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs ``[B, ...]`` for input ``x`` and their tangents ``[k, B, ...]``.

        Args:
            tensors: every parameter and buffer by name.
            tangents: the directions, ``[k, *shape]`` per selected parameter (others absent).
            x: an input batch.
            k: the number of directions.
        """
        at = Point(tensors, tangents, k)
        tangent: torch.Tensor | None = None
        for step in self.steps:
            x = self.layout(x)  # no-ops when already in the preferred layout
            tangent = None if tangent is None else self.layout(tangent)
            x, tangent = _run(step, at, x, tangent)
        if tangent is None:
            tangent = torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)
        return x, tangent.reshape(k, *x.shape)


def _step(model: nn.Module, node: fx.Node) -> Step | str:
    """The step for one traced node, or why it is not supported."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        kind = type(module)
        if isinstance(module, _AFFINE):
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                return f"{node.target}: Conv2d padding_mode {module.padding_mode!r}"
            return Step("affine", node.target, module)
        if isinstance(module, _NORMS):
            if module.running_mean is None:
                return f"{node.target}: BatchNorm without running statistics"
            return Step("norm", node.target, module)
        if kind in _ACTIVATIONS:
            return Step(_ACTIVATIONS[kind])
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                return f"{node.target}: MaxPool2d(return_indices=True)"
            return Step("maxpool", node.target, module)
        if isinstance(module, nn.Flatten):
            return _flatten_step(module.start_dim, module.end_dim)
        if isinstance(module, _IDENTITIES):
            return Step("identity")
        return f"{node.target} ({kind.__name__}) is not supported; supported: {SUPPORTED}"
    flattens = node.op == "call_method" and node.target == "flatten"
    if flattens or node.op == "call_function" and node.target in _FUNCTIONS:
        kind = "flatten" if flattens else _FUNCTIONS[node.target]
        if kind == "flatten":
            values = dict(zip(("start_dim", "end_dim"), node.args[1:], strict=False))
            values.update(node.kwargs)
            return _flatten_step(values.get("start_dim", 0), values.get("end_dim", -1))
        if len(node.args) > 1 or set(node.kwargs) - {"inplace"}:
            return f"{node.name}: {kind} with extra arguments is not supported"
        return Step(kind)
    return f"{node.name} ({node.op} {node.target}) is not supported; supported: {SUPPORTED}"


def _flatten_step(start: int, end: int) -> Step | str:
    if start == 0:
        return "a flatten over the batch dimension is not supported"
    return Step("flatten", flatten=(start, end))


def _fused(steps: list[Step]) -> list[Step]:
    """Fold each BatchNorm into the affine layer before it; run ReLU→max-pool as pool→ReLU."""
    fused: list[Step] = []
    for step in steps:
        last = fused[-1] if fused else None
        if step.kind == "identity":
            continue
        if (step.kind == "norm" and last is not None and last.kind == "affine"
                and last.norm is None):
            fused[-1] = Step("affine", last.name, last.module, step.name, step.module)
        elif step.kind == "maxpool" and last is not None and last.kind == "relu":
            fused[-1:] = [step, last]
        else:
            fused.append(step)
    return fused


def _run(
    step: Step, at: Point, x: torch.Tensor, dx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step: the primal ``[B, ...]`` and the tangent ``[k·B, ...]`` (``None`` = zero)."""
    if step.kind == "affine":
        return _affine(step, at, x, dx)
    if step.kind == "norm":
        return _norm(step, at, x, dx)
    if step.kind == "maxpool":
        return _maxpool(step.module, x, dx, at.k)
    if step.kind == "flatten":
        start, end = step.flatten
        return x.flatten(start, end), None if dx is None else dx.flatten(start, end)
    if step.kind == "relu":
        y = torch.relu(x)
        slope = x > 0
    elif step.kind == "tanh":
        y = torch.tanh(x)
        slope = 1 - y * y
    else:
        y = torch.sigmoid(x)
        slope = y * (1 - y)
    if dx is None:
        return y, None
    return y, (dx.view(at.k, *x.shape) * slope).reshape(dx.shape)


def _scale_and_shift(
    name: str, norm: nn.Module, at: Point
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A BatchNorm as ``y = a·x + c`` per channel, and ``da``, ``dc`` (``[k, C]`` or None)."""
    inv_std = torch.rsqrt(at.tensors[f"{name}.running_var"] + norm.eps)
    mean = at.tensors[f"{name}.running_mean"]
    gamma = at.tensors.get(f"{name}.weight")
    beta = at.tensors.get(f"{name}.bias")
    scale = inv_std if gamma is None else gamma * inv_std
    shift = -mean * scale if beta is None else beta - mean * scale
    dgamma = at.tangents.get(f"{name}.weight")
    dbeta = at.tangents.get(f"{name}.bias")
    dscale = None if dgamma is None else dgamma * inv_std
    dshift = _add(None if dscale is None else -mean * dscale, dbeta)
    return scale, shift, dscale, dshift


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _affine(
    step: Step, at: Point, x: torch.Tensor, dx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    module, k = step.module, at.k
    weight = at.tensors[f"{step.name}.weight"]
    bias = at.tensors.get(f"{step.name}.bias")
    dweight = at.tangents.get(f"{step.name}.weight")
    dbias = at.tangents.get(f"{step.name}.bias")
    if step.norm is not None:
        scale, shift, dscale, dshift = _scale_and_shift(step.norm_name, step.norm, at)
        per_out = (-1,) + (1,) * (weight.ndim - 1)
        if dweight is not None:
            dweight = dweight * scale.view(per_out)
        if dscale is not None:
            dweight = _add(dweight, dscale.view(k, *per_out) * weight)
            if bias is not None:
                dshift = dshift + dscale * bias
        if dbias is not None:
            dbias = dbias * scale
        dbias = _add(dbias, dshift)
        weight = weight * scale.view(per_out)
        bias = shift if bias is None else bias * scale + shift

    if isinstance(module, nn.Conv2d):
        if x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)

        def apply(inputs: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
            return F.conv2d(inputs, w, b, module.stride, module.padding, module.dilation,
                            module.groups)

        channel_dim = 1
    else:

        def apply(inputs: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
            return F.linear(inputs, w, b)

        channel_dim = x.ndim - 1

    if dx is None:
        y = apply(x, weight, bias)
        dy = None
    else:
        both = apply(torch.cat([x, dx]), weight)
        y, dy = both[: len(x)], both[len(x):]
        if bias is not None:
            y = y + bias.view((-1,) + (1,) * (y.ndim - channel_dim - 1))
    if dweight is not None:
        dy = _add(dy, _parameter_tangent(apply, x, dweight, module, channel_dim, k))
    if dbias is not None:
        shape = (k, 1, -1) + (1,) * (y.ndim - channel_dim - 1)
        if dy is None:
            dy = dbias.view(shape).expand(k, *y.shape).reshape(k * len(y), *y.shape[1:])
        else:
            dy = (dy.view(k, *y.shape) + dbias.view(shape)).reshape(dy.shape)
    return y, dy


def _parameter_tangent(
    apply: Callable[..., torch.Tensor],
    x: torch.Tensor,
    dweight: torch.Tensor,
    module: nn.Module,
    channel_dim: int,
    k: int,
) -> torch.Tensor:
    """``apply(x, dW_j)`` for every direction j, as ``[k·B, ...]``: one call with ``k·C_out``
    output channels (per direction for grouped convolutions, whose channel order differs)."""
    if k > 1 and getattr(module, "groups", 1) != 1:
        return torch.cat([apply(x, dweight[j]) for j in range(k)])
    out = apply(x, dweight.reshape(-1, *dweight.shape[2:]))
    channels = out.shape[channel_dim] // k
    out = out.unflatten(channel_dim, (k, channels)).movedim(channel_dim, 0)
    return out.reshape(k * len(x), *out.shape[2:])


def _norm(
    step: Step, at: Point, x: torch.Tensor, dx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scale, shift, dscale, dshift = _scale_and_shift(step.name, step.module, at)
    k = at.k
    per_channel = (-1,) + (1,) * (x.ndim - 2)
    y = x * scale.view(per_channel) + shift.view(per_channel)
    dy = None if dx is None else (dx.view(k, *x.shape) * scale.view(per_channel))
    if dscale is not None:
        dy = _add(dy, x * dscale.view(k, 1, *per_channel))
    if dshift is not None:
        term = dshift.view(k, 1, *per_channel)
        dy = term.expand(k, *x.shape) if dy is None else dy + term
    return y, None if dy is None else dy.reshape(k * len(x), *x.shape[1:])


def _maxpool(
    pool: nn.MaxPool2d, x: torch.Tensor, dx: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    y, index = F.max_pool2d_with_indices(
        x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
    )
    if dx is None:
        return y, None
    index = index.flatten(2).repeat(k, 1, 1)
    return y, dx.flatten(2).gather(2, index).view(k * len(x), *y.shape[1:])
