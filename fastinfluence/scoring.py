"""``Influence`` and ``score``: the public entry points (DESIGN.md §1–§3).

Conventions (Koh & Liang 2017; shared/papers/isr-isp-noisy-brain-mri.md Eq. 3, 7, 8):

* ``H`` is the Hessian of the mean training loss ``L(D_train, θ)`` over the selected parameters
  θ_S, model in eval mode; damping is additive, ``H_λ = H + λI``.
* ``s = H_λ^{-1} ∇L(D_val)`` (``Influence.ihvp``).
* Group influence ``I(z) = −∇L(D_val)ᵀ H_λ^{-1} ∇l(z) = −sᵀ∇l(z)``, no 1/n factor.
  **Positive means harmful**: up-weighting ``z`` raises the validation loss. Removing ``z``
  from ``n`` training samples changes the validation loss by about ``−I(z)/n``.
* Perturbation influence ``I_pert(z) = −∇_x (sᵀ∇_θ l(z))``, shaped like ``x``.
* Pairwise ``I(z_i, z_j) = −∇l(z_j)ᵀ H_λ^{-1} ∇l(z_i)``; self-influence ``∇l(z)ᵀ H_λ^{-1} ∇l(z)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastinfluence.data import DataLike, LabelledData
from fastinfluence.functional import FunctionalModel, LossFn, eval_mode
from fastinfluence.hessian import head
from fastinfluence.hessian.operators import (
    CURVATURES,
    AutogradHessian,
    HeadHessian,
    HessianOperator,
)
from fastinfluence.hessian.solvers import (
    SOLVERS,
    DirectSolver,
    SolveReport,
    make_config,
    make_solver,
)
from fastinfluence.params import ParamsSpec, select_parameters
from fastinfluence.progress import progress_bar
from fastinfluence.tangent import TangentProgram

HEAD_PATH = "head-closed-form"
AUTOGRAD_PATH = "autograd"
FUSED_TANGENT = "fused-tangent"
TORCH_JVP = "torch.func.jvp"
DIRECT_MAX_DIM = {HEAD_PATH: 1024, AUTOGRAD_PATH: 512}
CPU_ACTIVATION_BUDGET = 16 * 2**20
"""On CPU the default batch keeps the largest activation under 16 MiB: glibc serves blocks
above 32 MiB with fresh ``mmap`` pages, and their page faults took 1.9 s of 2.0 s when
scoring 128 samples of 64² in one batch (32 per batch: 2× faster; 128²: 8 per batch)."""
MAX_DEFAULT_BATCH = 256
"""``solver="auto"`` picks the direct solver up to these sizes of θ_S, CG above. Measured on the
paper CNN's head (512 samples, 2 CPU threads): direct 7 ms vs CG 2 ms at p = 771, 172 ms vs
2 ms at p = 3,075 (Cholesky is cubic in p); a network's explicit Hessian costs p products."""


@dataclass
class InfluenceReport:
    """What an :class:`Influence` computed and how.

    Attributes:
        path: ``"head-closed-form"`` (cached features, closed-form head) or ``"autograd"``.
        path_reason: why the closed-form head path was not taken (``None`` when it was).
        solver: the solver that ran (``"auto"`` resolved).
        hessian: ``"exact"`` or ``"gauss-newton"``.
        num_params: size ``p`` of θ_S.
        solve: the inverse-HVP solve's report (iterations, true residual, converged).
        seconds: wall time per stage (``features``, ``gradient``, ``solve``, ``scores``).
        scoring: how directional derivatives (scores, pairwise, and ``J V`` in Gauss-Newton
            products) are taken: ``"head-closed-form"``, ``"fused-tangent"``
            (:mod:`fastinfluence.tangent`, for chains of common layers) or ``"torch.func.jvp"``.
        scoring_reason: why the fused tangent pass was not used (``None`` when it was or when
            the head path runs).
    """

    path: str
    path_reason: str | None
    solver: str
    hessian: str
    num_params: int
    scoring: str = HEAD_PATH
    scoring_reason: str | None = None
    solve: SolveReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class Influence:
    """Influence of training samples on a validation loss, solved once and queried often.

    Construction computes ``s = (H + λI)^{-1} ∇L(D_val)`` over the selected parameters; the
    methods then score any labelled data against it. The model is read, never written: its
    weights, ``training`` flags and ``requires_grad`` flags come back unchanged, and the object
    keeps its own snapshot of the weights (make a new one after training further).

    Args:
        model: a classifier returning logits (or whatever ``loss_fn`` takes).
        train: training data — ``(X, y)`` tensors, a ``Dataset`` of ``(x, y)`` or a
            ``DataLoader``; ``H`` is the Hessian of its mean loss.
        val: the data whose mean loss the influence is measured on.
        loss_fn: ``loss_fn(logits, y) -> [batch]`` per-sample losses; default cross-entropy.
        params: ``"last"`` (the last module owning parameters), ``"all"``, module names, or
            parameters of the model.
        solver: ``"direct"``, ``"cg"``, ``"lissa"`` or ``"auto"`` (direct for small θ_S, CG
            otherwise).
        damping: ``λ ≥ 0`` in ``H + λI``.
        hessian: ``"exact"`` or ``"gauss-newton"`` (positive semi-definite for convex losses,
            so iterative solvers converge where a network's Hessian is indefinite; equal to
            the exact Hessian for a softmax-cross-entropy head).
        batch_size: batch size for tuples and datasets (default: up to 256; on CPU, small
            enough that the largest activation of a batch stays under 16 MiB).
        device: where to compute (default: the model's device).
        progress: show tqdm progress bars on long work.
        **solver_options: fields of the solver's config (:class:`~fastinfluence.CGConfig`,
            :class:`~fastinfluence.LiSSAConfig`, :class:`~fastinfluence.DirectConfig`).

    With ``params="last"`` on a final ``nn.Linear`` whose output is the model's output and the
    default loss, everything runs in closed form on features cached by one forward pass;
    ``report.path`` says which path ran and why.
    """

    def __init__(
        self,
        model: nn.Module,
        train: DataLike,
        val: DataLike,
        *,
        loss_fn: LossFn | None = None,
        params: ParamsSpec = "last",
        solver: str = "auto",
        damping: float = 0.01,
        hessian: str = "exact",
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        **solver_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if hessian not in CURVATURES:
            raise ValueError(f"hessian must be one of {CURVATURES}, got {hessian!r}")
        if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.model = model
        self.damping = float(damping)
        self.progress = progress
        self.batch_size = batch_size
        self.train = LabelledData(train, "train", batch_size)
        self.val = LabelledData(val, "val", batch_size)
        self.selection = select_parameters(model, params)
        if device is None:
            device = next(model.parameters()).device
        self.fmodel = FunctionalModel(model, self.selection, loss_fn, torch.device(device))

        with eval_mode(model):
            path, reason, self.num_classes, sample_bytes = self._probe()
            if batch_size is None:
                self.batch_size = self._default_batch_size(sample_bytes)
                self.train.batch_size = self.val.batch_size = self.batch_size
            if self.fmodel.uses_cross_entropy:
                self.train.check_labels(self.num_classes)
                self.val.check_labels(self.num_classes)
            dim = self.fmodel.dim
            if solver == "auto":
                solver = "direct" if dim <= DIRECT_MAX_DIM[path] else "cg"
            config = make_config(solver, solver_options)
            self.report = InfluenceReport(path, reason, solver, hessian, dim)
            self._prepare(path, hessian)
            start = time.perf_counter()
            self.solver = make_solver(solver, self.operator, self.damping, config, progress)
            solution, self.report.solve = self.solver.solve(self._val_gradient[None])
            self.report.seconds["solve"] = time.perf_counter() - start
        self._ihvp = solution[0]

    @property
    def ihvp(self) -> torch.Tensor:
        """``s = (H + λI)^{-1} ∇L(D_val)``, flat over θ_S in ``named_parameters`` order."""
        return self._ihvp

    # -- public queries -------------------------------------------------------------------

    def scores(self, data: DataLike | None = None) -> torch.Tensor:
        """Group influence ``I(z) = −sᵀ∇l(z)`` of each sample (Eq. 7); ``[n]``, > 0 harmful.

        Args:
            data: labelled data to score (default: the training set).
        """
        start = time.perf_counter()
        target = self.train if data is None else self._wrap(data, "data")
        with eval_mode(self.model):
            result = self._directional(target, self._ihvp[None])[:, 0]
        self.report.seconds["scores"] = time.perf_counter() - start
        return result

    def pairwise(self, test: DataLike) -> torch.Tensor:
        """``I(z_i, z_j) = −∇l(z_j)ᵀ(H + λI)^{-1}∇l(z_i)`` for training ``z_i`` and test ``z_j``
        (Eq. 3); ``[n_train, n_test]``. Solves one inverse-HVP per test sample."""
        test_data = self._wrap(test, "test")
        with eval_mode(self.model):
            gradients = self._per_sample_gradients(test_data)
            directions, report = self.solver.solve(gradients)
            self.report.solve = report
            return self._directional(self.train, directions)

    def self_influence(self, data: DataLike | None = None) -> torch.Tensor:
        """``∇l(z)ᵀ(H + λI)^{-1}∇l(z)`` of each sample; ``[n]``, ≥ 0 when ``H + λI`` is PD."""
        target = self.train if data is None else self._wrap(data, "data")
        with eval_mode(self.model):
            gradients = self._per_sample_gradients(target)
            if isinstance(self.solver, DirectSolver):
                return self.solver.quadratic_form(gradients)
            solutions, report = self.solver.solve(gradients)
            self.report.solve = report
            return (gradients * solutions).sum(dim=1)

    def perturbation(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perturbation influence ``I_pert(z) = −∇_x(sᵀ∇_θ l(z))`` (Eq. 8), shaped like ``x``.

        A step ``x ← x − γ·I_pert`` moves ``z`` so as to lower the validation loss the most
        (to first order). Samples are independent in eval mode, so one batched
        double-backward gives every sample's map.
        """
        data = self._wrap((x, y), "x")
        fmodel = self.fmodel
        maps = []
        with eval_mode(self.model):
            for inputs, targets in data.batches(fmodel.device, fmodel.dtype):
                inputs = inputs.detach().requires_grad_(True)
                theta = fmodel.theta.detach().requires_grad_(True)
                total = fmodel.losses(theta, inputs, targets).sum()
                (gradient,) = torch.autograd.grad(total, theta, create_graph=True)
                (input_gradient,) = torch.autograd.grad(gradient @ self._ihvp, inputs)
                maps.append(-input_gradient)
        return torch.cat(maps).to(x.device)

    # -- construction ---------------------------------------------------------------------

    def _probe(self) -> tuple[str, str | None, int, int]:
        """One forward pass on two validation samples: the number of outputs, the bytes of the
        largest activation per sample, and whether the closed-form head path applies (then the
        head's output must be the model's output)."""
        x, _ = next(iter(self.val.batches(self.fmodel.device, self.fmodel.dtype)))
        x = x[:2]
        captured: dict[str, torch.Tensor] = {}
        largest = [x[0].numel() * x.element_size()]

        def measure(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output[0].numel() * output.element_size())

        hooks = [m.register_forward_hook(measure) for m in self.model.modules()]
        module = self.selection.head
        if module is not None:
            hooks.append(module.register_forward_hook(
                lambda _m, inputs, output: captured.update(inputs=inputs[0], output=output)
            ))
        try:
            with torch.no_grad():
                logits = self.fmodel.logits(self.fmodel.theta, x)
        finally:
            for hook in hooks:
                hook.remove()
        num_classes = logits.shape[1] if logits.ndim == 2 else 0
        if self.fmodel.uses_cross_entropy and logits.ndim != 2:
            raise ValueError(
                f"the default cross-entropy loss needs [batch, classes] logits; the model "
                f"returned shape {tuple(logits.shape)} (pass loss_fn for other outputs)"
            )
        if module is None:
            reason = "the selected parameters are not exactly one nn.Linear's weight and bias"
        elif not self.fmodel.uses_cross_entropy:
            reason = "a custom loss_fn (the closed form is for softmax cross-entropy)"
        elif captured.get("output") is not logits:
            reason = "the model's output is not the selected Linear layer's output"
        elif captured["inputs"].ndim != 2:
            reason = "the Linear layer's input is not [batch, features]"
        else:
            return HEAD_PATH, None, num_classes, largest[0]
        return AUTOGRAD_PATH, reason, num_classes, largest[0]

    def _default_batch_size(self, sample_bytes: int) -> int:
        if self.fmodel.device.type != "cpu":
            return MAX_DEFAULT_BATCH
        fitting = max(1, CPU_ACTIVATION_BUDGET // max(sample_bytes, 1))
        return min(MAX_DEFAULT_BATCH, 2 ** (fitting.bit_length() - 1))

    def _prepare(self, path: str, hessian: str) -> None:
        """Build the Hessian operator and ``∇L(D_val)`` for the chosen path."""
        start = time.perf_counter()
        self._tangent_program: TangentProgram | None = None
        if path == HEAD_PATH:
            module = self.selection.head
            self.layout = head.HeadLayout(module.out_features, module.in_features,
                                          module.bias is not None)
            self._train_features = self._head_features(self.train)
            val_features = self._head_features(self.val)
            self.report.seconds["features"] = time.perf_counter() - start
            self.operator: HessianOperator = HeadHessian(self._train_features, self.layout)
            self._val_gradient = head.mean_gradient(val_features, self.layout)
        else:
            example = next(iter(self.val.batches(self.fmodel.device, self.fmodel.dtype)))[0][:2]
            self._tangent_program, reason = TangentProgram.compile(
                self.model, example, self.fmodel.tensors(self.fmodel.theta),
                self.fmodel.selection.names)
            self.report.scoring = TORCH_JVP if self._tangent_program is None else FUSED_TANGENT
            self.report.scoring_reason = reason
            self.operator = AutogradHessian(self.fmodel, self.train, hessian, self.progress,
                                            self._tangent_program)
            self._val_gradient = self._mean_gradient(self.val)
        self.report.seconds["gradient"] = time.perf_counter() - start

    def _head_features(self, data: LabelledData) -> head.HeadFeatures:
        """Inputs of the head and softmax outputs, by one no-grad forward pass over ``data``."""
        captured: list[torch.Tensor] = []
        hook = self.selection.head.register_forward_hook(
            lambda _m, inputs, _output: captured.append(inputs[0])
        )
        probs, labels = [], []
        try:
            with torch.no_grad():
                batches = data.batches(self.fmodel.device, self.fmodel.dtype)
                for x, y in progress_bar(batches, self.progress, f"features ({data.name})",
                                         data.num_batches()):
                    probs.append(torch.softmax(self.fmodel.logits(self.fmodel.theta, x), dim=1))
                    labels.append(y)
        finally:
            hook.remove()
        return head.HeadFeatures(torch.cat(captured), torch.cat(probs), torch.cat(labels))

    def _mean_gradient(self, data: LabelledData) -> torch.Tensor:
        fmodel = self.fmodel
        total = torch.zeros_like(fmodel.theta)
        for x, y in data.batches(fmodel.device, fmodel.dtype):
            total += torch.func.grad(lambda th, x=x, y=y: fmodel.losses(th, x, y).sum())(
                fmodel.theta
            )
        return total / len(data)

    # -- shared kernels of the queries ----------------------------------------------------

    def _wrap(self, data: DataLike, name: str) -> LabelledData:
        wrapped = LabelledData(data, name, self.batch_size)
        if self.fmodel.uses_cross_entropy:
            wrapped.check_labels(self.num_classes)
        return wrapped

    def _directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        """``−dᵀ∇l(z)`` for each sample and each row ``d`` of ``directions``: ``[n, k]``.

        The closed-form head uses cached features; a network takes one forward-mode pass per
        batch (the tangent of the per-sample losses along ``d``), never per-sample gradients:
        the fused pass of :mod:`fastinfluence.tangent` where it applies, else ``jvp``.
        """
        if self.report.path == HEAD_PATH:
            features = self._train_features if data is self.train else self._head_features(data)
            return head.scores(features, self.layout, directions)
        fmodel = self.fmodel
        columns = []
        batches = progress_bar(data.batches(fmodel.device, fmodel.dtype), self.progress,
                               f"scores ({data.name})", data.num_batches())
        if self._tangent_program is not None:
            tensors = fmodel.tensors(fmodel.theta)
            tangents = fmodel.selection.unflatten(directions)
            for x, y in batches:
                logits, dlogits = self._tangent_program.forward(tensors, tangents, x,
                                                                len(directions))
                columns.append(fmodel.loss_tangents(logits, y, dlogits).T)
            return -torch.cat(columns)
        for x, y in batches:

            def losses(theta: torch.Tensor, x=x, y=y) -> torch.Tensor:
                return fmodel.losses(theta, x, y)

            def along(direction: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(losses, (fmodel.theta,), (direction,))[1]

            if len(directions) == 1:
                columns.append(along(directions[0])[:, None])
            else:
                columns.append(torch.func.vmap(along)(directions).T)
        return -torch.cat(columns)

    def _per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        """``∇l(z)`` of each sample, ``[n, p]`` (materialised: for pairwise/self-influence)."""
        if self.report.path == HEAD_PATH:
            features = self._train_features if data is self.train else self._head_features(data)
            return head.per_sample_gradients(features, self.layout)
        fmodel = self.fmodel

        def single(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fmodel.losses(theta, x[None], y[None])[0]

        per_sample = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))
        rows = [per_sample(fmodel.theta, x, y)
                for x, y in data.batches(fmodel.device, fmodel.dtype)]
        return torch.cat(rows)


def score(
    model: nn.Module,
    train: DataLike,
    val: DataLike,
    **kwargs: Any,
) -> torch.Tensor:
    """Group influence of every training sample on the validation loss; ``[n_train]``.

    ``I(z) = −∇L(D_val)ᵀ(H + λI)^{-1}∇l(z)``: **positive = harmful** (up-weighting ``z``
    raises the validation loss); removing ``z`` changes it by about ``−I(z)/n``. Keywords
    as for :class:`Influence` (``loss_fn``, ``params``, ``solver``, ``damping``, ``hessian``,
    ``batch_size``, ``device``, ``progress``, solver options).
    """
    return Influence(model, train, val, **kwargs).scores()

