"""The closed-form head's forward pass, through a copy of the network made for inference.

``params="last"`` on a Linear head (:mod:`fastinfluence.hessian.softmax_head`) needs, of every
sample, the head's input and the softmax output: one no-grad forward pass over the data, which
is nearly all of its cost. :func:`head_feature_pass` runs that pass on a ``torch.fx`` copy of
the network, loaded with the weight snapshot of the :class:`~fastinfluence.functional.
FunctionalModel`, in which:

* every convolution or Linear followed by an eval-mode BatchNorm (with running statistics)
  that the layer registry folds into it (:mod:`fastinfluence.layers`, ``folds_into``) becomes
  one layer with the BatchNorm folded in: ``W' = W·a`` per output channel and ``b' = b·a + c``
  with ``a = γ/√(σ² + ε)``, ``c = β − μa`` (:func:`fastinfluence.layers.norm.fold`, the fold
  the fused tangent pass runs too), which saves a read and a write of every such layer's
  output;
* on CPU in float32, 4-D inputs and the copy's weights are channels-last, the layout oneDNN's
  convolutions are fastest in (on other devices and dtypes the layout is kept: not measured).

Both change results only by floating-point rounding. The copy's output is checked against the
model's on the first samples read; a model that does not trace, whose output differs, or with
nothing to fold or convert runs as it is. :attr:`FeaturePass.description` says which pass ran
and why (``Influence.report.feature_pass``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fastinfluence.functional import FunctionalModel
from fastinfluence.labelled_data import Inputs, first_samples, map_inputs, model_arguments
from fastinfluence.layers.norm import folded_copy
from fastinfluence.layers.registry import folds
from fastinfluence.layers.tracing import trace

__all__ = ["FeaturePass", "head_feature_pass"]

MODULE = "module"
"""The description of the plain pass (``FunctionalModel.logits``), followed by the reason."""
CHECK_SAMPLES = 2
"""Samples of the first batch on which the copy's output is compared with the model's."""


class FeaturePass:
    """How the head's inputs are read: call it on a batch ``x`` for ``(features, output)``, the
    head's input ``[batch, d]`` and the model's output (through the ``FunctionalModel``'s
    ``output`` selector), without gradients.

    Attributes:
        description: ``"fx copy: ..."`` (what was folded and converted) or ``"module: <why>"``;
            it changes to ``"module: ..."`` when the copy fails its check on the first batch.
    """

    def __init__(self, plain: Callable[[Inputs], tuple[torch.Tensor, Any]],
                 fast: Callable[[Inputs], tuple[torch.Tensor, Any]] | None,
                 description: str) -> None:
        self._plain, self._fast, self.description = plain, fast, description
        self._checked = fast is None

    def __call__(self, x: Inputs) -> tuple[torch.Tensor, Any]:
        if not self._checked:  # the copy is trusted only once it matches the model
            self._checked = True
            first = first_samples(x, CHECK_SAMPLES)
            mismatch = _mismatch(self._plain(first), self._fast(first))
            if mismatch is not None:
                self._fast, self.description = None, f"{MODULE}: {mismatch}"
        return (self._fast or self._plain)(x)


def head_feature_pass(fmodel: FunctionalModel) -> FeaturePass:
    """The fastest exact way to read the inputs of ``fmodel``'s selected head (module
    docstring): the fx copy when it has something to gain and matches the model on the first
    samples, else the model itself."""
    plain = _module_pass(fmodel)
    made = _fx_copy(fmodel)
    if isinstance(made, str):
        return FeaturePass(plain, None, f"{MODULE}: {made}")
    graph_module, head_name, changes, channels_last = made
    head = graph_module.get_submodule(head_name)

    def fast(x: Inputs) -> tuple[torch.Tensor, Any]:
        if channels_last:
            x = map_inputs(lambda t: t.contiguous(memory_format=torch.channels_last)
                           if t.ndim == 4 else t, x)
        features, output = _with_head_input(head, graph_module, x)
        return features, output if fmodel.output is None else fmodel.output(output)

    return FeaturePass(plain, fast, f"fx copy: {', '.join(changes)}")


def _module_pass(fmodel: FunctionalModel) -> Callable[[Inputs], tuple[torch.Tensor, Any]]:
    def run(x: Inputs) -> tuple[torch.Tensor, Any]:
        return _with_head_input(fmodel.selection.head, lambda x: fmodel.logits(fmodel.theta, x),
                                x)

    return run


def _with_head_input(head: nn.Module, forward: Callable[..., Any],
                     x: Inputs) -> tuple[torch.Tensor, Any]:
    """The input ``head`` receives during ``forward(x)`` (a module: called with ``x`` as its
    arguments), and that output; no gradients."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            if isinstance(forward, nn.Module):
                args, kwargs = model_arguments(x)
                output = forward(*args, **kwargs)
            else:
                output = forward(x)
    finally:
        hook.remove()
    return captured[0], output


def _fx_copy(fmodel: FunctionalModel) -> tuple[fx.GraphModule, str, list[str], bool] | str:
    """The traced copy with the snapshot's weights, the head's name in it, what changed and
    whether inputs go channels-last; or why there is no copy."""
    model, head = fmodel.model, fmodel.selection.head
    head_name = next(name for name, module in model.named_modules() if module is head)
    traced = trace(model)
    if isinstance(traced, str):  # any tracing failure means the plain pass
        return traced
    tensors = fmodel.tensors(fmodel.theta)
    own = dict(traced.named_parameters()) | dict(traced.named_buffers())
    if head_name not in dict(traced.named_modules()) or not set(own) <= set(tensors):
        return "the traced copy's modules do not match the model's"
    # The copy takes the snapshot's values in place of the model's tensors (no second copy).
    snapshot: dict[int, Any] = {}
    for name, tensor in own.items():
        value = tensors[name].detach().clone()
        if isinstance(tensor, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        snapshot[id(tensor)] = value
    graph_module = copy.deepcopy(traced, snapshot).to(device=fmodel.device)
    changes = []
    for kind, count in _fold_batchnorm(graph_module).items():
        changes.append(f"{count} {kind}-BatchNorm pair{'s' * (count != 1)} folded")
    channels_last = (fmodel.device.type == "cpu" and fmodel.dtype == torch.float32
                     and any(isinstance(m, nn.Conv2d) for m in graph_module.modules()))
    if channels_last:
        graph_module = graph_module.to(memory_format=torch.channels_last)
        changes.append("channels-last")
    if not changes:
        return ("nothing to fold or convert (no eval-mode Conv/Linear-BatchNorm pair, no CPU "
                "float32 Conv2d)")
    return graph_module, head_name, changes, channels_last


def _fold_batchnorm(graph_module: fx.GraphModule) -> Counter[str]:
    """Fold each eval-mode BatchNorm that alone reads an eval-mode layer it folds into (the
    layer registry's ``folds_into``, with matching channels) into it, in place; the number
    folded per kind of layer (``"Conv"``, ``"Linear"``)."""
    modules = dict(graph_module.named_modules())
    folded: Counter[str] = Counter()
    for node in list(graph_module.graph.nodes):
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and len(source.users) == 1):
            continue
        affine, norm = modules[source.target], modules[node.target]
        if (not folds(norm, affine) or affine.training or norm.training
                or norm.running_mean is None or norm.num_features != affine.weight.shape[0]
                or _has_hooks(affine) or _has_hooks(norm)):
            continue
        owner, _, attribute = source.target.rpartition(".")
        setattr(graph_module.get_submodule(owner), attribute, folded_copy(affine, norm))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        kind = type(affine).__name__
        folded["Conv" if kind.startswith("Conv") else kind] += 1
    graph_module.recompile()
    return folded


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own, which a folded copy would not run."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _mismatch(expected: tuple[torch.Tensor, Any], got: tuple[torch.Tensor, Any]) -> str | None:
    """Why the copy's (features, output) are not the model's up to rounding, or ``None``."""
    for what, a, b in (("features", expected[0], got[0]), ("output", expected[1], got[1])):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return f"the fx copy's {what} is not a tensor like the model's"
        if a.shape != b.shape:
            return f"the fx copy's {what} has shape {tuple(b.shape)}, the model's {tuple(a.shape)}"
        tolerance = 1e-10 if a.dtype == torch.float64 else 1e-4
        scale = a.abs().max().item() + 1.0
        error = (a - b).abs().max().item()
        if not error <= tolerance * scale:
            return f"the fx copy's {what} differs from the model's by {error:.2e}"
    return None
