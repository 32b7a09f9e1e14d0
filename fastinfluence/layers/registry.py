"""The layer registry: what the engine knows about each layer type, in one place.

Each key — a module type (matched exactly by the fused tangent pass, by ``isinstance`` by
K-FAC), a function a traced model calls (``F.relu``), or a tensor method's name (``"relu"``) —
has a :class:`LayerRules` entry with up to three aspects:

* ``tangent``: the fused tangent pass's :class:`Rule` (:mod:`fastinfluence.tangent`), which
  runs a traced node's primal and tangent together;
* ``kfac``: the :class:`KroneckerRule` that reads the layer's input activations and output
  gradients into K-FAC's factors (:mod:`fastinfluence.hessian.kfac`), or a :class:`NotCovered`
  that says why there is none (its reason is part of K-FAC's refusal);
* ``folds_into``: for an eval-mode normalisation, the affine layer types it folds into when
  it alone reads their output (the fused pass and the head's inference copy,
  :mod:`fastinfluence.feature_pass`, both fold with :func:`fastinfluence.layers.norm.fold`).

:func:`register_layer` adds aspects; :func:`layer_rules` reads an entry;
:func:`temporary_registrations` undoes the registrations made inside a block. The families'
registrations live in one file each (``fastinfluence/layers/linear.py``, ``conv.py``, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import fx, nn

Tensors = dict[str, torch.Tensor]
Options = Mapping[str, Any]
Shape = tuple[int, ...]
Key = type[nn.Module] | Callable[..., Any] | str
"""A registry key: a module type, a function, or a tensor method's name."""


# --- the fused tangent pass's rules -------------------------------------------------------


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
    on the example batch; ``()`` for a value that is not a tensor (a module's tuple of
    outputs, such as ``nn.MultiheadAttention``'s).
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
    """One stage of a :class:`~fastinfluence.tangent.TangentProgram`: a rule with what it
    needs, resolved.

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
    """How one kind of node runs in the fused tangent pass.

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


def add_tangents(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where ``None`` is a zero tangent."""
    if a is None:
        return b
    return a if b is None else a + b


# --- K-FAC's factor rules -----------------------------------------------------------------


class KroneckerRule:
    """How K-FAC reads a layer ``y_t = W a_t (+ b)`` at positions ``t`` into its factors
    (:mod:`fastinfluence.hessian.kfac`): the weight's first axis is the output, the rest
    flattened is the input ``a_t`` — or, with ``transposed``, the weight is stored
    ``[in, out]`` (an Embedding's ``[num_embeddings, dim]``).

    Subclasses give the input patches ``a_t`` and the output gradients per position from what
    a forward hook sees (the module's first input, the gradient of its output).
    """

    transposed: bool = False

    def check(self, module: nn.Module) -> str | None:
        """Why K-FAC cannot factor this module (``None``: it can)."""
        return None

    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input patches ``[B, T, in]`` of the module's input ``x`` (no bias column)."""
        raise NotImplementedError

    def positions(self, gradient: torch.Tensor) -> torch.Tensor:
        """The gradient of the module's output as ``[B, T, out]``."""
        raise NotImplementedError

    def projected_patches(self, module: nn.Module, x: torch.Tensor,
                          projection: torch.Tensor) -> torch.Tensor:
        """``patches(module, x) @ projectionᵀ`` ``[B, T, k]`` for a ``[k, in]`` projection (the
        gradient store's ``P_in a_t``); a rule may compute it without the patches."""
        return self.patches(module, x) @ projection.T


class NotCovered(KroneckerRule):
    """A layer type whose parameters K-FAC declines, and why (shown in its refusal)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def check(self, module: nn.Module) -> str | None:
        return self.reason


# --- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRules:
    """Everything registered for one key (see the module docstring); absent aspects are
    ``None`` / empty."""

    tangent: Rule | None = None
    kfac: KroneckerRule | None = None
    folds_into: tuple[type[nn.Module], ...] = ()


_REGISTRY: dict[Key, LayerRules] = {}
R = TypeVar("R", bound="Rule | type[Rule]")


def register_layer(
    *keys: Key,
    kfac: KroneckerRule | None = None,
    folds_into: Sequence[type[nn.Module]] = (),
) -> Callable[[R], R]:
    """Register what the engine knows about layer types; use it as a class decorator for the
    tangent rule.

    ``kfac`` and ``folds_into`` are registered at once for every key; the returned decorator
    registers a tangent :class:`Rule` — a subclass (instantiated without arguments) or an
    instance — for them and returns it unchanged. A later registration of an aspect replaces
    the earlier one; the other aspects stay.

    Example (the rule then runs every ``nn.LeakyReLU`` of a traced model)::

        @register_layer(nn.LeakyReLU)
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

    Args:
        keys: module types (exact type for the tangent rule; subclasses too for ``kfac``),
            functions, or tensor methods' names.
        kfac: how K-FAC factors the layer's parameters, or :class:`NotCovered` with why not.
        folds_into: (normalisations) the affine module types this layer folds into.
    """
    if not keys:
        raise TypeError("register_layer needs at least one module type, function or method")
    for key in keys:
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(f"register_layer: {key!r} is not a module type, function or "
                            f"method name")
        if kfac is not None and not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(f"register_layer: kfac= needs module types, got {key!r}")
        entry = _REGISTRY.get(key, LayerRules())
        if kfac is not None:
            entry = replace(entry, kfac=kfac)
        if folds_into:
            entry = replace(entry, folds_into=tuple(folds_into))
        _REGISTRY[key] = entry

    def decorate(rule: R) -> R:
        instance = rule() if isinstance(rule, type) else rule
        if not isinstance(instance, Rule):
            raise TypeError(f"register_layer: {rule!r} is not a tangent Rule")
        for key in keys:
            _REGISTRY[key] = replace(_REGISTRY[key], tangent=instance)
        return rule

    return decorate


def layer_rules(key: Key) -> LayerRules | None:
    """The entry registered for exactly ``key`` (a module type, function or method name)."""
    return _REGISTRY.get(key)


def registered() -> dict[Key, LayerRules]:
    """Every entry, in registration order (a copy)."""
    return dict(_REGISTRY)


@contextmanager
def temporary_registrations() -> Iterator[None]:
    """Undo, on leaving the block, every :func:`register_layer` call made inside it: the
    registry is restored to its entries at entry (a replaced aspect comes back, a new key goes).

    For trying a rule out, or a test that registers a layer::

        with temporary_registrations():
            register_layer(nn.LeakyReLU)(LeakyReLURule)
            ...  # scored with the rule
        # nn.LeakyReLU is unsupported again
    """
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def kfac_rule(module: nn.Module) -> tuple[type[nn.Module], KroneckerRule] | None:
    """The K-FAC rule of ``module``'s type or nearest registered base class (K-FAC reads a
    layer through hooks, so a subclass such as attention's ``NonDynamicallyQuantizableLinear``
    is its base), with the type it is registered for."""
    for kind in type(module).__mro__:
        entry = _REGISTRY.get(kind)
        if entry is not None and entry.kfac is not None:
            return kind, entry.kfac
    return None


def folds(norm: nn.Module, affine: nn.Module) -> bool:
    """Whether the registry folds ``norm`` into ``affine`` (exact types)."""
    entry = _REGISTRY.get(type(norm))
    return entry is not None and type(affine) in entry.folds_into


def supported() -> str:
    """What the tangent pass covers, for reasons that say what would work."""
    kinds: dict[str, list[str]] = {"modules": [], "functions": [], "methods": []}
    for key, entry in _REGISTRY.items():
        if entry.tangent is None:
            continue
        if isinstance(key, str):
            kinds["methods"].append(f"Tensor.{key}")
        elif isinstance(key, type):
            kinds["modules"].append(key.__name__)
        else:
            kinds["functions"].append(f"{key.__module__}.{key.__name__}")
    return "; ".join(f"{kind} {', '.join(names)}" for kind, names in kinds.items())
