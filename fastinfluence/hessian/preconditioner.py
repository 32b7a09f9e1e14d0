"""K-FAC / EK-FAC as the preconditioner of conjugate gradients (``CGConfig(preconditioner=)``).

Preconditioned CG on ``(C + λI) x = b`` applies ``M^{-1} = (K + λI)^{-1}`` to each residual,
where ``K`` is the Kronecker-factored Gauss-Newton matrix (:mod:`.kfac`) of the same model on
the same training samples as the curvature ``C`` (Gauss-Newton or the exact Hessian), inverted
in closed form through the factors' eigenbases. ``M`` only steers the iteration: CG still
converges to ``(C + λI)^{-1} b`` and stops on the true residual of that system.

Parameters of θ_S outside the layers that K-FAC factors (BatchNorm or LayerNorm affine
parameters, or any module without a K-FAC rule) get the scalar block ``1/(κ + λ)``, with ``κ``
the mean eigenvalue of ``K`` over the factored parameters (its mean diagonal): the scale of
the curvature K-FAC sees, so that these few coordinates are neither frozen (``1/λ`` would
treat their curvature as zero and dominate the first steps) nor ignored. Without any factored
layer ``M`` is a multiple of the identity, which leaves CG's iterates unchanged.

Across processes the factors are fitted on each rank's shard and their sums all-reduced
(:class:`~fastinfluence.distributed.SampleSums`): every rank applies the same ``M``.
"""

from __future__ import annotations

import torch

from fastinfluence.distributed import DistributedBackend
from fastinfluence.hessian.kfac import KRONECKER_CURVATURES, KroneckerCurvature
from fastinfluence.hessian.protocol import CurvatureBackend

PRECONDITIONERS = KRONECKER_CURVATURES
"""The values of ``CGConfig(preconditioner=)`` besides ``None``."""
PRECONDITIONED_CURVATURES = ("gauss-newton", "exact")
"""The curvatures CG can precondition: a network's Gauss-Newton matrix or exact Hessian."""


class KroneckerPreconditioner:
    """``r ↦ (K + λI)^{-1} r`` for the rows ``r`` of a residual ``[k, p]``.

    Args:
        operator: the curvature CG solves with; its model and training samples give ``K``.
        kind: ``"kfac"`` or ``"ekfac"``.
        damping: ``λ > 0``, the damping of the system CG solves.
        progress: tqdm bars over the factor passes.

    Attributes:
        passes: passes over the training samples taken to fit the factors (1 for K-FAC, 2
            for EK-FAC).
    """

    def __init__(self, operator: CurvatureBackend, kind: str, damping: float,
                 progress: bool = False) -> None:
        check_preconditioned(operator, kind, damping)
        self.damping = damping
        # across processes: the factors of every rank's shard, summed (docs/design.md §7.3)
        network, sample_sums = ((operator.inner, operator.sample_sums)
                                if isinstance(operator, DistributedBackend) else (operator, None))
        self.factors = KroneckerCurvature(network.fmodel, network.train,
                                          eigen_corrected=kind == "ekfac", progress=progress,
                                          partial=True, sample_sums=sample_sums)
        self.passes = 2 if kind == "ekfac" else 1
        covered = torch.zeros(operator.dim, dtype=torch.bool, device=operator.device)
        eigenvalue_sum = 0.0
        for layer in self.factors.layers:
            weight_start = layer.offsets[0]
            covered[weight_start:weight_start + layer.module.weight.numel()] = True
            if layer.bias:
                covered[layer.offsets[1]:layer.offsets[1] + layer.out_features] = True
            eigenvalue_sum += float(layer.eigen[2].sum())
        self.uncovered = (~covered).nonzero()[:, 0]
        count = int(covered.sum())
        self.mean_eigenvalue = eigenvalue_sum / count if count else 0.0

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        preconditioned = self.factors.inverse(residual, self.damping)
        if len(self.uncovered):
            preconditioned[:, self.uncovered] = (residual[:, self.uncovered]
                                                 / (self.mean_eigenvalue + self.damping))
        return preconditioned


def check_preconditioned(operator: CurvatureBackend, kind: str, damping: float) -> None:
    """Refuse a preconditioner CG cannot use on ``operator``, saying what works instead."""
    if operator.name not in PRECONDITIONED_CURVATURES:  # the head's name is its own
        raise ValueError(
            f"preconditioner={kind!r} preconditions CG on a network's Gauss-Newton matrix or "
            f"exact Hessian, not on the {operator.name!r} curvature: its explicit matrix or "
            "closed-form inverse is cheaper (solver='direct', or 'cg' without a preconditioner)"
        )
    if not damping > 0:
        raise ValueError(f"preconditioner={kind!r} needs damping > 0 ((K + λI)^{{-1}} of the "
                         f"rank-deficient K-FAC factors is singular at λ = 0), got {damping!r}")
