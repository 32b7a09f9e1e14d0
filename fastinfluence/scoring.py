"""``Influence`` and ``score``: the public entry points (docs/design.md §1–§3).

Conventions (Koh & Liang 2017; Eqs. 3, 7, 8 of the ISR/ISP paper, Van, Carey & Wu 2024):

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

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fastinfluence import distributed
from fastinfluence.fingerprints import data_fingerprint
from fastinfluence.functional import FunctionalModel, LossFn, OutputFn
from fastinfluence.hessian.probe import probe_model
from fastinfluence.hessian.protocol import HEAD_CLOSED_FORM, CurvatureBackend
from fastinfluence.hessian.selection import CURVATURES, curvature_sample, select_backend
from fastinfluence.hessian.solvers import (
    SOLVER_OPTIONS,
    SOLVERS,
    Solver,
    SolveReport,
    check_options,
    choose_solver,
    make_config,
    make_solver,
)
from fastinfluence.labelled_data import DataLike, LabelledData, cast_inputs, first_samples
from fastinfluence.modes import eval_mode
from fastinfluence.output_session import OutputSession
from fastinfluence.params import ParameterSelection, ParamsSpec, select_parameters
from fastinfluence.sample_independence import check_sample_independence
from fastinfluence.sharded_output import OutputDirectory

CPU_ACTIVATION_BUDGET = 8 * 2**20
"""On CPU the default batch keeps the largest activation within 8 MiB: glibc serves blocks
above 32 MiB with fresh ``mmap`` pages, and their page faults took 1.9 s of 2.0 s when
scoring 128 samples of 64² in one batch (32 per batch: 2× faster; 128²: 8 per batch). The
fused tangent pass stacks an activation with its tangent (``[x; dx]``, twice its size), so
16 MiB put that block at the threshold: on the residual CNN of ``bench_peers`` at 32², 1,024
samples scored in 2.0 s and 702 MiB peak RSS in batches of 256, 1.5–1.7 s and 490–520 MiB in
batches of 64–128 (the paper CNN at 64²: 32 or 16 per batch, the same time)."""
MAX_DEFAULT_BATCH = 256
"""The default batch size off CPU, and the largest default on CPU."""
SELF_INFLUENCE_BUDGET = 64 * 2**20
"""Bytes of per-sample gradients ``self_influence`` solves at once: ``n`` samples whose
``[n, p]`` gradients exceed it are solved in chunks of rows, so its memory does not grow with
``n`` (an iterative solver keeps a few such blocks; the direct solver's values are row by row
and do not change, an iterative solver's agree within its tolerance)."""
Solved = tuple[torch.Tensor, SolveReport, bool]
"""``s``, the report of its solve, and whether it was reused from ``out``."""
KEYWORDS = ("loss_fn", "params", "solver", "damping", "hessian", "batch_size", "device",
            "progress", "output", "process_group", "out", "curvature_samples", "curvature_seed")
"""The keywords of :class:`Influence` and :func:`score` besides the solver options."""


@dataclass
class InfluenceReport:
    """What an :class:`Influence` computed and how (output only: nothing reads it back).

    Attributes:
        path: ``"head-closed-form"`` (cached features, closed-form head) or ``"autograd"``.
        path_reason: why the closed-form head path was not taken (``None`` when it was).
        solver: the solver that ran (``"auto"`` resolved).
        hessian: the curvature that ran, ``"exact"`` or ``"gauss-newton"`` (``"auto"``
            resolved; the closed-form head's Hessian is both).
        num_params: size ``p`` of θ_S.
        shared_parameters: the selected tensors tied to several modules (one weight under
            several names): each one's name in θ_S (the first name ``named_parameters()``
            gives it) → its other names; θ_S holds it once and its derivatives sum every use.
        world_size: the ranks that took part (1 without ``torch.distributed``).
        dtype: the dtype of the computation (float32 for float16/bfloat16 models).
        scoring: how directional derivatives (scores, pairwise, and ``J V`` in Gauss-Newton
            products) are taken: ``"head-closed-form"``, ``"fused-tangent"``
            (:mod:`fastinfluence.tangent`), ``"torch.func.jvp"``, or ``"reverse-mode"``
            (per-sample gradients, for models without forward-mode derivatives).
        scoring_reason: why a faster way of scoring was passed over (``None`` when none was).
        feature_pass: on the closed-form head, how the head's inputs were read: ``"fx copy:
            ..."`` (BatchNorm folded into convolutions, channels-last) or ``"module: <why
            not>"`` (:mod:`fastinfluence.feature_pass`); ``None`` on other paths.
        solve: the report of the construction's solve ``s = (H + λI)^{-1}∇L(D_val)`` (read
            from ``out`` when ``s`` was reused from there).
        reused_ihvp: whether ``s`` was loaded from ``out`` instead of solved.
        query_solve: the report of the latest solve of :meth:`Influence.pairwise` or
            :meth:`Influence.self_influence` (``None`` before any; for self-influence solved
            in chunks, one report of them all: the largest residual, the summed iterations,
            products and seconds).
        seconds: wall time per stage (``curvature``: building the backend, which caches the
            head's features; ``fingerprint`` (with ``out``), ``gradient``, ``solve``,
            ``scores``).
    """

    path: str
    path_reason: str | None
    solver: str
    hessian: str
    num_params: int
    world_size: int
    dtype: torch.dtype
    scoring: str
    scoring_reason: str | None = None
    feature_pass: str | None = None
    solve: SolveReport | None = None
    reused_ihvp: bool = False
    query_solve: SolveReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    shared_parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)


class Influence:
    """Influence of training samples on a validation loss, solved once and queried often.

    Construction computes ``s = (H + λI)^{-1} ∇L(D_val)`` over the selected parameters; the
    methods then score any labelled data against it. The model is read, never written: its
    weights, ``training`` flags and ``requires_grad`` flags come back unchanged, and the object
    keeps its own snapshot of the weights (make a new one after training further).

    Args:
        model: a classifier returning logits (or whatever ``loss_fn`` takes).
        train: training data — ``(X, y)`` tensors (``X`` a tuple or dict of tensors for a model
            of several inputs, docs/design.md §2), a ``Dataset`` of ``(x, y)`` or a
            ``DataLoader`` (re-read over its dataset in index order: shuffling and
            ``drop_last`` do not apply); ``H`` is the Hessian of its mean loss.
        val: the data whose mean loss the influence is measured on.
        loss_fn: ``loss_fn(output, y) -> [batch]`` per-sample losses; default cross-entropy.
        params: ``"last"`` (the trainable parameters of the module holding the parameter
            the forward uses last; a frozen one is an error), ``"all"``, module names, or
            parameters of the model.
        solver: ``"direct"``, ``"cg"``, ``"lissa"``, ``"woodbury"`` or ``"auto"`` (direct for
            small θ_S, CG otherwise). ``"woodbury"``: the exact Gauss-Newton solve through the
            training set's ``n·C`` Jacobian rows, for networks with ``n·C`` below ``p``
            (:class:`~fastinfluence.WoodburyConfig`).
        damping: ``λ ≥ 0`` in ``H + λI``.
        hessian: ``"auto"`` (default: the exact Hessian for the closed-form head, where it
            equals Gauss-Newton; Gauss-Newton for networks), ``"exact"`` or ``"gauss-newton"``
            (positive semi-definite for losses convex in the output, so solvers converge where
            a network's exact Hessian is indefinite).
        batch_size: batch size for tuples and datasets (default: up to 256; on CPU, small
            enough that the largest activation of a batch stays within 8 MiB).
        device: where to compute (default: the model's device).
        progress: show tqdm progress bars on long work.
        output: picks the tensor that the loss and the curvature read from the model's output,
            for models returning a tuple or dict (e.g. ``lambda out: out["logits"]``).
        process_group: split the work over the ranks of this ``torch.distributed`` group
            (default: the default group when ``torch.distributed`` is initialised); every rank
            passes the same arguments and gets the same results (docs/design.md §7.3).
        out: a directory for resumable output (docs/design.md §2, "Resumable output"):
            ``s`` and its solve report are saved there, and an ``Influence`` built later with
            the same model, data and options loads ``s`` instead of solving
            (``report.reused_ihvp``); a directory of other settings is refused.
        curvature_samples: build ``H`` (and K-FAC factors) from this many training samples,
            drawn without replacement, seeded by ``curvature_seed``; scores still cover every
            training sample (``None``, the default, or ``len(train)``: all of them, exactly;
            :func:`~fastinfluence.hessian.selection.curvature_sample`).
        curvature_seed: seeds the draw of ``curvature_samples`` (default 0).
        **solver_options: fields of the solver's config (:class:`~fastinfluence.CGConfig`,
            :class:`~fastinfluence.LiSSAConfig`, :class:`~fastinfluence.DirectConfig`,
            :class:`~fastinfluence.WoodburyConfig`).

    With ``params="last"`` on a final ``nn.Linear`` whose output is the model's output and the
    default loss, everything runs in closed form on features cached by one forward pass, once
    the probe has checked that the closed form is the model's map (docs/design.md §3, item 3);
    ``report`` says which path, curvature and scoring ran, and why.
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
        hessian: str = "auto",
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        output: OutputFn | None = None,
        process_group: Any | None = None,
        out: str | os.PathLike | None = None,
        curvature_samples: int | None = None,
        curvature_seed: int = 0,
        **solver_options: Any,
    ) -> None:
        _check_arguments(model, solver, hessian, damping, batch_size, solver_options)
        _check_chunking(out, None)
        self.model, self.out, self.progress = model, out, progress
        self.group = distributed.process_group(process_group)
        self.damping = float(damping)
        self.train = LabelledData(train, "train", batch_size)
        self.val = LabelledData(val, "val", batch_size)
        curvature_data, sample_settings = curvature_sample(self.train, curvature_samples,
                                                           curvature_seed)
        first = next(model.parameters())
        # Two validation inputs: which module runs last, the probe, the fused pass's check.
        model_example = first_samples(next(iter(self.val.batches(first.device, first.dtype)))[0],
                                      2)
        self.selection = select_parameters(model, params, example=model_example)
        self.fmodel = FunctionalModel(model, self.selection, loss_fn,
                                      torch.device(first.device if device is None else device),
                                      output)
        with eval_mode(model):
            example = cast_inputs(model_example, self.fmodel.device, self.fmodel.dtype)
            probe = probe_model(self.fmodel, example, hessian)
            check_sample_independence(self.fmodel, example, self.train)
            self.num_classes = probe.num_classes
            self.batch_size = batch_size or _default_batch_size(self.fmodel, probe.sample_bytes)
            self.train.batch_size = self.val.batch_size = self.batch_size
            curvature_data.batch_size = self.batch_size
            for data in (self.train, self.val):
                self._check_labels(data)
            seconds: dict[str, float] = {}
            with _timed(seconds, "curvature"):
                self.backend: CurvatureBackend = distributed.wrap(
                    lambda data, sample_sums: select_backend(
                        self.fmodel, probe, data, example, hessian, progress, sample_sums),
                    curvature_data, self.group,
                )
            solver = choose_solver(solver, self.backend)
            config = make_config(solver, solver_options, self.fmodel.dtype)
            self._make_solver = lambda: make_solver(solver, self.backend, self.damping, config,
                                                    progress)
            self._solver: Solver | None = None
            self._session = OutputSession(self.fmodel, self.train, self.val, {
                "params": list(self.selection.names), "damping": self.damping,
                "hessian": self.backend.curvature, "solver": solver,
                "solver_config": asdict(config), "dtype": str(self.fmodel.dtype),
                **sample_settings,
            }, self.group, progress)
            directory, saved = self._saved_ihvp(out, seconds)
            if saved is None:  # solved here, so that a solve's warning names the caller's line
                with _timed(seconds, "gradient"):
                    val_gradient = self.backend.mean_gradient(self.val)
                with _timed(seconds, "solve"):
                    solution, solve = self.solver.solve(val_gradient[None])
                saved = solution[0], solve, False
                if directory is not None:
                    directory.save_ihvp(solution[0], solve.as_dict())
        self._ihvp, self._solve_report, reused = saved
        self.report = _new_report(self.backend, probe.head_reason, solver, self.fmodel.dtype,
                                  self.group, self.selection)
        self.report.solve, self.report.reused_ihvp, self.report.seconds = (
            self._solve_report, reused, seconds)

    @property
    def ihvp(self) -> torch.Tensor:
        """``s = (H + λI)^{-1} ∇L(D_val)``, flat over θ_S in ``named_parameters`` order."""
        return self._ihvp

    @property
    def solver(self) -> Solver:
        """The inverse-HVP solver (built on first use when ``s`` was reused from ``out``: the
        direct solver's explicit matrix costs ``p`` products)."""
        if self._solver is None:
            with eval_mode(self.model):
                self._solver = self._make_solver()
        return self._solver

    # -- public queries -------------------------------------------------------------------

    def scores(self, data: DataLike | None = None, out: str | os.PathLike | None = None,
               chunk_size: int | None = None) -> torch.Tensor:
        """Group influence ``I(z) = −sᵀ∇l(z)`` of each sample (Eq. 7); ``[n]``, > 0 harmful.

        Args:
            data: labelled data to score (default: the training set).
            out: a directory to write the result to in chunks of ``chunk_size`` samples as
                they finish, skipping the chunks already there (docs/design.md §2,
                "Resumable output"); the whole result is returned either way.
            chunk_size: samples per chunk file (default 4096; only with ``out``).
        """
        _check_chunking(out, chunk_size)
        target = self.train if data is None else self._wrap(data, "data")
        with _timed(self.report.seconds, "scores"):
            return self._query("scores", target, out, chunk_size, (), lambda part: (
                -self.backend.directional(part, self._ihvp[None])[:, 0]))

    def pairwise(self, test: DataLike, out: str | os.PathLike | None = None,
                 chunk_size: int | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """``I(z_i, z_j) = −∇l(z_j)ᵀ(H + λI)^{-1}∇l(z_i)`` for training ``z_i`` and test ``z_j``
        (Eq. 3); ``[n_train, n_test]``. Solves one inverse-HVP per test sample.

        ``out`` and ``chunk_size`` as for :meth:`scores`, chunks over training samples (the
        test solve is repeated on a resumed run unless every chunk is finished). ``rows``:
        score only these training samples (``[len(rows), n_test]``, not with ``out``), as the
        gradient store's exact re-scoring of its top candidates does."""
        _check_chunking(out, chunk_size)
        if rows is not None and out is not None:
            raise ValueError("pairwise: rows= scores a few training samples in memory; it "
                             "does not take out=")
        train = self.train if rows is None else self.train.subset(torch.as_tensor(rows))
        test_data = self._wrap(test, "test")

        @functools.cache
        def directions() -> torch.Tensor:
            gradients = self.backend.per_sample_gradients(test_data)
            solution, self.report.query_solve = self.solver.solve(gradients)
            self.report.scoring_reason = self.backend.scoring_reason  # a per-sample loop's note
            return solution

        return self._query("pairwise", train, out, chunk_size, (len(test_data),),
                           lambda part: -self.backend.directional(part, directions()),
                           test=test_data)

    def self_influence(self, data: DataLike | None = None, out: str | os.PathLike | None = None,
                       chunk_size: int | None = None) -> torch.Tensor:
        """``∇l(z)ᵀ(H + λI)^{-1}∇l(z)`` of each sample; ``[n]``, ≥ 0 when ``H + λI`` is PD.

        ``out`` and ``chunk_size`` as for :meth:`scores` (an iterative solver solves each
        chunk's samples together, so chunked and whole results agree within its tolerance;
        the direct solver's agree to rounding). Without ``out`` too, samples whose ``[n, p]``
        gradients exceed :data:`SELF_INFLUENCE_BUDGET` are solved in chunks of rows."""
        _check_chunking(out, chunk_size)
        target = self.train if data is None else self._wrap(data, "data")
        return self._query("self-influence", target, out, chunk_size, (),
                           self._self_influence_of)

    def perturbation(self, x: torch.Tensor, y: torch.Tensor, out: str | os.PathLike | None = None,
                     chunk_size: int | None = None) -> torch.Tensor:
        """Perturbation influence ``I_pert(z) = −∇_x(sᵀ∇_θ l(z))`` (Eq. 8), shaped like ``x``
        and of its dtype.

        A step ``x ← x − γ·I_pert`` moves ``z`` so as to lower the validation loss the most
        (to first order). Samples are independent in eval mode, so one batched
        double-backward gives every sample's map. ``x`` must be floating point (the gradient
        with respect to integer inputs such as token ids is not defined). ``out`` and
        ``chunk_size`` as for :meth:`scores`, chunks over samples of ``x``. A model of several
        inputs is refused: ``x`` is one tensor (docs/design.md §2).
        """
        _check_perturbed_inputs(x)
        _check_chunking(out, chunk_size)
        data = self._wrap((x, y), "x")
        maps = self._query("perturbation", data, out, chunk_size, tuple(x.shape[1:]),
                           lambda part: self.backend.perturbation(part, self._ihvp))
        return maps.to(device=x.device, dtype=x.dtype)

    # -- the queries' work, on whole data sets or chunks ----------------------------------

    def _query(self, kind: str, samples: LabelledData, out: str | os.PathLike | None,
               chunk_size: int | None, row_shape: tuple[int, ...],
               compute: Callable[[LabelledData], torch.Tensor],
               test: LabelledData | None = None) -> torch.Tensor:
        """``compute(samples)`` in eval mode; with ``out``, chunk by chunk through the output
        session, described by the fingerprint of ``samples`` (of ``test`` when given)."""
        with eval_mode(self.model):
            if out is None:
                return compute(samples)
            description = ({"data": data_fingerprint(samples)} if test is None
                           else {"test": data_fingerprint(test)})
            return self._session.chunked(kind, out, chunk_size, samples, description, row_shape,
                                         lambda rows: compute(samples.subset(rows)),
                                         self._ihvp, self._solve_report)

    def _self_influence_of(self, data: LabelledData) -> torch.Tensor:
        """Each sample's ``∇l(z)ᵀ(H + λI)^{-1}∇l(z)``, its gradients solved together in
        chunks of at most :data:`SELF_INFLUENCE_BUDGET` bytes (never ``[n, p]`` at once)."""
        itemsize = torch.empty((), dtype=self.fmodel.dtype).element_size()
        rows = max(1, SELF_INFLUENCE_BUDGET // (self.backend.dim * itemsize))
        parts, reports = [], []
        for start in range(0, len(data), rows):
            chunk = (data if rows >= len(data) else
                     data.subset(torch.arange(start, min(start + rows, len(data)))))
            values, report = self.solver.quadratic_form(self.backend.per_sample_gradients(chunk))
            parts.append(values)
            reports += [] if report is None else [report]
        self.report.scoring_reason = self.backend.scoring_reason  # a per-sample loop's note
        if reports:
            self.report.query_solve = _merged(reports)
        return torch.cat(parts)

    def _saved_ihvp(self, out: str | os.PathLike | None, seconds: dict[str, float]
                    ) -> tuple[OutputDirectory | None, Solved | None]:
        """The directory ``out`` (``None`` without it) and ``s`` with its solve report reused
        from there (``None`` when it is to be solved). Every rank decides here, before its
        first collective, whether to solve: no rank can have saved this run's ``s`` yet, so
        all ranks see the same files."""
        if out is None:
            return None, None
        with _timed(seconds, "fingerprint"):
            directory = self._session.open(out)
            saved = self._session.saved_ihvp(directory, out, self.backend.dim)
        return directory, None if saved is None else (*saved, True)

    def _wrap(self, data: DataLike, name: str) -> LabelledData:
        wrapped = LabelledData(data, name, self.batch_size)
        self._check_labels(wrapped)
        return wrapped

    def _check_labels(self, data: LabelledData) -> None:
        if self.fmodel.uses_cross_entropy:
            data.check_labels(self.num_classes)


def _merged(reports: list[SolveReport]) -> SolveReport:
    """One report for the solves of several chunks: the worst residual, every iteration,
    product and second counted."""
    first = reports[0]
    return replace(
        first,
        iterations=sum(r.iterations for r in reports),
        hessian_products=sum(r.hessian_products for r in reports),
        relative_residual=max(r.relative_residual for r in reports),
        converged=all(r.converged for r in reports),
        seconds=sum(r.seconds for r in reports),
    )


def _new_report(backend: CurvatureBackend, head_reason: str | None, solver: str,
                dtype: torch.dtype, group: Any | None,
                selection: ParameterSelection) -> InfluenceReport:
    """The report of an :class:`Influence` built on ``backend`` (its solve added after)."""
    return InfluenceReport(
        path=HEAD_CLOSED_FORM if backend.name == HEAD_CLOSED_FORM else "autograd",
        path_reason=head_reason,
        solver=solver,
        hessian=backend.curvature,
        num_params=backend.dim,
        world_size=1 if group is None else distributed.Shards.of(group).world,
        dtype=dtype,
        scoring=backend.scoring,
        scoring_reason=backend.scoring_reason,
        feature_pass=backend.feature_pass,
        shared_parameters=dict(selection.shared),
    )


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of the block in ``seconds[stage]`` (when it finishes)."""
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start


def _default_batch_size(fmodel: FunctionalModel, sample_bytes: int) -> int:
    """:data:`MAX_DEFAULT_BATCH` off CPU; on CPU the largest power of two whose largest
    activation fits :data:`CPU_ACTIVATION_BUDGET`."""
    if fmodel.device.type != "cpu":
        return MAX_DEFAULT_BATCH
    fitting = max(1, CPU_ACTIVATION_BUDGET // max(sample_bytes, 1))
    return min(MAX_DEFAULT_BATCH, 2 ** (fitting.bit_length() - 1))


def _check_perturbed_inputs(x: Any) -> None:
    """``x`` of :meth:`Influence.perturbation` must be one floating-point tensor."""
    if isinstance(x, (tuple, list, Mapping)):
        raise TypeError(
            f"perturbation takes x as one input tensor, got a {type(x).__name__} of inputs: "
            "to perturb one input of a model of several, build the Influence on a module "
            "that takes that input alone as a tensor (e.g. the others concatenated into it "
            "and split inside forward)"
        )
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(
            f"perturbation needs floating-point inputs x, got {kind}: the gradient with "
            "respect to integer inputs (such as token ids) is not defined"
        )


def _check_arguments(
    model: Any,
    solver: Any,
    hessian: Any,
    damping: Any,
    batch_size: Any,
    solver_options: dict[str, Any],
) -> None:
    """The cheap checks of :class:`Influence`'s arguments, before any data is read."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if hessian not in CURVATURES:
        raise ValueError(f"hessian must be one of {CURVATURES}, got {hessian!r}")
    if (isinstance(damping, bool) or not isinstance(damping, (int, float))
            or not math.isfinite(damping) or damping < 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    unknown = sorted(set(solver_options) - SOLVER_OPTIONS)
    if unknown:
        raise TypeError(
            f"unknown keyword argument(s) {unknown} of score/Influence; its keywords are "
            f"{list(KEYWORDS)} and the solvers' options {sorted(SOLVER_OPTIONS)}"
        )
    check_options(solver_options, solver)
    if not any(True for _ in model.parameters()):
        raise ValueError("the model has no parameters: there is nothing to take influence over")


def _check_chunking(out: Any, chunk_size: Any) -> None:
    """The checks of a query's ``out`` and ``chunk_size``, before any work."""
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path (str or os.PathLike), got "
                        f"{type(out).__name__}")
    if chunk_size is None:
        return
    if out is None:
        raise ValueError("chunk_size needs out=<directory>: only written output is chunked")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


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
    ``batch_size``, ``device``, ``progress``, ``output``, ``out``, solver options); with
    ``out`` the scores are written there too, in chunks of ``chunk_size`` samples
    (:meth:`Influence.scores`), and ``s`` is saved and reused.
    """
    chunk_size = kwargs.pop("chunk_size", None)
    influence = Influence(model, train, val, **kwargs)
    return influence.scores(out=influence.out, chunk_size=chunk_size)

