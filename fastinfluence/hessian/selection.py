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

from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.exact import ExactHessianBackend
from fastinfluence.hessian.gauss_newton import GaussNewtonBackend
from fastinfluence.hessian.head import HeadBackend
from fastinfluence.hessian.kfac import KRONECKER_CURVATURES
from fastinfluence.hessian.kronecker import KroneckerBackend
from fastinfluence.hessian.probe import ModelProbe
from fastinfluence.hessian.protocol import CurvatureBackend
from fastinfluence.labelled_data import Inputs, LabelledData

CURVATURES = ("auto", "exact", "gauss-newton", *KRONECKER_CURVATURES)


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
