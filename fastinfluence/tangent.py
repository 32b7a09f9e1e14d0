"""A fused forward-mode pass: per-sample directional derivatives of a layer graph.

For a direction ``d`` over θ_S, scoring needs ``dᵀ∇_θ l(z_i)`` for every sample — the
tangent of the per-sample losses when θ moves along ``d`` (docs/design.md §3). The general
engine gets it from ``torch.func.jvp``, which is this module's slow, obviously-right twin.
For models built from common eval-mode layers — chains, and graphs whose branches meet in
residual adds — :class:`TangentProgram` runs the same derivative by hand, cheaper:

* an eval-mode BatchNorm that is the only reader of an affine layer it folds into (the layer
  registry's ``folds_into``) whose output channels are the BatchNorm's (dim 1) is folded into
  it (:func:`fastinfluence.layers.norm.fold`; its tangent becomes parameter-sized work);
* an affine layer's primal and input tangent are one convolution on the batch ``[x; dx]``
  (``W'`` is shared), plus one for the parameter tangent ``conv(x, dW')``;
* a ReLU read only by a max-pool runs as pool-then-ReLU (they commute; the tangent picks the
  same window element), on a quarter of the values;
* on CPU, 4-d activations are kept channels-last: the contiguous-layout max-pool kernel is
  ~10× slower there, and the convolutions avoid layout conversions.

Several directions ``d_1..d_k`` share the primal pass: tangents are stacked as ``[k·B, ...]``.

**Rules.** Every traced node is run by the tangent :class:`~fastinfluence.layers.Rule` that
the layer registry (:mod:`fastinfluence.layers`) holds for its module type (exact type),
function or tensor method. A rule says which of the module's tensors it reads (``reads``, by
attribute name), checks a node at compile time (``configure``: its options for ``run``, or
why it cannot run it) and runs primal and tangent together. Supporting a new layer is one
:func:`~fastinfluence.layers.register_layer`.

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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import fx, nn

from fastinfluence.functional import differentiable_attention
from fastinfluence.layers.linear import Affine
from fastinfluence.layers.norm import BatchNorm
from fastinfluence.layers.pooling import MaxPool2d
from fastinfluence.layers.registry import (
    Point,
    Rule,
    Shape,
    Site,
    Step,
    Tensors,
    folds,
    layer_rules,
    supported,
)
from fastinfluence.layers.shape import Identity
from fastinfluence.layers.tracing import trace
from fastinfluence.modes import eval_mode

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
        """``x`` in the memory layout the program prefers (channels-last 4-d on CPU); a
        tuple of a module's outputs as it is."""
        if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 4:
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
        # the twin reads the caller's layout: torch's forward-mode GroupNorm, for one, fails
        # on channels-last inputs
        x_precise = _in_check_precision(x)

        def logits(chosen: Tensors) -> torch.Tensor:
            return torch.func.functional_call(model, {**precise, **chosen}, (x_precise,))

        try:
            working = self.forward(dict(tensors), {name: d.to(tensors[name])
                                                   for name, d in directions.items()},
                                   self.layout(x), k)
            outputs, tangents = self.forward(precise, directions, self.layout(x_precise), k)
            with differentiable_attention():  # torch's fused attention kernels have no jvp
                expected = [
                    torch.func.jvp(logits, (primals,),
                                   ({n: d[j] for n, d in directions.items()},))
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
    graph_module = trace(model)
    if isinstance(graph_module, str):  # any tracing failure means: use torch.func.jvp
        return graph_module
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
        site = Site(node, module, tuple(shapes.get(n, ()) for n in inputs),
                    shapes.get(node, ()))
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
    """The registered tangent rule for a node, or why there is none."""
    if module is not None:
        key, described = type(module), f"{node.target} ({type(module).__name__})"
    else:
        key, described = node.target, f"{node.name} ({node.op} {node.target})"
    entry = layer_rules(key) if node.op in ("call_module", "call_function",
                                            "call_method") else None
    if entry is None or entry.tangent is None:
        return f"{described} is not supported; supported: {supported()}"
    return entry.tangent


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
    """The key of ``module.<attribute>`` (a dotted path for a submodule's tensor:
    ``out_proj.weight``) in ``tensors`` (``None`` when the module has no such tensor), and why
    it cannot be read (``None`` when it can)."""
    tensor = module
    for part in attribute.split("."):
        tensor = getattr(tensor, part, None)
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
    """Every tensor-valued node's output shape on ``example`` (a tuple of a module's outputs
    has none: its :class:`Site` shape is ``()``): each module run on (the shapes of) the
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
    reader when the registry folds it into that layer and its output channels are on dim 1;
    run ReLU→max-pool as pool→ReLU when the ReLU's only reader is the pool. Returns the steps
    and the output's name."""
    alias: dict[str, str] = {}
    kept: list[Step] = []
    for step in steps:
        step = replace(step, inputs=tuple(alias.get(name, name) for name in step.inputs))
        if isinstance(step.rule, Identity):
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
                and isinstance(last.rule, Affine) and folds(step.module, last.module)
                and last.rule.folds(last)):
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
