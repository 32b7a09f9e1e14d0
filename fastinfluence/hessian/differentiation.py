"""How a network backend takes directional derivatives: one strategy, chosen once per model.

Network backends take directional derivatives (scores, pairwise, and ``J V`` in Gauss-Newton
products) by the fused tangent pass (:mod:`fastinfluence.tangent`) when it compiles and passes
its numerical check, else by ``torch.func.jvp``, and fall back to reverse mode only (per-sample
``vjp``; products by reverse-over-reverse) for models with an operation that has no
forward-mode derivative, such as the CPU LSTM kernel. :func:`choose_differentiation` picks
one :class:`Differentiation` when the backend is built; its ``name`` and ``reason`` are the
backend's ``scoring`` and ``scoring_reason``. Every strategy answers the same three questions
(:meth:`Differentiation.loss_directional`, :meth:`~Differentiation.output_directional`,
:meth:`~Differentiation.hessian_products`), so the backends never ask which one runs.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fastinfluence.functional import ATTENTION_NOTE, AttentionCalls, FunctionalModel
from fastinfluence.labelled_data import Inputs, first_samples, input_length, map_inputs
from fastinfluence.tangent import TangentProgram

FUSED_TANGENT = "fused-tangent"
TORCH_JVP = "torch.func.jvp"
REVERSE_MODE = "reverse-mode"
BATCHING_FALLBACK_NOTE = "There is a performance drop because we have not yet implemented"
"""The start of torch's warning when ``vmap`` meets an operation without a batching rule (it
then loops over the batch: slower, the same numbers, nothing the caller can change)."""

Batches = Iterable[tuple[Inputs, torch.Tensor]]


def without_batching_fallback_notes(method: Callable) -> Callable:
    """``method`` with torch's :data:`BATCHING_FALLBACK_NOTE` warnings, raised by the ``vmap``
    calls inside it (ours and :class:`FunctionalModel`'s), kept from the caller."""

    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=BATCHING_FALLBACK_NOTE,
                                    category=UserWarning)
            return method(*args, **kwargs)

    return quiet


VMAP_CONTROL_FLOW = "vmap: It looks like you're"
"""The start of ``vmap``'s error for a function that branches on a tensor's value."""

SAMPLE_LOOP_NOTE = ("per-sample gradients and Jacobians ran sample by sample: the model "
                    "branches on tensor values (as Hugging Face's attention-mask code does), "
                    "which torch.func.vmap cannot batch")
"""What ``report.scoring_reason`` says when :func:`per_sample` looped."""


def per_sample(function: Callable, theta: torch.Tensor, x: Inputs, *rest: torch.Tensor,
               on_loop: Callable[[], None] | None = None) -> Any:
    """``function(theta, x_i, *rest_i)`` for every sample ``i``, stacked: one ``vmap`` over
    the samples, or — for a model whose forward branches on tensor values, which ``vmap``
    cannot batch — a loop over them (the same numbers, slower; ``on_loop()`` is called)."""
    try:
        return torch.func.vmap(function, in_dims=(None, 0, *[0] * len(rest)))(theta, x, *rest)
    except RuntimeError as error:
        if not str(error).startswith(VMAP_CONTROL_FLOW):
            raise
    if on_loop is not None:
        on_loop()
    results = [function(theta, map_inputs(lambda t, i=i: t[i], x), *[r[i] for r in rest])
               for i in range(input_length(x, "x"))]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results, strict=True))
    return torch.stack(results)


def per_sample_gradients(fmodel: FunctionalModel, x: Inputs, y: torch.Tensor,
                         on_loop: Callable[[], None] | None = None) -> torch.Tensor:
    """``∇l(z)`` of each sample of the batch ``(x, y)``, ``[n, p]`` (``vmap`` of ``grad``, or
    a loop: :func:`per_sample`)."""

    def single(theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        return fmodel.losses(theta, map_inputs(lambda t: t[None], x), y[None])[0]

    return per_sample(torch.func.grad(single), fmodel.theta, x, y, on_loop=on_loop)


class Differentiation:
    """A way of taking directional derivatives of ``fmodel``.

    Attributes:
        name: ``"fused-tangent"``, ``"torch.func.jvp"`` or ``"reverse-mode"``.
        reason: why a faster way was passed over (``None`` when none was).
    """

    name: str

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason

    def layout(self, x: Inputs) -> Inputs:
        """``x`` as this strategy reads it (the fused pass's memory layout)."""
        return x

    def loss_directional(self, fmodel: FunctionalModel, batches: Batches,
                         directions: torch.Tensor) -> torch.Tensor:
        """``dᵀ∇l(z)`` for each sample of ``batches`` and each row ``d`` of ``directions``,
        ``[n, k]``."""
        raise NotImplementedError

    def output_directional(self, fmodel: FunctionalModel, x: Inputs, vectors: torch.Tensor,
                           logits_of: Callable, pullback: Callable,
                           logits: torch.Tensor) -> torch.Tensor:
        """``J v`` of the model's output on ``x`` for each row ``v`` of ``vectors``
        (``logits_of(θ)``, its ``vjp`` ``pullback`` and ``logits`` at θ_S are given)."""
        raise NotImplementedError

    def hessian_products(self, fmodel: FunctionalModel, grad_fn: Callable,
                         vectors: torch.Tensor) -> torch.Tensor:
        """``∇²f v`` for each row ``v`` of ``vectors``, ``grad_fn = ∇f`` at θ_S."""
        raise NotImplementedError


class ForwardMode(Differentiation):
    """``torch.func.jvp``: forward mode, vectorised over directions."""

    name = TORCH_JVP

    def loss_directional(self, fmodel, batches, directions):
        columns = []
        for x, y in batches:

            def losses(theta: torch.Tensor, x=x, y=y) -> torch.Tensor:
                return fmodel.losses(theta, x, y)

            def along(direction: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(losses, (fmodel.theta,), (direction,))[1]

            columns.append(_each(along, directions).T)
        return torch.cat(columns)

    def output_directional(self, fmodel, x, vectors, logits_of, pullback, logits):
        return _each(lambda v: torch.func.jvp(logits_of, (fmodel.theta,), (v,))[1], vectors)

    def hessian_products(self, fmodel, grad_fn, vectors):
        """Forward-over-reverse: ``jvp`` of ``grad``."""
        return _each(lambda v: torch.func.jvp(grad_fn, (fmodel.theta,), (v,))[1], vectors)


class FusedTangent(ForwardMode):
    """The fused tangent pass (:class:`~fastinfluence.tangent.TangentProgram`): every
    direction in one forward pass; Hessian products forward-over-reverse as for ``jvp``."""

    name = FUSED_TANGENT

    def __init__(self, program: TangentProgram) -> None:
        super().__init__(None)
        self.program = program

    def layout(self, x):
        return self.program.layout(x)

    def loss_directional(self, fmodel, batches, directions):
        tensors = fmodel.tensors(fmodel.theta)
        tangents = fmodel.selection.unflatten(directions)
        columns = []
        for x, y in batches:
            logits, dlogits = self.program.forward(tensors, tangents, x, len(directions))
            columns.append(fmodel.loss_tangents(logits, y, dlogits).T)
        return torch.cat(columns)

    def output_directional(self, fmodel, x, vectors, logits_of, pullback, logits):
        return self.program.forward(fmodel.tensors(fmodel.theta),
                                    fmodel.selection.unflatten(vectors), x, len(vectors))[1]


class ReverseMode(Differentiation):
    """Reverse mode only, for models with an operation that has no forward-mode derivative:
    per-sample gradients for scores, products by reverse-over-reverse."""

    name = REVERSE_MODE

    def loss_directional(self, fmodel, batches, directions):
        return torch.cat([per_sample_gradients(fmodel, x, y) @ directions.T
                          for x, y in batches])

    def output_directional(self, fmodel, x, vectors, logits_of, pullback, logits):
        # u ↦ Jᵀu is linear, so the vjp of that map at any u is J v.
        _, transpose = torch.func.vjp(lambda u: pullback(u)[0], torch.zeros_like(logits))
        return torch.stack([transpose(vector)[0] for vector in vectors])

    def hessian_products(self, fmodel, grad_fn, vectors):
        """Reverse-over-reverse: ``vjp`` of ``grad`` (equal to ``jvp`` of it for a symmetric
        Hessian)."""
        _, pullback = torch.func.vjp(grad_fn, fmodel.theta)
        return torch.stack([pullback(vector)[0] for vector in vectors])


def _each(function: Callable[[torch.Tensor], torch.Tensor],
          vectors: torch.Tensor) -> torch.Tensor:
    """``function`` of each row of ``vectors``, stacked (``vmap`` for more than one)."""
    if len(vectors) == 1:
        return function(vectors[0])[None]
    return torch.func.vmap(function)(vectors)


def choose_differentiation(fmodel: FunctionalModel, example: Inputs) -> Differentiation:
    """The fastest strategy that works for ``fmodel``, with why a faster one was passed over.
    The fused program checks itself against ``jvp`` when it compiles; otherwise one ``jvp`` on
    ``example`` along a seeded direction tells whether forward mode works, and one forward pass
    whether the model runs attention (its kernels are then chosen by
    :func:`~fastinfluence.functional.differentiable_attention`, noted in the reason)."""
    x = first_samples(example, 2)
    if not isinstance(x, torch.Tensor):
        reason = "a model of several inputs (the fused pass takes one input tensor)"
    elif fmodel.output is None:
        program, reason = TangentProgram.compile(
            fmodel.model, x, fmodel.tensors(fmodel.theta), fmodel.selection.names
        )
        if program is not None:
            return FusedTangent(program)
    else:
        reason = "an output= selector (the fused pass reads the model's own output)"
    generator = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn(fmodel.dim, generator=generator, dtype=fmodel.dtype)
    try:
        torch.func.jvp(lambda th: fmodel.logits(th, x), (fmodel.theta,),
                       (direction.to(fmodel.device),))
    except (NotImplementedError, RuntimeError) as error:
        reason, kind = (f"forward-mode differentiation failed ({type(error).__name__}: "
                        f"{_first_line(error)}); scores use per-sample reverse-mode "
                        "gradients"), ReverseMode
    else:
        kind = ForwardMode
    attention = AttentionCalls()
    with attention, torch.no_grad():
        fmodel.logits(fmodel.theta, x)
    if attention.seen:  # the kernels chosen for it differ from the model's own (speed, memory)
        reason = ATTENTION_NOTE if reason is None else f"{reason}; {ATTENTION_NOTE}"
    return kind(reason)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""
