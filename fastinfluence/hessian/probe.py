"""What one forward pass tells about the model, and whether the closed-form head is its map
(docs/design.md §3, item 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.kfac import KRONECKER_CURVATURES
from fastinfluence.labelled_data import Inputs


@dataclass(frozen=True)
class ModelProbe:
    """What one forward pass on two validation samples tells about the model.

    Attributes:
        num_classes: outputs per sample (0 when the output is not ``[batch, classes]``).
        sample_bytes: bytes of the largest activation of one sample.
        output_is_tensor: whether the (selected) output is a tensor.
        head_reason: why the closed-form head does not apply (``None`` when it does).
    """

    num_classes: int
    sample_bytes: int
    output_is_tensor: bool
    head_reason: str | None


def probe_model(fmodel: FunctionalModel, example: Inputs,
                hessian: str = "auto") -> ModelProbe:
    """One no-grad forward pass on ``example``: output size, largest activation, and whether
    the closed-form head applies for ``hessian``: its structure (an ``nn.Linear`` itself, no
    hooks, no shared parameters, the default loss, no K-FAC asked for) and its numbers (run
    once, output returned unchanged and equal to ``W a + b``, features independent of θ_S;
    checked at θ_S and at a perturbed θ_S by one more forward pass; docs/design.md §3)."""
    model = fmodel.model
    largest = [sum(t[0].numel() * t.element_size() for t in tree_leaves(example))]

    def measure(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim > 0 and len(output):
            largest[0] = max(largest[0], output[0].numel() * output.element_size())

    # The head's structure is read before the probe adds hooks of its own.
    reason = _head_structure_reason(fmodel, hessian)
    hooks = [m.register_forward_hook(measure) for m in model.modules()]
    try:
        output, calls = _run_with_head(fmodel, fmodel.theta, example,
                                       fmodel.selection.head if reason is None else None)
    finally:
        for hook in hooks:
            hook.remove()
    is_tensor = isinstance(output, torch.Tensor)
    if fmodel.uses_cross_entropy and not (is_tensor and output.ndim == 2):
        shape = tuple(output.shape) if is_tensor else type(output).__name__
        raise ValueError(
            f"the default cross-entropy loss needs [batch, classes] logits; the model returned "
            f"{shape} (pass output= to pick the logits from it, or loss_fn for other outputs)"
        )
    num_classes = output.shape[1] if is_tensor and output.ndim == 2 else 0
    if reason is None:
        reason = _head_map_reason(fmodel, example, output, calls)
    return ModelProbe(num_classes, largest[0], is_tensor, reason)


@dataclass(frozen=True)
class _HeadCall:
    """One call of the head during a forward pass: its input and output, and their version
    counters then (an in-place op afterwards bumps them)."""

    features: torch.Tensor
    output: torch.Tensor
    versions: tuple[int, int]

    def changed_in_place(self) -> bool:
        return (self.features._version, self.output._version) != self.versions


def _run_with_head(fmodel: FunctionalModel, theta: torch.Tensor, example: Inputs,
                   head: nn.Module | None) -> tuple[Any, list[_HeadCall]]:
    """The model's output at ``theta`` on ``example`` (no gradients) and every call of
    ``head`` during it."""
    calls: list[_HeadCall] = []

    def keep(_module, inputs, output) -> None:
        features = inputs[0] if inputs else None
        if isinstance(features, torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append(_HeadCall(features, output, (features._version, output._version)))

    hook = None if head is None else head.register_forward_hook(keep)
    try:
        with torch.no_grad():
            output = fmodel.logits(theta, example)
    finally:
        if hook is not None:
            hook.remove()
    return output, calls


def _head_structure_reason(fmodel: FunctionalModel, hessian: str) -> str | None:
    """Why the closed form cannot be ``fmodel``'s map for ``hessian``, from the selection, the
    loss and the head's module alone (``None`` when nothing rules it out)."""
    model, head = fmodel.model, fmodel.selection.head
    if head is None:
        return "the selected parameters are not exactly one nn.Linear's weight and bias"
    if not fmodel.uses_cross_entropy:
        return "a custom loss_fn (the closed form is for softmax cross-entropy)"
    if hessian in KRONECKER_CURVATURES:
        return (f"hessian={hessian!r} was asked for (the closed form is the head's exact "
                "Hessian, which K-FAC only approximates)")
    name = next(n for n, module in model.named_modules() if module is head)
    shown = repr(name) if name else "the model itself"
    if type(head) is not nn.Linear:
        return (f"the head {shown} is a {type(head).__qualname__}, not nn.Linear itself (a "
                "subclass may compute something else)")
    if "forward" in vars(head):
        return f"the head {shown} has its forward replaced on the instance"
    if head._forward_hooks or head._forward_pre_hooks:
        return f"the head {shown} has forward hooks, which may change what it computes"
    if _global_forward_hooks():
        return ("global module forward hooks are registered "
                "(nn.modules.module.register_module_forward_hook), which may change what "
                "the head computes")
    prefix = f"{name}." if name else ""
    own = {prefix + local: id(p) for local, p in head.named_parameters(recurse=False)}
    shared = [n for n, p in model.named_parameters(remove_duplicate=False)
              if id(p) in own.values() and n not in own]
    if shared:
        return (f"the head's parameters are shared with {', '.join(shared)} (tied weights: "
                "the head's input depends on them)")
    return None


def _global_forward_hooks() -> bool:
    """Whether forward (pre-)hooks are registered for every module (a private registry of
    torch's; absent means none can be seen)."""
    registry = nn.modules.module
    return bool(getattr(registry, "_global_forward_hooks", None)
                or getattr(registry, "_global_forward_pre_hooks", None))


def _head_map_reason(fmodel: FunctionalModel, example: Inputs, output: Any,
                     calls: list[_HeadCall]) -> str | None:
    """Why the model's output on ``example`` is not ``W a + b`` of the head's input ``a``, or
    ``a`` depends on θ_S (``None`` when the closed form is the model's map there).

    Checked at θ_S and again at a perturbed θ_S: the head runs once, its output is the
    model's, unchanged in place, and equals ``W a + b`` in float64; ``a`` is the same at both.
    """
    reason = _head_call_reason(fmodel, fmodel.theta, output, calls)
    if reason is not None:
        return reason
    theta = fmodel.theta
    generator = torch.Generator(device="cpu").manual_seed(0)
    shift = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    moved = theta + (shift * (theta.abs().mean().item() + 1.0)).to(theta)
    moved_output, moved_calls = _run_with_head(fmodel, moved, example, fmodel.selection.head)
    reason = _head_call_reason(fmodel, moved, moved_output, moved_calls)
    if reason is not None:
        return reason
    before, after = calls[0].features.double(), moved_calls[0].features.double()
    # The same computation twice: equal but for non-deterministic kernels' rounding.
    tolerance = torch.finfo(calls[0].features.dtype).eps ** 0.5
    if not bool(((after - before).abs() <= tolerance * before.abs().amax()).all()):
        return ("the head's input changes with the head's own parameters (they are used "
                "before the head)")
    return None


def _head_call_reason(fmodel: FunctionalModel, theta: torch.Tensor, output: Any,
                      calls: list[_HeadCall]) -> str | None:
    """Why ``output`` at ``theta`` is not the head's single call ``W a + b`` (or ``None``)."""
    if len(calls) > 1:
        return (f"the head runs {len(calls)} times in one forward pass (the closed form needs "
                "it exactly once)")
    if not calls or calls[0].output is not output:
        return "the model's output is not the selected Linear layer's output"
    call = calls[0]
    if call.changed_in_place():
        return "the head's input or output is changed in place after the head runs"
    if call.features.ndim != 2:
        return "the Linear layer's input is not [batch, features]"
    weight, *bias = (t.double() for t in fmodel.selection.unflatten(theta).values())
    features = call.features.double()
    expected = F.linear(features, weight, bias[0] if bias else None)
    # Rounding in z = W a + b is bounded by |W| |a| + |b| entry by entry.
    bound = F.linear(features.abs(), weight.abs(), bias[0].abs() if bias else None)
    error = (output.double() - expected).abs()
    tolerance = _rounding_tolerance(output.dtype, features.shape[1] + 1)
    if bool((error > tolerance * bound).any()):
        worst = (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
        return (f"the model's output differs from the head's W a + b (by up to {worst:.2g} of "
                "|W| |a| + |b|): something after the head changes it")
    return None


def _rounding_tolerance(dtype: torch.dtype, terms: int) -> float:
    """Relative bound on the rounding of a sum of ``terms`` products in ``dtype``: Higham's
    ``γ_n ≈ n·u`` for the model's sum and as much again for ours, with a margin of 2
    (``2n·eps``); float32 matmuls of reduced precision (TF32 keeps 10 mantissa bits) round
    each product to about ``2^-11``, so ``1e-2`` there."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return 1e-2
    return 2 * terms * torch.finfo(dtype).eps
