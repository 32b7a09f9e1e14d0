"""Which curvature backend an :class:`~fastinfluence.Influence` runs on, one per curvature:

* :class:`~.head.HeadBackend` — ``params="last"`` on a final ``nn.Linear`` with softmax
  cross-entropy: features cached by one forward pass, everything in closed form;
* :class:`~.exact.ExactHessianBackend` — ``C = ∇²_θ L`` of any network, by forward-over-reverse
  differentiation (``jvp`` of ``grad``);
* :class:`~.gauss_newton.GaussNewtonBackend` — ``C = Jᵀ(∂²l/∂z²)J`` with ``J = ∂z/∂θ`` the
  Jacobian of the model's output; positive semi-definite whenever the loss is convex in the
  output (cross-entropy is), so CG and LiSSA converge where a network's exact Hessian is
  indefinite;
* :class:`~.kronecker.KroneckerBackend` — K-FAC or EK-FAC (:mod:`.kfac`): the Gauss-Newton
  matrix factored per Linear/Conv2d layer, inverted in closed form.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch

from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.exact import ExactHessianBackend
from fastinfluence.hessian.gauss_newton import GaussNewtonBackend
from fastinfluence.hessian.head import HeadBackend
from fastinfluence.hessian.kfac import KRONECKER_CURVATURES
from fastinfluence.hessian.kronecker import KroneckerBackend
from fastinfluence.hessian.probe import ModelProbe
from fastinfluence.hessian.protocol import CurvatureBackend
from fastinfluence.labelled_data import Inputs, LabelledData

if TYPE_CHECKING:
    from fastinfluence.distributed import SampleSums

CURVATURES = ("auto", "exact", "gauss-newton", *KRONECKER_CURVATURES)


def select_backend(
    fmodel: FunctionalModel,
    probe: ModelProbe,
    train: LabelledData,
    example: Inputs,
    hessian: str,
    progress: bool = False,
    sample_sums: SampleSums | None = None,
) -> CurvatureBackend:
    """The backend for ``hessian`` (``"auto"``: exact for the closed-form head, where it equals
    Gauss-Newton; Gauss-Newton for networks, whose exact Hessian is indefinite in general).
    ``sample_sums``: the sums over every rank's samples that K-FAC/EK-FAC factors fitted on
    this rank's shard ``train`` are all-reduced with (``None`` in one process)."""
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
                                eigen_corrected=hessian == "ekfac", sample_sums=sample_sums)
    kind = GaussNewtonBackend if hessian == "gauss-newton" else ExactHessianBackend
    return kind(fmodel, train, example, progress)


def curvature_sample(train: LabelledData, samples: Any, seed: Any
                     ) -> tuple[LabelledData, dict[str, int]]:
    """The training samples the curvature is the mean over, and what to fingerprint of them.

    ``samples=None`` (or ``len(train)``): every training sample, in order, so the curvature is
    the full one exactly and nothing is added to the fingerprint. ``samples=m < n``: ``m``
    samples drawn without replacement by a ``torch.Generator`` seeded with ``seed`` (the same
    ``m`` and ``seed`` draw the same samples on every run and every rank), in index order;
    ``H`` (and K-FAC factors) are then the mean over them while scores still cover all ``n``.
    """
    for name, value, minimum in (("curvature_samples", samples, 1), ("curvature_seed", seed, 0)):
        if value is None and name == "curvature_samples":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer >= {minimum}"
                            f"{' or None' if name == 'curvature_samples' else ''}, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if samples is not None and samples > len(train):
        raise ValueError(f"curvature_samples={samples} exceeds the {len(train)} training samples "
                         "(draws are without replacement)")
    if samples is None or samples == len(train):
        return train, {}
    generator = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(len(train), generator=generator)[:int(samples)].sort().values
    return train.subset(indices), {"curvature_samples": int(samples),
                                   "curvature_seed": int(seed)}
