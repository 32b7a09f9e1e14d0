"""The curvature-backend protocol: everything the engine asks of "a model, a loss and θ_S".

An :class:`~fastinfluence.Influence` chooses one backend when it is built
(:func:`~fastinfluence.hessian.selection.select_backend`) and from then on talks to it alone;
the solvers see only its curvature half. The protocol (:class:`CurvatureBackend`), with ``C``
the curvature of the **mean** training loss over θ_S (no damping) and ``l(z)`` the per-sample
loss:

* ``mean_gradient(data)``: ``∇_θ L(data)``, flat ``[p]``;
* ``matvec(V)``: ``C V`` for the rows of ``V`` ``[k, p]`` (many right-hand sides per pass);
* ``dense(chunk)``: ``C`` as an explicit symmetric ``[p, p]`` matrix;
* ``directional(data, D)``: ``dᵀ∇l(z)`` for each sample and each row ``d`` of ``D``, ``[n, k]``;
* ``per_sample_gradients(data)``: ``∇l(z)`` of each sample, ``[n, p]`` (materialised);
* ``perturbation(data, d)``: ``−∇_x(dᵀ∇_θ l(z))`` of each sample, shaped like its input;
* ``subsample(size, generator)``: the same curvature on ``size`` training samples drawn with
  replacement (LiSSA's minibatches), by ``restrict(indices)``: the curvature over given samples;
* optional capabilities, **declared** in ``capabilities`` (:class:`Capability`); asking a
  backend for one it does not declare raises :class:`~fastinfluence.errors.NotSupportedError`,
  and the solvers check the declaration first to refuse with a message saying what works:
  ``closed_form_inverse(rhs, damping)`` returns ``(C + λI)^{-1} rhs`` without iterating (for
  factored curvatures such as K-FAC), ``lissa_recursion(rhs, damping, scale, depth,
  minibatch_size, seed)`` runs a whole minibatch LiSSA recursion in one call, and
  ``factor_rows(chunk_size)`` returns ``B`` with ``BᵀB = C`` (the Woodbury solver's rows).

The backends, one curvature per module, each tested against its slow twin in
:mod:`fastinfluence.reference` (``tests/hessian/test_backends.py``): :mod:`.head`,
:mod:`.exact`, :mod:`.gauss_newton`, :mod:`.kronecker`; the network ones share
:mod:`.network` and take directional derivatives by one strategy of :mod:`.differentiation`.
"""

from __future__ import annotations

import enum

import torch

from fastinfluence.errors import NotSupportedError
from fastinfluence.functional import FunctionalModel
from fastinfluence.labelled_data import LabelledData

HEAD_CLOSED_FORM = "head-closed-form"


class Capability(enum.Enum):
    """An optional method of a :class:`CurvatureBackend`, offered when declared."""

    CLOSED_FORM_INVERSE = "closed_form_inverse"
    MINIBATCH_LISSA = "lissa_recursion"
    FACTOR_ROWS = "factor_rows"


class CurvatureBackend:
    """The curvature, gradients and directional derivatives of one model, loss and θ_S.

    Attributes:
        name: the backend: ``"head-closed-form"``, ``"exact"``, ``"gauss-newton"``,
            ``"kfac"`` or ``"ekfac"``.
        curvature: the ``hessian=`` curvature it computes (the closed-form head's is
            ``"exact"``, which equals its Gauss-Newton matrix).
        scoring: how directional derivatives are taken (``"head-closed-form"``,
            ``"fused-tangent"``, ``"torch.func.jvp"`` or ``"reverse-mode"``).
        scoring_reason: why a faster way of scoring was not used (``None`` when none was
            passed over).
        feature_pass: how the closed-form head's inputs were read
            (:mod:`fastinfluence.feature_pass`; ``None`` for the other backends).
        positive_semidefinite: whether ``C`` is positive semi-definite by construction.
        capabilities: the optional methods this backend offers (:class:`Capability`).
        fmodel: the model as a function of θ_S.
        dim: ``p``, the number of selected parameters.
        num_samples: training samples ``C`` is the mean over.
        passes: products taken so far (each one pass over the training set or a minibatch).
    """

    name: str
    curvature: str
    scoring: str
    scoring_reason: str | None = None
    feature_pass: str | None = None
    positive_semidefinite: bool
    capabilities: frozenset[Capability] = frozenset()
    fmodel: FunctionalModel
    dim: int
    dtype: torch.dtype
    device: torch.device
    num_samples: int
    passes: int = 0

    def offers(self, capability: Capability) -> bool:
        """Whether this backend declares ``capability``."""
        return capability in self.capabilities

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

    def perturbation(self, data: LabelledData, direction: torch.Tensor) -> torch.Tensor:
        """``−∇_x(dᵀ∇_θ l(z))`` for each sample of ``data`` (one input tensor) and the flat
        ``direction`` ``d`` ``[p]``, shaped like the inputs: one batched double-backward per
        batch (samples are independent in eval mode, so the summed loss's input gradient is
        each sample's)."""
        fmodel = self.fmodel
        maps = []
        for inputs, targets in data.batches(fmodel.device, fmodel.dtype):
            inputs = inputs.detach().requires_grad_(True)
            theta = fmodel.theta.detach().requires_grad_(True)
            total = fmodel.losses(theta, inputs, targets).sum()
            (gradient,) = torch.autograd.grad(total, theta, create_graph=True)
            (input_gradient,) = torch.autograd.grad(gradient @ direction, inputs)
            maps.append(-input_gradient)
        return torch.cat(maps)

    def subsample(self, size: int, generator: torch.Generator) -> CurvatureBackend:
        """The same curvature on ``size`` training samples drawn with replacement."""
        return self.restrict(torch.randint(self.num_samples, (size,), generator=generator))

    def restrict(self, indices: torch.Tensor) -> CurvatureBackend:
        """The same curvature over the training samples at ``indices`` (repeats allowed)."""
        raise NotImplementedError

    def closed_form_inverse(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + λI)^{-1} rhs`` without iterating (:attr:`Capability.CLOSED_FORM_INVERSE`)."""
        raise self._not_supported(Capability.CLOSED_FORM_INVERSE)

    def lissa_recursion(self, rhs: torch.Tensor, damping: float, scale: float, depth: int,
                        minibatch_size: int, seed: int) -> torch.Tensor:
        """A whole minibatch LiSSA recursion for all rows of ``rhs`` in one call
        (:attr:`Capability.MINIBATCH_LISSA`)."""
        raise self._not_supported(Capability.MINIBATCH_LISSA)

    def factor_rows(self, chunk_size: int) -> torch.Tensor:
        """``B`` ``[m, p]`` with ``BᵀB = C`` (:attr:`Capability.FACTOR_ROWS`)."""
        raise self._not_supported(Capability.FACTOR_ROWS)

    def _not_supported(self, capability: Capability) -> NotSupportedError:
        return NotSupportedError(
            f"the {self.name!r} curvature backend does not offer {capability.value}"
        )
