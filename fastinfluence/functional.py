"""The model as a pure function of the flat selected parameters θ_S.

Influence is computed on a snapshot of the model's weights, in eval mode, through
``torch.func.functional_call``: the caller's module is never written to. Models in float16 or
bfloat16 are evaluated on a float32 snapshot: inverse-HVP solves do not converge in half
precision.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from fastinfluence.labelled_data import Inputs, model_arguments
from fastinfluence.params import ParameterSelection

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
OutputFn = Callable[[Any], torch.Tensor]
REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def cross_entropy_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: softmax cross-entropy on logits, one value per sample."""
    return F.cross_entropy(logits, targets, reduction="none")


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention on kernels that have every derivative the engine takes.

    ``F.scaled_dot_product_attention``'s fused CPU and GPU kernels have no forward-mode
    derivative and no derivative of their backward, and the inference fast paths of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` (``torch.backends.mha``:
    ``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``, nested tensors) none
    at all; they are taken under ``torch.func`` transforms, whose tensors do not report
    ``requires_grad``. Inside this context attention runs on SDPA's math kernel (the same
    function, plain matrix products and a softmax; it differs by rounding and holds the
    ``[L, L]`` attention matrix) with the fast paths off; both settings are restored on exit.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


ATTENTION_NOTE = ("attention ran on scaled_dot_product_attention's math kernel with torch's "
                  "attention fast paths off: their fused kernels have no forward-mode or "
                  "second derivatives")
"""What ``report.scoring_reason`` says of a network that runs attention under
:func:`differentiable_attention`."""


class AttentionCalls(TorchFunctionMode):
    """While active, records in ``seen`` whether the model ran attention
    (``F.scaled_dot_product_attention`` or ``F.multi_head_attention_forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
            self.seen = True
        return func(*args, **(kwargs or {}))


class ConstantPaddingRows(TorchFunctionMode):
    """While active, ``F.embedding(x, W, padding_idx=k)`` returns its padding positions as
    constants: ``y_t = W[k]`` is detached where ``x_t = k`` (same values).

    By ``nn.Embedding``'s definition the padding row gets no gradient (autograd's backward
    skips it); torch's forward mode still moves ``y_t`` along ``W[k]``. Passes mixing the two
    (Gauss-Newton's ``Jᵀ(∂²l/∂z²)J V`` with ``J V`` by ``jvp``, the exact Hessian's ``jvp`` of
    ``grad``, scores by ``jvp``) would then disagree with autograd in the padding row. With the
    positions detached, every derivative of every order in either mode is the module's: zero
    along the padding row of this call. Detaching positions rather than the row keeps a weight
    tied to another use (a language model's decoder) differentiable there.
    """

    SIGNATURE = inspect.signature(F.embedding)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.embedding:
            return out
        arguments = self.SIGNATURE.bind(*args, **kwargs).arguments
        padding_idx = arguments.get("padding_idx")
        if padding_idx is None:
            return out
        if padding_idx < 0:  # as F.embedding reads it
            padding_idx += arguments["weight"].shape[0]
        padding = (arguments["input"] == padding_idx).unsqueeze(-1)
        return torch.where(padding, out.detach(), out)


def padding_embeddings(model: nn.Module, selected: set[int]) -> list[str]:
    """The ``nn.Embedding`` modules of ``model`` with a ``padding_idx`` whose weight is among
    the tensors ``selected`` (by ``id``): those :class:`ConstantPaddingRows` has work on."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None
            and id(module.weight) in selected]


class FunctionalModel:
    """Logits and per-sample losses as functions of a flat parameter vector θ_S.

    Args:
        model: the caller's module (only read).
        selection: which parameters form θ_S.
        loss_fn: ``loss_fn(output, y) -> [batch]``; ``None`` for cross-entropy on the logits.
        device: where the snapshot lives and the work runs.
        output: picks the tensor the loss and the curvature read from the model's output
            (e.g. ``lambda out: out["logits"]``); ``None`` takes the output as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: ParameterSelection,
        loss_fn: LossFn | None,
        device: torch.device,
        output: OutputFn | None = None,
    ) -> None:
        self.model = model
        self.selection = selection
        self.uses_cross_entropy = loss_fn is None
        self.loss_fn = cross_entropy_per_sample if loss_fn is None else loss_fn
        self.device = device
        self.output = output
        selected = set(selection.names)
        named = dict(model.named_parameters())
        self.model_dtype = named[selection.names[0]].dtype
        self.dtype = torch.float32 if self.model_dtype in REDUCED_PRECISION else self.model_dtype

        def snapshot(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.detach().to(device)
            if tensor.dtype in REDUCED_PRECISION:
                tensor = tensor.to(self.dtype)
            return tensor.clone()

        # Embeddings whose padding row must stay constant in forward mode (the mode costs a
        # Python call per operation, so models without one run without it).
        self.padding_embeddings = padding_embeddings(model, {id(named[n]) for n in selected})
        with torch.no_grad():
            self.theta = selection.flatten([snapshot(named[n]) for n in selection.names])
            self.fixed = {
                name: snapshot(tensor)
                for name, tensor in [*named.items(), *model.named_buffers()]
                if name not in selected
            }

    @property
    def dim(self) -> int:
        """``p``, the number of selected parameters."""
        return self.theta.numel()

    def tensors(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by name, the selected ones taken from ``theta``."""
        return {**self.fixed, **self.selection.unflatten(theta)}

    def logits(self, theta: torch.Tensor, x: Inputs) -> Any:
        """The model's output at ``theta`` (through ``output`` when one is given) on the input
        ``x``: a tensor, or a tuple (positional) or dict (keyword) of tensors
        (:func:`~fastinfluence.labelled_data.model_arguments`). Attention runs under
        :func:`differentiable_attention` and, for a model with :attr:`padding_embeddings`,
        :class:`ConstantPaddingRows`: every derivative pass of the engine reads the model
        here, and under an outer ``torch.no_grad`` a ``torch.func`` transform still
        differentiates, so grad mode cannot tell the passes that do not."""
        args, kwargs = model_arguments(x)
        padding = ConstantPaddingRows() if self.padding_embeddings else contextlib.nullcontext()
        with differentiable_attention(), padding:
            out = torch.func.functional_call(self.model, self.tensors(theta), args, kwargs)
        return out if self.output is None else self.output(out)

    def losses(self, theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[batch]`` of ``(x, y)`` at ``theta``."""
        return self.per_sample(self.logits(theta, x), y)

    def per_sample(self, logits: Any, y: torch.Tensor) -> torch.Tensor:
        """``loss_fn(logits, y)``, checked to hold one loss per sample."""
        values = self.loss_fn(logits, y)
        if not isinstance(values, torch.Tensor) or values.shape != (len(y),):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({len(y)},); got {shape} "
                "(use reduction='none')"
            )
        return values

    def loss_tangents(
        self, logits: torch.Tensor, y: torch.Tensor, tangents: torch.Tensor
    ) -> torch.Tensor:
        """∂l/∂z · u for each sample and each tangent ``u`` in ``tangents`` [k, batch, C];
        ``[k, batch]``."""
        if self.uses_cross_entropy:
            residual = torch.softmax(logits, dim=-1)
            residual[torch.arange(len(y), device=y.device), y] -= 1
            return (tangents * residual).sum(dim=-1)

        def one(u: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda z: self.per_sample(z, y), (logits,), (u,))[1]

        return torch.func.vmap(one)(tangents)

    def loss_hessian_vp(
        self, logits: torch.Tensor, y: torch.Tensor, tangents: torch.Tensor
    ) -> torch.Tensor:
        """∂²l/∂z² · u for each sample and each tangent ``u`` in ``tangents`` [k, batch, C]."""
        if self.uses_cross_entropy:
            probs = torch.softmax(logits, dim=-1)
            weighted = probs * tangents
            return weighted - probs * weighted.sum(dim=-1, keepdim=True)

        def summed(z: torch.Tensor) -> torch.Tensor:
            return self.per_sample(z, y).sum()

        grad_z = torch.func.grad(summed)

        def one(u: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(grad_z, (logits,), (u,))[1]

        return torch.func.vmap(one)(tangents)

    def loss_hessian_roots(
        self, logits: torch.Tensor, y: torch.Tensor, minimal: bool = False
    ) -> tuple[torch.Tensor, bool]:
        """Columns ``r_c`` ``[C, batch, C]`` with ``Σ_c r_c r_cᵀ = ∂²l/∂z²`` per sample (for a
        loss non-convex in ``z``: of its positive semi-definite part), and whether the loss is
        convex there (no eigenvalue below ``-1e-6`` of the largest). A per-sample output of
        several axes (a language model's ``[batch, T, V]``) is one vector of ``C = T·V``
        entries: the columns are then ``[C, batch, T, V]``. With ``minimal``, softmax
        cross-entropy on ``[batch, C]`` logits, whose Hessian has rank ``C − 1``, gets
        ``C − 1`` columns (:func:`_without_null_column`): every sum ``Σ_c r_c r_cᵀ`` is the
        same, with one product per sample fewer."""
        if self.uses_cross_entropy:  # diag(p) − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ
            probs = torch.softmax(logits, dim=-1)
            eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
            roots = probs.sqrt()[:, :, None] * (eye[None] - probs[:, None, :])
            roots = roots.permute(1, 0, 2)
            if minimal and logits.ndim == 2:
                roots = _without_null_column(roots, probs)
            return roots, True
        shape = logits.shape[1:]
        outputs = shape.numel()
        identity = torch.eye(outputs, dtype=logits.dtype, device=logits.device)
        directions = identity.view(outputs, 1, *shape).expand(-1, len(y), *shape)
        hessians = self.loss_hessian_vp(logits, y, directions).reshape(outputs, len(y), -1)
        hessians = hessians.transpose(0, 1)  # [batch, C, C]: column c of sample i is [c, i]
        values, vectors = torch.linalg.eigh((hessians + hessians.mT) / 2)
        convex = not bool((values < -1e-6 * values.abs().amax().clamp_min(1)).any())
        roots = vectors * values.clamp_min(0).sqrt()[:, None, :]
        return roots.permute(2, 0, 1).reshape(outputs, len(y), *shape), convex


def _without_null_column(roots: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy's root columns ``r_c = √p_c (e_c − p)`` ``[C, B, C]``, rotated
    per sample so that one is zero, and that one dropped: ``[C − 1, B, C]``.

    With ``R = [r_1 … r_C] = (I − p1ᵀ) diag(√p)``, ``R √p = 0``. The Householder reflection
    ``H = I − 2vvᵀ/vᵀv``, ``v = e_k + √p`` (``k`` the most probable class, so that
    ``vᵀv = 2 + 2√p_k ≥ 2`` never cancels), maps ``e_k`` to ``−√p``: column ``k`` of ``R H``
    is zero, and ``(RH)(RH)ᵀ = RRᵀ``."""
    count, batch = probs.shape[1], len(probs)
    top = probs.argmax(dim=1)
    v = probs.sqrt()
    v[torch.arange(batch), top] += 1
    reflection = (torch.eye(count, dtype=probs.dtype, device=probs.device)
                  - 2 * v[:, :, None] * v[:, None, :] / (v * v).sum(dim=1)[:, None, None])
    rotated = torch.einsum("bcj,cbe->bje", reflection, roots)  # [B, C, C]: columns of R H
    columns = torch.arange(count, device=probs.device).expand(batch, -1)
    kept = columns[columns != top[:, None]].reshape(batch, count - 1)
    return rotated.gather(1, kept[:, :, None].expand(-1, -1, count)).permute(1, 0, 2)
