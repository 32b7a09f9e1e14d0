"""Hessian operators ``V ↦ H V`` of the mean training loss over θ_S (no damping).

Two curvature kinds (DESIGN.md §2, ``hessian=``):

* ``"exact"``: ``H = ∇²_θ L``, by forward-over-reverse differentiation (``jvp`` of ``grad``),
  one pass over the data per call, all right-hand sides of a call batched with ``vmap``.
* ``"gauss-newton"``: ``G = Jᵀ (∂²l/∂z²) J`` with ``J = ∂z/∂θ`` the Jacobian of the logits;
  positive semi-definite whenever the loss is convex in the logits (cross-entropy is), so
  CG and LiSSA converge where the exact Hessian of a network is indefinite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastinfluence.data import LabelledData
from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian import head
from fastinfluence.progress import progress_bar
from fastinfluence.tangent import TangentProgram

CURVATURES = ("exact", "gauss-newton")


class HessianOperator:
    """A symmetric ``[p, p]`` matrix known through products with ``[k, p]`` blocks."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    passes: int = 0
    """How many products have been taken (each is one pass over the data)."""

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, chunk: int = 32) -> torch.Tensor:
        """The explicit matrix, from products with identity columns, symmetrised."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        rows = [self.matvec(eye[start:start + chunk]) for start in range(0, self.dim, chunk)]
        full = torch.cat(rows)
        return (full + full.T) / 2


class AutogradHessian(HessianOperator):
    """``H V`` (or ``G V``) of a network by automatic differentiation over ``data``.

    With a ``tangent_program`` (:mod:`fastinfluence.tangent`), the Gauss-Newton product takes
    ``J V`` from that fused pass instead of ``torch.func.jvp``, and runs the ``vjp`` on inputs
    in the program's memory layout.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        data: LabelledData,
        curvature: str,
        progress: bool = False,
        tangent_program: TangentProgram | None = None,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"hessian must be one of {CURVATURES}, got {curvature!r}")
        self.fmodel = fmodel
        self.data = data
        self.curvature = curvature
        self.progress = progress
        self.tangent_program = tangent_program
        self.dim = fmodel.dim
        self.dtype = fmodel.dtype
        self.device = fmodel.device
        self.passes = 0

    def subsample(self, size: int, generator: torch.Generator) -> AutogradHessian:
        """The same operator on ``size`` training samples drawn with replacement."""
        indices = torch.randint(len(self.data), (size,), generator=generator)
        part = AutogradHessian(self.fmodel, self.data.subset(indices), self.curvature,
                               tangent_program=self.tangent_program)
        part.passes = 0
        return part

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        batch_product: Callable[..., torch.Tensor] = (
            self._exact_batch if self.curvature == "exact" else self._gauss_newton_batch
        )
        total = torch.zeros_like(vectors)
        batches = self.data.batches(self.device, self.dtype)
        for x, y in progress_bar(batches, self.progress, "Hessian-vector product",
                                 self.data.num_batches()):
            total += batch_product(x, y, vectors)
        self.passes += 1
        return total / len(self.data)

    def _exact_batch(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor):
        fmodel = self.fmodel

        def summed_loss(theta: torch.Tensor) -> torch.Tensor:
            return fmodel.losses(theta, x, y).sum()

        grad_fn = torch.func.grad(summed_loss)

        def one(vector: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(grad_fn, (fmodel.theta,), (vector,))[1]

        if len(vectors) == 1:
            return one(vectors[0])[None]
        return torch.func.vmap(one)(vectors)

    def _gauss_newton_batch(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor):
        fmodel, program = self.fmodel, self.tangent_program
        if program is not None:
            x = program.layout(x)

        def logits_of(theta: torch.Tensor) -> torch.Tensor:
            return fmodel.logits(theta, x)

        logits, pullback = torch.func.vjp(logits_of, fmodel.theta)
        if program is not None:
            tangents = program.forward(fmodel.tensors(fmodel.theta),
                                       fmodel.selection.unflatten(vectors), x, len(vectors))[1]
        else:

            def push(vector: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(logits_of, (fmodel.theta,), (vector,))[1]

            if len(vectors) == 1:
                tangents = push(vectors[0])[None]
            else:
                tangents = torch.func.vmap(push)(vectors)
        curved = fmodel.loss_hessian_vp(logits.detach(), y, tangents)
        if len(vectors) == 1:
            return pullback(curved[0])[0][None]
        return torch.func.vmap(pullback)(curved)[0]


class HeadHessian(HessianOperator):
    """The closed-form Hessian of a softmax-cross-entropy Linear head on cached features."""

    def __init__(self, data: head.HeadFeatures, layout: head.HeadLayout) -> None:
        self.data = data
        self.layout = layout
        self.dim = layout.dim
        self.dtype = data.features.dtype
        self.device = data.features.device
        self.passes = 0

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return head.hvp(self.data, self.layout, vectors)

    def dense(self, chunk: int = 32) -> torch.Tensor:
        return head.dense_hessian(self.data, self.layout)
