"""A fused forward-mode pass: per-sample directional derivatives of a layer graph.

For a direction ``d`` over θ_S, scoring needs ``dᵀ∇_θ l(z_i)`` for every sample — the
tangent of the per-sample losses when θ moves along ``d`` (docs/design.md §3). The general
engine gets it from ``torch.func.jvp``, which is this module's slow, obviously-right twin.
For models built from common eval-mode layers — chains, and graphs whose branches meet in
residual adds — :class:`TangentProgram` runs the same derivative by hand, cheaper:

* an eval-mode BatchNorm that is the only reader of a Conv2d/Linear whose output channels
  are the BatchNorm's (dim 1) is folded into it: with ``a = γ/√(σ² + ε)``, the pair is one
  affine layer ``W' = aW``, ``b' = a(b − μ) + β``, and its tangent ``dW' = a·dW + da·W``,
  ``db' = a·db + da·(b − μ) + dβ`` (``da = dγ/√(σ² + ε)``) costs parameter-sized work
  instead of passes over activations;
* an affine layer's primal and input tangent are one convolution on the batch ``[x; dx]``
  (``W'`` is shared), plus one for the parameter tangent ``conv(x, dW')``;
* a ReLU read only by a max-pool runs as pool-then-ReLU (they commute; the tangent picks the
  same window element), on a quarter of the values;
* on CPU, 4-d activations are kept channels-last: the contiguous-layout max-pool kernel is
  ~10× slower there, and the convolutions avoid layout conversions.

Several directions ``d_1..d_k`` share the primal pass: tangents are stacked as ``[k·B, ...]``.

**Rules.** Every traced node is run by the :class:`Rule` registered for its module type
(:data:`MODULE_RULES`, exact type), function (:data:`FUNCTION_RULES`) or tensor method
(:data:`METHOD_RULES`). A rule says which of the module's tensors it reads (``reads``, by
attribute name), checks a node at compile time (:meth:`Rule.configure`: its options for
:meth:`Rule.run`, or why it cannot run it) and runs primal and tangent together. Supporting
a new layer is one rule; for example ``nn.LeakyReLU``::

    class LeakyReLURule(Rule):
        kind = "leaky_relu"

        def configure(self, site):
            return {"slope": site.module.negative_slope}

        def run(self, step, at, x, dx):
            slope = step.options["slope"]
            y = F.leaky_relu(x, slope)
            if dx is None:
                return y, None
            factor = torch.full_like(x, slope).masked_fill_(x > 0, 1.0)
            return y, per_direction(dx, x, at.k, factor)

    MODULE_RULES[nn.LeakyReLU] = LeakyReLURule()

**Compiling** (:meth:`TangentProgram.compile`) resolves, once, every tensor a rule reads to
its key in the caller's tensors dictionary — the first name ``named_parameters()`` /
``named_buffers()`` give that tensor object, so a weight shared by two layers is read, and
differentiated, under one name at both uses. It runs the traced model on an example batch
to know every activation's shape (a BatchNorm is folded only into a layer whose output
channel axis is dim 1). Steps read and write values by traced node name, and a value is
dropped after its last reader (a chain holds one activation at a time). Finally it runs the
program on two samples along a random direction and compares it, in float64
(:data:`CHECK_DTYPE`), with ``torch.func.jvp``: any mismatch or exception means no program,
and the reason.
"""

from __future__ import annotations

import itertools
import operator
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastinfluence.modes import eval_mode

Tensors = dict[str, torch.Tensor]
Options = Mapping[str, Any]
Shape = tuple[int, ...]

CHECK_SAMPLES = 2
"""How many samples of the example the one-time numerical check runs on."""
CHECK_DIRECTIONS = 1
"""How many random directions the check takes: one, as each costs the twin a full ``jvp``
(~3 forward passes); the stacked layout of k > 1 is covered by the float64 tests."""


CHECK_DTYPE = torch.float64
"""The precision the check compares in, whatever the model's dtype (see :data:`CHECK_TOLERANCE`)."""
CHECK_TOLERANCE = torch.finfo(CHECK_DTYPE).eps ** (2 / 3)
"""The largest relative error the check accepts, ``ε^(2/3)`` = 3.7e-11 in float64.

The check verifies the rules, which do not depend on the dtype, so it runs in float64: in
float32 the comparison measures rounding more than rules. A max-pool window whose two
largest values differ by less than float32 rounding picks either element depending on the
order of the sums, and their tangents differ by O(1) — one such window of 2,048 on two
samples of the paper CNN at 128² gave 2.6e-3, so the correct pass fell back to ``jvp``
there; TF32 products on CUDA differ by ~1e-3 besides. In float64
reordered sums leave a few ε times the depth (~1e-15 on the paper CNN), near-ties are
~5·10⁸ times rarer, and a wrong rule is off by O(1) of the affected values (a constant rounded
to float32 by ~1e-7): ``ε^(2/3)`` lies ≥ 10⁴ above the first and ≥ 10³ below the others.
"""


@dataclass(frozen=True)
class Point:
    """Where and along what the pass differentiates: every parameter and buffer by name, the
    ``k`` directions as ``[k, *shape]`` per selected parameter (others absent = zero)."""

    tensors: Tensors
    tangents: Tensors
    k: int


@dataclass(frozen=True)
class Site:
    """A traced node as a rule sees it at compile time.

    ``module`` is the called submodule (``None`` for a function or method), ``inputs`` the
    shapes of its inputs (the rule's ``arity`` first arguments) and ``shape`` of its output
    on the example batch.
    """

    node: fx.Node
    module: nn.Module | None
    inputs: tuple[Shape, ...] = ()
    shape: Shape = ()

    @property
    def name(self) -> str:
        """The module's name, or the node's for a function or method."""
        return str(self.node.target) if self.module is not None else self.node.name

    @property
    def input_shape(self) -> Shape:
        """The shape of the (first) input."""
        return self.inputs[0]

    def arguments(self, names: Sequence[str]) -> dict[str, Any] | None:
        """The node's arguments after its inputs, by name; ``None`` if one is not in ``names``."""
        extra = self.node.args[len(self.inputs):]
        if len(extra) > len(names) or set(self.node.kwargs) - set(names):
            return None
        values = dict(zip(names, extra, strict=False))
        values.update(self.node.kwargs)
        return values


@dataclass(frozen=True, eq=False)
class Step:
    """One stage of a :class:`TangentProgram`: a rule with what it needs, resolved.

    ``inputs`` and ``output`` name the values it reads and writes (traced node names);
    ``keys`` maps the rule's ``reads`` to keys of the tensors dictionary (``None``: the module
    has no such tensor, e.g. ``bias=False``); ``norm`` is a BatchNorm step folded into this
    (affine) one.
    """

    rule: Rule
    name: str
    inputs: tuple[str, ...]
    output: str
    module: nn.Module | None = None
    keys: Mapping[str, str | None] = field(default_factory=dict)
    options: Options = field(default_factory=dict)
    shape: Shape = ()
    norm: Step | None = None

    @property
    def kind(self) -> str:
        """The rule's kind (``"affine"``, ``"norm"``, ``"relu"``, ...)."""
        return self.rule.kind

    def tensor(self, at: Point, role: str) -> torch.Tensor | None:
        """The tensor the rule reads as ``role`` (``"weight"``, ...), under its resolved key."""
        key = self.keys.get(role)
        return None if key is None else at.tensors[key]

    def tangent(self, at: Point, role: str) -> torch.Tensor | None:
        """The directions of ``role``'s tensor, ``None`` when it is not selected."""
        key = self.keys.get(role)
        return None if key is None else at.tangents.get(key)


class Rule(ABC):
    """How one kind of node runs in the fused pass (see the module docstring).

    ``kind`` names the step; ``arity`` is how many computed values it takes (its first
    arguments; the rest must be constants); ``reads`` are the attribute names of the module's
    tensors that :meth:`run` reads through :meth:`Step.tensor` / :meth:`Step.tangent`;
    ``commutes_with_max_pool`` lets a following max-pool run first (monotone, elementwise).
    """

    kind: str = ""
    arity: int = 1
    reads: tuple[str, ...] = ()
    commutes_with_max_pool: bool = False

    def configure(self, site: Site) -> Options | str:
        """The options :meth:`run` needs for this node, or why the rule cannot run it."""
        return {}

    @abstractmethod
    def run(
        self, step: Step, at: Point, x: torch.Tensor, dx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The primal ``[B, ...]`` and the tangent ``[k·B, ...]`` (``None`` = zero) of the
        input ``x`` with tangent ``dx``; a rule with ``arity`` n takes n such pairs."""


def per_direction(dx: torch.Tensor, x: torch.Tensor, k: int, factor: torch.Tensor) -> torch.Tensor:
    """``dx`` (``[k·B, ...]``) times ``factor`` (shaped like ``x``) for each direction."""
    return (dx.view(k, *x.shape) * factor).reshape(dx.shape)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


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


class Identity(Rule):
    """Dropout (eval mode) and Identity: dropped from the program."""

    kind = "identity"

    def run(self, step, at, x, dx):
        return x, dx


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


class MaxPool2d(Rule):
    """Max-pooling; the tangent takes the element the primal's window picked."""

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


class BatchNorm(Rule):
    """An eval-mode BatchNorm on its own: ``y = a·x + c`` per channel (dim 1)."""

    kind = "norm"
    reads = ("weight", "bias", "running_mean", "running_var")

    def configure(self, site: Site) -> Options | str:
        if site.module.running_mean is None or site.module.running_var is None:
            return f"{site.name}: BatchNorm without running statistics"
        return {}

    def run(self, step, at, x, dx):
        scale, shift, dscale, dshift = _scale_and_shift(step, at)
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


def _scale_and_shift(
    norm: Step, at: Point
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A BatchNorm as ``y = a·x + c`` per channel, and ``da``, ``dc`` (``[k, C]`` or None)."""
    inv_std = torch.rsqrt(norm.tensor(at, "running_var") + norm.module.eps)
    mean = norm.tensor(at, "running_mean")
    gamma = norm.tensor(at, "weight")
    beta = norm.tensor(at, "bias")
    scale = inv_std if gamma is None else gamma * inv_std
    shift = -mean * scale if beta is None else beta - mean * scale
    dgamma = norm.tangent(at, "weight")
    dbeta = norm.tangent(at, "bias")
    dscale = None if dgamma is None else dgamma * inv_std
    dshift = _add(None if dscale is None else -mean * dscale, dbeta)
    return scale, shift, dscale, dshift


class Affine(Rule):
    """``y = apply(x, W) + b`` with ``apply`` linear in each argument (a convolution, a matrix
    product), optionally with a BatchNorm folded in; subclasses say what ``apply`` is and
    which axis of the output holds its channels."""

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
            scale, shift, dscale, dshift = _scale_and_shift(step.norm, at)
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
            dy = _add(dy, self._parameter_tangent(step, x, dweight, channel_dim, k))
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


class Linear(Affine):
    """``x Wᵀ + b`` over the last axis of ``[B, ..., F]``."""

    def apply(self, step, inputs, weight, bias=None):
        return F.linear(inputs, weight, bias)

    def channel_dim(self, ndim: int) -> int:
        return ndim - 1


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
        return a + b, _add(da, db)


RELU = Elementwise("relu", torch.relu, lambda x, y: x > 0, commutes_with_max_pool=True)
TANH = Elementwise("tanh", torch.tanh, lambda x, y: 1 - y * y)
SIGMOID = Elementwise("sigmoid", torch.sigmoid, lambda x, y: y * (1 - y))
FLATTEN = Flatten()
IDENTITY = Identity()
ADD = Add()
CONSTANT_PAD = ConstantPad()

MODULE_RULES: dict[type[nn.Module], Rule] = {
    nn.Conv1d: Convolution(dims=1),
    nn.Conv2d: Convolution(dims=2),
    nn.Linear: Linear(),
    nn.BatchNorm1d: BatchNorm(),
    nn.BatchNorm2d: BatchNorm(),
    nn.ReLU: RELU,
    nn.Tanh: TANH,
    nn.Sigmoid: SIGMOID,
    nn.MaxPool2d: MaxPool2d(),
    nn.AvgPool1d: AveragePool(dims=1),
    nn.AvgPool2d: AveragePool(dims=2),
    nn.AdaptiveAvgPool1d: AveragePool(dims=1),
    nn.AdaptiveAvgPool2d: AveragePool(dims=2),
    nn.Flatten: FLATTEN,
    nn.ConstantPad1d: CONSTANT_PAD,
    nn.ConstantPad2d: CONSTANT_PAD,
    nn.ZeroPad1d: CONSTANT_PAD,
    nn.ZeroPad2d: CONSTANT_PAD,
    nn.Dropout: IDENTITY,
    nn.Identity: IDENTITY,
}
"""The rule for each module type (exact type: a subclass may compute something else)."""
FUNCTION_RULES: dict[Callable[..., Any], Rule] = {
    torch.relu: RELU,
    F.relu: RELU,
    torch.tanh: TANH,
    torch.sigmoid: SIGMOID,
    torch.flatten: FLATTEN,
    operator.add: ADD,
    torch.add: ADD,
}
"""The rule for each function a traced model may call."""
METHOD_RULES: dict[str, Rule] = {"flatten": FLATTEN, "relu": RELU, "tanh": TANH,
                                 "sigmoid": SIGMOID, "add": ADD}
"""The rule for each tensor method a traced model may call."""


def supported() -> str:
    """What the registry covers, for reasons that say what would work."""
    modules = ", ".join(kind.__name__ for kind in MODULE_RULES)
    functions = ", ".join(f"{f.__module__}.{f.__name__}" for f in FUNCTION_RULES)
    methods = ", ".join(f"Tensor.{name}" for name in METHOD_RULES)
    return f"modules {modules}; functions {functions}; methods {methods}"


class TangentProgram:
    """Primal outputs and their tangents along several parameter directions, layer by layer.

    Build it with :meth:`compile`; it reads tensors by the keys resolved then (the same
    dictionary ``torch.func.functional_call`` takes), so the caller's module is never written
    to.
    """

    def __init__(self, steps: list[Step], channels_last: bool, source: str, result: str) -> None:
        self.steps = steps
        self.channels_last = channels_last
        self.source = source
        self.result = result
        # after each step, drop the values no later step reads (memory as in a chain)
        last_use = {name: i for i, step in enumerate(steps) for name in step.inputs}
        last_use[result] = len(steps)
        self.releases = [
            tuple(name for name in {*step.inputs, step.output} if last_use.get(name, i) == i)
            for i, step in enumerate(steps)
        ]

    @classmethod
    def compile(
        cls,
        model: nn.Module,
        example: torch.Tensor,
        tensors: Mapping[str, torch.Tensor],
        selected: Sequence[str],
    ) -> tuple[TangentProgram | None, str | None]:
        """The checked program for ``model`` (in eval mode), or ``None`` and why not.

        The model must trace with ``torch.fx`` to a graph of one input and one output whose
        every operation has a rule (:func:`supported`), reads only parameters and buffers
        present in ``tensors``, and takes computed values only as the rule's inputs.

        Args:
            model: the caller's module (only read).
            example: an input batch (≥ 1 sample) on the compute device and dtype; the program
                keeps activations channels-last when it is on CPU.
            tensors: every parameter and buffer by name (``named_parameters`` /
                ``named_buffers`` names), as :meth:`forward` will get them.
            selected: the names of the parameters :meth:`forward` gets tangents for.
        """
        if example.ndim == 0 or len(example) == 0:
            raise ValueError(f"example must be a batch of at least one sample, got shape "
                             f"{tuple(example.shape)}")
        missing = [name for name in selected if name not in tensors]
        if missing:
            return None, f"selected parameter {missing[0]!r} is not in the tensors"
        with eval_mode(model):
            built = _build(model, example, tensors)
            if isinstance(built, str):
                return None, built
            steps, source, result = built
            program = cls(steps, example.device.type == "cpu", source, result)
            failure = program._check(model, example[:CHECK_SAMPLES], tensors, selected)
        return (None, failure) if failure is not None else (program, None)

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
        values: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {self.source: (x, None)}
        for step, releases in zip(self.steps, self.releases, strict=True):
            arguments: list[torch.Tensor | None] = []
            for name in step.inputs:
                value, tangent = values[name]  # layouts: no-ops when already preferred
                arguments += [self.layout(value), None if tangent is None else self.layout(tangent)]
            values[step.output] = step.rule.run(step, at, *arguments)
            for name in releases:
                del values[name]
        x, tangent = values[self.result]
        if tangent is None:
            tangent = torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)
        return x, tangent.reshape(k, *x.shape)

    def _check(
        self,
        model: nn.Module,
        x: torch.Tensor,
        tensors: Mapping[str, torch.Tensor],
        selected: Sequence[str],
    ) -> str | None:
        """Why this program disagrees with ``torch.func.jvp`` on ``x`` along seeded random
        directions over ``selected``, primal and tangents, compared in :data:`CHECK_DTYPE`
        (``None``: it agrees within :data:`CHECK_TOLERANCE`). The program also runs once in
        the caller's precision, where a rule may fail that runs in float64."""
        generator = torch.Generator().manual_seed(0)
        k = CHECK_DIRECTIONS
        precise = {name: _in_check_precision(tensor) for name, tensor in tensors.items()}
        directions = {
            name: torch.randn((k, *tensors[name].shape), generator=generator,
                              dtype=CHECK_DTYPE).to(precise[name])
            for name in selected
        }
        primals = {name: precise[name] for name in selected}
        x_precise = self.layout(_in_check_precision(x))  # the twin runs faster in it too

        def logits(chosen: Tensors) -> torch.Tensor:
            return torch.func.functional_call(model, {**precise, **chosen}, (x_precise,))

        try:
            working = self.forward(dict(tensors), {name: d.to(tensors[name])
                                                   for name, d in directions.items()},
                                   self.layout(x), k)
            outputs, tangents = self.forward(precise, directions, x_precise, k)
            expected = [
                torch.func.jvp(logits, (primals,), ({n: d[j] for n, d in directions.items()},))
                for j in range(k)
            ]
        except Exception as error:  # any failure of the fused pass means: use jvp
            return (f"numerical check against torch.func.jvp raised {type(error).__name__}: "
                    f"{error}")
        expected_tangents = torch.stack([tangent for _, tangent in expected])
        shapes = [tuple(value.shape) for value in (*working, outputs, tangents)]
        wanted = [tuple(expected[0][0].shape), tuple(expected_tangents.shape)] * 2
        if shapes != wanted:
            return (f"numerical check against torch.func.jvp failed: output shapes "
                    f"{shapes[0]}, {shapes[1]} ({x.dtype}) and {shapes[2]}, {shapes[3]} "
                    f"({CHECK_DTYPE}) instead of {wanted[0]}, {wanted[1]}")
        error = max(_relative_error(outputs, expected[0][0]),
                    _relative_error(tangents, expected_tangents))
        if not error <= CHECK_TOLERANCE:  # also catches NaN
            return (f"numerical check against torch.func.jvp failed: max relative error "
                    f"{error:.1e} in {CHECK_DTYPE} (tolerance {CHECK_TOLERANCE:.1e})")
        return None


def _in_check_precision(tensor: torch.Tensor) -> torch.Tensor:
    """A floating-point tensor in :data:`CHECK_DTYPE` (others, e.g. integer counters, as they
    are)."""
    return tensor.to(CHECK_DTYPE) if tensor.is_floating_point() else tensor


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual − expected| / max|expected|`` (0 when both are exactly zero)."""
    difference = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    if difference == 0:
        return 0.0
    return difference / scale if scale > 0 else float("inf")


def _build(
    model: nn.Module, example: torch.Tensor, tensors: Mapping[str, torch.Tensor]
) -> tuple[list[Step], str, str] | str:
    """The fused steps of ``model`` (traced, checked against the example's shapes) with the
    names of its input and output values, or why there are none."""
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:  # any tracing failure means: use torch.func.jvp
        return f"torch.fx could not trace the model ({type(error).__name__}: {error})"
    graph = _graph(graph_module.graph)
    if isinstance(graph, str):
        return graph
    source, operations, result = graph
    keys = _canonical_keys(model)
    found: list[tuple[fx.Node, Rule, nn.Module | None, dict[str, str | None]]] = []
    for node in operations:
        module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        rule = _rule(node, module)
        if isinstance(rule, str):
            return rule
        inputs = node.args[:rule.arity]
        if (len(inputs) != rule.arity or not all(isinstance(n, fx.Node) for n in inputs)
                or set(node.all_input_nodes) != set(inputs)):
            return (f"{node.name}: {rule.kind} must take {rule.arity} computed value(s) as its "
                    f"first argument(s) and constants otherwise")
        resolved: dict[str, str | None] = {}
        for attribute in rule.reads:
            resolved[attribute], reason = _resolve(module, node.target, attribute, keys, tensors)
            if reason is not None:
                return reason
        found.append((node, rule, module, resolved))
    shapes = _shapes(graph_module, example, tensors, keys)
    if isinstance(shapes, str):
        return shapes
    steps: list[Step] = []
    for node, rule, module, resolved in found:
        inputs = node.args[:rule.arity]
        site = Site(node, module, tuple(shapes[n] for n in inputs), shapes[node])
        options = rule.configure(site)
        if isinstance(options, str):
            return options
        steps.append(Step(rule, site.name, tuple(n.name for n in inputs), node.name, module,
                          resolved, options, site.shape))
    fused, result_name = _fused(steps, result.name)
    return fused, source.name, result_name


def _graph(graph: fx.Graph) -> tuple[fx.Node, list[fx.Node], fx.Node] | str:
    """A traced graph's one input, its operations (in order) and the value it returns, or why
    it is not of that form."""
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        return f"the model takes {len(inputs)} inputs (one is supported)"
    (output,) = [node for node in graph.nodes if node.op == "output"]
    result = output.args[0]
    if not isinstance(result, fx.Node) or result is inputs[0]:
        return "the model does not return one computed tensor"
    operations = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    return inputs[0], operations, result


def _rule(node: fx.Node, module: nn.Module | None) -> Rule | str:
    """The registered rule for a node, or why there is none."""
    if module is not None:
        rule = MODULE_RULES.get(type(module))
        described = f"{node.target} ({type(module).__name__})"
    elif node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
        described = f"{node.name} ({node.op} {node.target})"
    elif node.op == "call_method":
        rule = METHOD_RULES.get(node.target)
        described = f"{node.name} ({node.op} {node.target})"
    else:
        rule, described = None, f"{node.name} ({node.op} {node.target})"
    if rule is None:
        return f"{described} is not supported; supported: {supported()}"
    return rule


def _canonical_keys(model: nn.Module) -> dict[int, str]:
    """Each parameter and buffer object's key: the first name the model lists it under."""
    keys: dict[int, str] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        keys.setdefault(id(tensor), name)
    return keys


def _resolve(
    module: nn.Module, name: str, attribute: str, keys: dict[int, str],
    tensors: Mapping[str, torch.Tensor],
) -> tuple[str | None, str | None]:
    """The key of ``module.<attribute>`` in ``tensors`` (``None`` when the module has no such
    tensor), and why it cannot be read (``None`` when it can)."""
    tensor = getattr(module, attribute, None)
    if tensor is None:
        return None, None
    key = keys.get(id(tensor))
    if key is None:
        return None, f"{name}.{attribute} is not a parameter or buffer of the model"
    if key not in tensors:
        return None, f"{name}.{attribute} (named {key!r}) is not in the tensors"
    return key, None


def _shapes(
    graph_module: fx.GraphModule, example: torch.Tensor, tensors: Mapping[str, torch.Tensor],
    keys: dict[int, str],
) -> dict[fx.Node, Shape] | str:
    """Every node's output shape on ``example``: each module run on (the shapes of) the
    caller's tensors, on the meta device, which computes shapes without the arithmetic."""

    class Shapes(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            module = self.fetch_attr(target)
            local = {}
            for name, tensor in itertools.chain(module.named_parameters(),
                                                module.named_buffers()):
                key = keys.get(id(tensor))
                local[name] = tensors.get(key, tensor).to("meta")
            return torch.func.functional_call(module, local, args, kwargs)

        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, torch.Tensor):
                shapes[node] = tuple(value.shape)
            return value

    shapes: dict[fx.Node, Shape] = {}
    try:
        with torch.no_grad():
            Shapes(graph_module).run(example.to("meta"))
    except Exception as error:  # the model cannot run on the example: use torch.func.jvp
        return f"the traced model failed on the example ({type(error).__name__}: {error})"
    return shapes


def _fused(steps: list[Step], result: str) -> tuple[list[Step], str]:
    """Drop identities; fold each BatchNorm into the affine layer that is its input's only
    reader when that layer's output channels are on dim 1; run ReLU→max-pool as pool→ReLU
    when the ReLU's only reader is the pool. Returns the steps and the output's name."""
    alias: dict[str, str] = {}
    kept: list[Step] = []
    for step in steps:
        step = replace(step, inputs=tuple(alias.get(name, name) for name in step.inputs))
        if step.rule is IDENTITY:
            alias[step.output] = step.inputs[0]
        else:
            kept.append(step)
    result = alias.get(result, result)
    readers = Counter(name for step in kept for name in step.inputs)
    readers[result] += 1
    fused: list[Step] = []
    producer: dict[str, int] = {}
    for step in kept:
        source = producer.get(step.inputs[0])
        last = None if source is None or readers[step.inputs[0]] != 1 else fused[source]
        if (isinstance(step.rule, BatchNorm) and last is not None
                and isinstance(last.rule, Affine) and last.rule.folds(last)):
            fused[source] = replace(last, norm=step, output=step.output, shape=step.shape)
            producer[step.output] = source
            continue
        if (isinstance(step.rule, MaxPool2d) and last is not None
                and last.rule.commutes_with_max_pool):
            fused[source] = replace(step, inputs=last.inputs, output=last.output)
            step = replace(last, inputs=(last.output,), output=step.output, shape=step.shape)
        producer[step.output] = len(fused)
        fused.append(step)
    return fused, result
