"""Curvature backends: everything the engine asks of "a model, a loss and θ_S".

An :class:`~fastinfluence.Influence` chooses one backend when it is built
(:func:`select_backend`) and from then on talks to it alone; the solvers see only its curvature
half. The protocol (:class:`CurvatureBackend`), with ``C`` the curvature of the **mean** training
loss over θ_S (no damping) and ``l(z)`` the per-sample loss:

* ``mean_gradient(data)``: ``∇_θ L(data)``, flat ``[p]``;
* ``matvec(V)``: ``C V`` for the rows of ``V`` ``[k, p]`` (many right-hand sides per pass);
* ``dense(chunk)``: ``C`` as an explicit symmetric ``[p, p]`` matrix;
* ``directional(data, D)``: ``dᵀ∇l(z)`` for each sample and each row ``d`` of ``D``, ``[n, k]``;
* ``per_sample_gradients(data)``: ``∇l(z)`` of each sample, ``[n, p]`` (materialised);
* ``subsample(size, generator)``: the same curvature on ``size`` training samples drawn with
  replacement (LiSSA's minibatches), by ``restrict(indices)``: the curvature over given samples;
* optional solver hooks, ``None`` where a backend does not offer them:
  ``closed_form_inverse(rhs, damping)`` returns ``(C + λI)^{-1} rhs`` without iterating (for
  factored curvatures such as K-FAC), and ``lissa_recursion(rhs, damping, scale, depth,
  minibatch_size, seed)`` runs a whole minibatch LiSSA recursion in one call.

The backends here, each tested against its slow twin in :mod:`fastinfluence.reference`
(``tests/hessian/test_backends.py``):

* :class:`HeadBackend` — ``params="last"`` on a final ``nn.Linear`` with softmax cross-entropy:
  features cached by one forward pass (through an inference copy of the network,
  :mod:`fastinfluence.feature_pass`), everything in closed form (:mod:`.softmax_head`);
* :class:`ExactHessianBackend` — ``C = ∇²_θ L`` of any network, by forward-over-reverse
  differentiation (``jvp`` of ``grad``);
* :class:`GaussNewtonBackend` — ``C = Jᵀ(∂²l/∂z²)J`` with ``J = ∂z/∂θ`` the Jacobian of the
  model's output; positive semi-definite whenever the loss is convex in the output
  (cross-entropy is), so CG and LiSSA converge where a network's exact Hessian is indefinite;
* :class:`KroneckerBackend` — K-FAC or EK-FAC (:mod:`.kfac`): the Gauss-Newton matrix
  factored per Linear/Conv2d layer, inverted in closed form.

Network backends take directional derivatives by the fused tangent pass
(:mod:`fastinfluence.tangent`) when it compiles and passes its numerical check, else by
``torch.func.jvp``, and fall back to reverse mode only (per-sample ``vjp``; products by
reverse-over-reverse) for models with an operation that has no forward-mode derivative, such as
the CPU LSTM kernel. ``scoring`` and ``scoring_reason`` say which ran and why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fastinfluence import ops
from fastinfluence.feature_pass import FeaturePass, head_feature_pass
from fastinfluence.functional import ATTENTION_NOTE, AttentionCalls, FunctionalModel
from fastinfluence.hessian import softmax_head
from fastinfluence.hessian.kfac import KRONECKER_CURVATURES, KroneckerCurvature
from fastinfluence.labelled_data import Inputs, LabelledData, first_samples, map_inputs
from fastinfluence.progress import progress_bar
from fastinfluence.tangent import TangentProgram

CURVATURES = ("auto", "exact", "gauss-newton", *KRONECKER_CURVATURES)
HEAD_CLOSED_FORM = "head-closed-form"
FUSED_TANGENT = "fused-tangent"
TORCH_JVP = "torch.func.jvp"
REVERSE_MODE = "reverse-mode"
BATCHING_FALLBACK_NOTE = "There is a performance drop because we have not yet implemented"
"""The start of torch's warning when ``vmap`` meets an operation without a batching rule (it
then loops over the batch: slower, the same numbers, nothing the caller can change)."""


def _without_batching_fallback_notes(method: Callable) -> Callable:
    """``method`` with torch's :data:`BATCHING_FALLBACK_NOTE` warnings, raised by the ``vmap``
    calls inside it (ours and :class:`FunctionalModel`'s), kept from the caller."""

    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=BATCHING_FALLBACK_NOTE,
                                    category=UserWarning)
            return method(*args, **kwargs)

    return quiet


class CurvatureBackend:
    """The curvature, gradients and directional derivatives of one model, loss and θ_S.

    Attributes:
        name: the curvature: ``"head-closed-form"``, ``"exact"`` or ``"gauss-newton"``.
        scoring: how directional derivatives are taken (``"head-closed-form"``,
            ``"fused-tangent"``, ``"torch.func.jvp"`` or ``"reverse-mode"``).
        scoring_reason: why a faster way of scoring was not used (``None`` when none was
            passed over).
        feature_pass: how the closed-form head's inputs were read
            (:mod:`fastinfluence.feature_pass`; ``None`` for the other backends).
        positive_semidefinite: whether ``C`` is positive semi-definite by construction.
        dim: ``p``, the number of selected parameters.
        num_samples: training samples ``C`` is the mean over.
        passes: products taken so far (each one pass over the training set or a minibatch).
    """

    name: str
    scoring: str
    scoring_reason: str | None = None
    feature_pass: str | None = None
    positive_semidefinite: bool
    dim: int
    dtype: torch.dtype
    device: torch.device
    num_samples: int
    passes: int = 0
    closed_form_inverse: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    lissa_recursion: Callable[..., torch.Tensor] | None = None
    factor_rows: Callable[[int], torch.Tensor] | None = None

    def mean_gradient(self, data: LabelledData) -> torch.Tensor:
        """``∇_θ L(data)``, flat ``[p]``."""
        raise NotImplementedError

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``C V`` for ``vectors`` ``[k, p]`` (no damping)."""
        raise NotImplementedError

    def dense(self, chunk: int = 32) -> torch.Tensor:
        """``C`` explicitly, from products with identity columns, symmetrised."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        rows = [self.matvec(eye[start:start + chunk]) for start in range(0, self.dim, chunk)]
        full = torch.cat(rows)
        return (full + full.T) / 2

    def directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        """``dᵀ∇l(z)`` for each sample of ``data`` and each row ``d`` of ``directions``:
        ``[n, k]``."""
        raise NotImplementedError

    def per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        """``∇l(z)`` of each sample of ``data``, ``[n, p]``."""
        raise NotImplementedError

    def subsample(self, size: int, generator: torch.Generator) -> CurvatureBackend:
        """The same curvature on ``size`` training samples drawn with replacement."""
        return self.restrict(torch.randint(self.num_samples, (size,), generator=generator))

    def restrict(self, indices: torch.Tensor) -> CurvatureBackend:
        """The same curvature over the training samples at ``indices`` (repeats allowed)."""
        raise NotImplementedError


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


def select_backend(
    fmodel: FunctionalModel,
    probe: ModelProbe,
    train: LabelledData,
    example: Inputs,
    hessian: str,
    progress: bool = False,
) -> CurvatureBackend:
    """The backend for ``hessian`` (``"auto"``: exact for the closed-form head, where it equals
    Gauss-Newton; Gauss-Newton for networks, whose exact Hessian is indefinite in general)."""
    if hessian not in CURVATURES:
        raise ValueError(f"hessian must be one of {CURVATURES}, got {hessian!r}")
    if probe.head_reason is None:
        return HeadBackend(fmodel, train, progress)
    if hessian == "auto":
        hessian = "gauss-newton" if probe.output_is_tensor else "exact"
    if hessian != "exact" and not probe.output_is_tensor:
        raise ValueError(
            f"hessian={hessian!r} needs a tensor model output (the Jacobian is taken of it); "
            "pass output= to pick one, or use hessian='exact'"
        )
    if hessian in KRONECKER_CURVATURES:
        return KroneckerBackend(fmodel, train, example, progress,
                                eigen_corrected=hessian == "ekfac")
    kind = GaussNewtonBackend if hessian == "gauss-newton" else ExactHessianBackend
    return kind(fmodel, train, example, progress)


class HeadBackend(CurvatureBackend):
    """The closed-form softmax-cross-entropy Linear head on cached features.

    ``C`` is the exact Hessian of the head, which equals its Gauss-Newton matrix (the logits
    are linear in θ_S). The training features are computed once, when the backend is built.
    """

    name = HEAD_CLOSED_FORM
    scoring = HEAD_CLOSED_FORM
    positive_semidefinite = True

    def __init__(
        self,
        fmodel: FunctionalModel,
        train: LabelledData,
        progress: bool = False,
        features: softmax_head.HeadFeatures | None = None,
        feature_pass: FeaturePass | None = None,
    ) -> None:
        self.fmodel = fmodel
        self.train = train
        self.progress = progress
        self._feature_pass = feature_pass
        module = fmodel.selection.head
        self.layout = softmax_head.HeadLayout(module.out_features, module.in_features,
                                              module.bias is not None)
        self.train_features = self._read_features(train) if features is None else features
        self.dim = self.layout.dim
        self.dtype = fmodel.dtype
        self.device = fmodel.device
        self.num_samples = len(self.train_features)
        self.passes = 0

    def features(self, data: LabelledData) -> softmax_head.HeadFeatures:
        """Inputs of the head and softmax outputs over ``data`` (cached for the training set)."""
        return self.train_features if data is self.train else self._read_features(data)

    @property
    def feature_pass(self) -> str | None:
        """How the head's inputs were read (:mod:`fastinfluence.feature_pass`)."""
        return None if self._feature_pass is None else self._feature_pass.description

    def _read_features(self, data: LabelledData) -> softmax_head.HeadFeatures:
        """One no-grad forward pass over ``data``, capturing the head's inputs."""
        if self._feature_pass is None:
            self._feature_pass = head_feature_pass(self.fmodel)
        features, probs, labels = [], [], []
        batches = data.batches(self.fmodel.device, self.fmodel.dtype)
        for x, y in progress_bar(batches, self.progress, f"features ({data.name})",
                                 data.num_batches()):
            inputs, logits = self._feature_pass(x)
            features.append(inputs)
            probs.append(torch.softmax(logits, dim=1))
            labels.append(y)
        return softmax_head.HeadFeatures(torch.cat(features), torch.cat(probs),
                                         torch.cat(labels))

    def mean_gradient(self, data: LabelledData) -> torch.Tensor:
        return softmax_head.mean_gradient(self.features(data), self.layout)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return softmax_head.hvp(self.train_features, self.layout, vectors)

    def dense(self, chunk: int = 32) -> torch.Tensor:
        return softmax_head.dense_hessian(self.train_features, self.layout)

    def directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        return -softmax_head.scores(self.features(data), self.layout, directions)

    def per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        return softmax_head.per_sample_gradients(self.features(data), self.layout)

    def restrict(self, indices: torch.Tensor) -> HeadBackend:
        features = self.train_features.subset(indices.to(self.device))
        return HeadBackend(self.fmodel, self.train, features=features,
                           feature_pass=self._feature_pass)

    def lissa_recursion(
        self,
        rhs: torch.Tensor,
        damping: float,
        scale: float,
        depth: int,
        minibatch_size: int | None,
        seed: int,
    ) -> torch.Tensor | None:
        """A whole minibatch LiSSA recursion for all right-hand sides in one native call
        (:func:`fastinfluence.ops.head_lissa`); ``None`` for full-batch recursions, which
        the solver runs itself so that it can stop early on the residual."""
        if minibatch_size is None:
            return None
        weights, biases = self.layout.split(rhs)
        xw, xb = ops.head_lissa(self.train_features.features, self.train_features.probs,
                                weights, biases, damping, scale, depth, minibatch_size, seed)
        return self.layout.join(xw, xb)


class NetworkBackend(CurvatureBackend):
    """Gradients and directional derivatives of any network by automatic differentiation.

    Subclasses supply the curvature product of one batch (:meth:`_batch_product`).
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        train: LabelledData,
        example: Inputs | None,
        progress: bool = False,
        modes: tuple[TangentProgram | None, bool, str | None] | None = None,
    ) -> None:
        self.fmodel = fmodel
        self.train = train
        self.progress = progress
        self.dim = fmodel.dim
        self.dtype = fmodel.dtype
        self.device = fmodel.device
        self.num_samples = len(train)
        self.passes = 0
        if modes is None:
            modes = _differentiation_modes(fmodel, example)
        self.tangent_program, self.forward_mode, self.scoring_reason = modes
        if self.tangent_program is not None:
            self.scoring = FUSED_TANGENT
        else:
            self.scoring = TORCH_JVP if self.forward_mode else REVERSE_MODE

    def restrict(self, indices: torch.Tensor) -> NetworkBackend:
        modes = (self.tangent_program, self.forward_mode, self.scoring_reason)
        return type(self)(self.fmodel, self.train.subset(indices), None, modes=modes)

    def mean_gradient(self, data: LabelledData) -> torch.Tensor:
        fmodel = self.fmodel
        total = torch.zeros_like(fmodel.theta)
        count = 0
        for x, y in data.batches(fmodel.device, fmodel.dtype):
            total += torch.func.grad(lambda th, x=x, y=y: fmodel.losses(th, x, y).sum())(
                fmodel.theta
            )
            count += len(y)
        return total / count

    @_without_batching_fallback_notes
    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        count = 0
        batches = self.train.batches(self.device, self.dtype)
        for x, y in progress_bar(batches, self.progress, "Hessian-vector product",
                                 self.train.num_batches()):
            total += self._batch_product(x, y, vectors)
            count += len(y)
        self.passes += 1
        return total / count

    def _batch_product(self, x: Inputs, y: torch.Tensor,
                       vectors: torch.Tensor) -> torch.Tensor:
        """``Σ_batch`` of the per-sample curvature times each row of ``vectors``."""
        raise NotImplementedError

    @_without_batching_fallback_notes
    def directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        fmodel = self.fmodel
        columns = []
        batches = progress_bar(data.batches(fmodel.device, fmodel.dtype), self.progress,
                               f"scores ({data.name})", data.num_batches())
        program = self.tangent_program
        if program is not None:
            tensors = fmodel.tensors(fmodel.theta)
            tangents = fmodel.selection.unflatten(directions)
            for x, y in batches:
                logits, dlogits = program.forward(tensors, tangents, x, len(directions))
                columns.append(fmodel.loss_tangents(logits, y, dlogits).T)
            return torch.cat(columns)
        for x, y in batches:
            if not self.forward_mode:
                columns.append(self._batch_gradients(x, y) @ directions.T)
                continue

            def losses(theta: torch.Tensor, x=x, y=y) -> torch.Tensor:
                return fmodel.losses(theta, x, y)

            def along(direction: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(losses, (fmodel.theta,), (direction,))[1]

            columns.append(_each(along, directions).T)
        return torch.cat(columns)

    @_without_batching_fallback_notes
    def per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        rows = [self._batch_gradients(x, y)
                for x, y in data.batches(self.fmodel.device, self.fmodel.dtype)]
        return torch.cat(rows)

    def _batch_gradients(self, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        fmodel = self.fmodel

        def single(theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
            return fmodel.losses(theta, map_inputs(lambda t: t[None], x), y[None])[0]

        return torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(fmodel.theta, x, y)


class ExactHessianBackend(NetworkBackend):
    """``C = ∇²_θ L``: forward-over-reverse products (``jvp`` of ``grad``), or
    reverse-over-reverse (``vjp`` of ``grad``, equal since ``H`` is symmetric) for models
    without forward-mode derivatives."""

    name = "exact"
    positive_semidefinite = False

    def _batch_product(self, x, y, vectors):
        fmodel = self.fmodel

        def summed_loss(theta: torch.Tensor) -> torch.Tensor:
            return fmodel.losses(theta, x, y).sum()

        grad_fn = torch.func.grad(summed_loss)
        if not self.forward_mode:
            _, pullback = torch.func.vjp(grad_fn, fmodel.theta)
            return torch.stack([pullback(vector)[0] for vector in vectors])
        return _each(lambda v: torch.func.jvp(grad_fn, (fmodel.theta,), (v,))[1], vectors)


class GaussNewtonBackend(NetworkBackend):
    """``C = Jᵀ(∂²l/∂z²)J``: ``J V`` by the fused tangent pass or ``jvp`` (by the transpose of
    a ``vjp`` without forward mode), then ``Jᵀ`` by ``vjp``."""

    name = "gauss-newton"

    @property
    def positive_semidefinite(self) -> bool:
        """PSD by construction for the default cross-entropy; a custom loss may be
        non-convex in the output."""
        return self.fmodel.uses_cross_entropy

    def _batch_product(self, x, y, vectors):
        fmodel, program = self.fmodel, self.tangent_program
        if program is not None:
            x = program.layout(x)

        def logits_of(theta: torch.Tensor) -> torch.Tensor:
            return fmodel.logits(theta, x)

        logits, pullback = torch.func.vjp(logits_of, fmodel.theta)
        if program is not None:
            tangents = program.forward(fmodel.tensors(fmodel.theta),
                                       fmodel.selection.unflatten(vectors), x, len(vectors))[1]
        elif self.forward_mode:
            tangents = _each(lambda v: torch.func.jvp(logits_of, (fmodel.theta,), (v,))[1],
                             vectors)
        else:
            # u ↦ Jᵀu is linear, so the vjp of that map at any u is J v.
            _, transpose = torch.func.vjp(lambda u: pullback(u)[0], torch.zeros_like(logits))
            tangents = torch.stack([transpose(vector)[0] for vector in vectors])
        curved = fmodel.loss_hessian_vp(logits.detach(), y, tangents)
        if len(vectors) == 1:
            return pullback(curved[0])[0][None]
        return torch.func.vmap(pullback)(curved)[0]

    @_without_batching_fallback_notes
    def factor_rows(self, chunk_size: int) -> torch.Tensor:
        """``B`` ``[n·C, p]`` with ``BᵀB = C``: the rows ``R_iᵀ J_i / √n`` of every training
        sample, ``J_i = ∂z_i/∂θ`` ``[C, p]`` (reverse mode, one row per output) and
        ``R_i R_iᵀ = ∂²l/∂z_i²`` (a root of the loss's output Hessian, which must be PSD),
        ``chunk_size`` samples per vectorised Jacobian. For the Woodbury solver."""
        fmodel = self.fmodel

        def logits_of(theta: torch.Tensor, x: Inputs):
            logits = fmodel.logits(theta, map_inputs(lambda t: t[None], x))[0]
            return logits, logits.detach()  # the logits come back with their Jacobian

        jacobian = torch.func.vmap(torch.func.jacrev(logits_of, has_aux=True),
                                   in_dims=(None, 0))
        blocks = []
        batches = self.train.batches(self.device, self.dtype)
        for x, y in progress_bar(batches, self.progress, "Gauss-Newton rows",
                                 self.train.num_batches()):
            for start in range(0, len(y), chunk_size):
                part = map_inputs(lambda t, start=start: t[start:start + chunk_size], x)
                blocks.append(self._rows_of(jacobian, part, y[start:start + chunk_size]))
        self.passes += 1
        return torch.cat(blocks) / self.num_samples**0.5

    def _rows_of(self, jacobian: Callable, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """``R_iᵀ J_i`` of the samples ``x``, stacked ``[len(x)·C, p]``."""
        fmodel = self.fmodel
        J, logits = jacobian(fmodel.theta, x)
        if J.dim() != 3:
            raise ValueError("the Woodbury solver needs outputs of shape [batch, C]; got "
                             f"per-sample outputs of shape {tuple(J.shape[1:-1])}: use "
                             "solver='cg' (its products take any output shape)")
        with torch.no_grad():
            roots, convex = fmodel.loss_hessian_roots(logits, y)  # [C, batch, C]
            if not convex:
                raise ValueError("the Woodbury solver needs a loss convex in the model's "
                                 "output (its Hessian there has a negative eigenvalue): use "
                                 "solver='direct', which factors G + λI itself and says "
                                 "whether it is positive definite")
            return torch.einsum("cbo,bop->bcp", roots, J).reshape(-1, J.shape[-1])


class KroneckerBackend(NetworkBackend):
    """K-FAC (``"kfac"``) or EK-FAC (``"ekfac"``): the layer-wise Kronecker-factored
    Gauss-Newton matrix of :mod:`.kfac`, fitted once on the training set; products and the
    damped inverse in closed form (the direct solver uses the inverse, no explicit matrix)."""

    positive_semidefinite = True

    def __init__(
        self,
        fmodel: FunctionalModel,
        train: LabelledData,
        example: Inputs,
        progress: bool = False,
        eigen_corrected: bool = False,
    ) -> None:
        super().__init__(fmodel, train, example, progress)
        self.name = "ekfac" if eigen_corrected else "kfac"
        self.factors = KroneckerCurvature(fmodel, train, eigen_corrected, progress)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return self.factors.matvec(vectors)

    def closed_form_inverse(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + λI)^{-1} rhs`` through the factors' eigenbases."""
        return self.factors.inverse(rhs, damping)

    def restrict(self, indices: torch.Tensor) -> NetworkBackend:
        raise ValueError(
            f"minibatch LiSSA is not offered for hessian={self.name!r}: its inverse is in "
            "closed form (solver='direct')"
        )


def _each(function: Callable[[torch.Tensor], torch.Tensor],
          vectors: torch.Tensor) -> torch.Tensor:
    """``function`` of each row of ``vectors``, stacked (``vmap`` for more than one)."""
    if len(vectors) == 1:
        return function(vectors[0])[None]
    return torch.func.vmap(function)(vectors)


def _differentiation_modes(
    fmodel: FunctionalModel, example: Inputs
) -> tuple[TangentProgram | None, bool, str | None]:
    """The fused tangent program (or ``None``), whether forward mode works at all, and why
    the faster way was passed over. The program checks itself against ``jvp`` when it
    compiles; otherwise one ``jvp`` on ``example`` along a seeded direction tells whether
    forward mode works, and one forward pass whether the model runs attention (its kernels
    are then chosen by :func:`~fastinfluence.functional.differentiable_attention`, noted in
    the reason)."""
    x = first_samples(example, 2)
    if not isinstance(x, torch.Tensor):
        reason = "a model of several inputs (the fused pass takes one input tensor)"
    elif fmodel.output is None:
        program, reason = TangentProgram.compile(
            fmodel.model, x, fmodel.tensors(fmodel.theta), fmodel.selection.names
        )
        if program is not None:
            return program, True, None
    else:
        reason = "an output= selector (the fused pass reads the model's own output)"
    generator = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn(fmodel.dim, generator=generator, dtype=fmodel.dtype)
    try:
        torch.func.jvp(lambda th: fmodel.logits(th, x), (fmodel.theta,),
                       (direction.to(fmodel.device),))
    except (NotImplementedError, RuntimeError) as error:
        reason, forward_mode = (f"forward-mode differentiation failed ({type(error).__name__}: "
                                f"{_first_line(error)}); scores use per-sample reverse-mode "
                                "gradients"), False
    else:
        forward_mode = True
    attention = AttentionCalls()
    with attention, torch.no_grad():
        fmodel.logits(fmodel.theta, x)
    if attention.seen:  # the kernels chosen for it differ from the model's own (speed, memory)
        reason = ATTENTION_NOTE if reason is None else f"{reason}; {ATTENTION_NOTE}"
    return None, forward_mode, reason


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""
