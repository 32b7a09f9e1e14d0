"""Solvers for ``x = (H + λI)^{-1} b`` with one or many right-hand sides ``b``.

``λ`` (``damping``) is always the additive damping of docs/design.md §1; the solvers converge to
``(H + λI)^{-1} b`` and nothing else. LiSSA's ``scale`` is an internal step size, not damping.
Every solve returns a :class:`SolveReport` with the *true* relative residual
``‖(H + λI)x − b‖ / ‖b‖`` measured after the solve; a solve that misses its tolerance warns.

The iterative solvers' default tolerance (``tol=None``) depends on the compute dtype
(:func:`default_tol`): a float32 solve's true residual stalls at a rounding floor (1e-7–5e-6
on ordinary problems).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch

from fastinfluence import ops
from fastinfluence.distributed import DistributedBackend
from fastinfluence.errors import DivergenceError, NotPositiveDefiniteError
from fastinfluence.hessian.kfac import KRONECKER_CURVATURES
from fastinfluence.hessian.preconditioner import PRECONDITIONERS, KroneckerPreconditioner
from fastinfluence.hessian.protocol import HEAD_CLOSED_FORM, Capability, CurvatureBackend
from fastinfluence.progress import progress_bar


def default_tol(dtype: torch.dtype) -> float:
    """The tolerance of CG and LiSSA when none is given: ``1e-6`` in float64, ``1e-4`` in
    float32 (the only compute dtypes: half-precision models are solved in float32).

    The true relative residual ``‖(H + λI)x − b‖/‖b‖`` of a float32 solve stalls at a rounding
    floor however long CG runs. ``python benchmarks/float32_tolerance.py --threads 2`` (CG with
    ``tol=1e-12``, damping 0.01 / 0.001; ``benchmarks/results/float32_tolerance.json``) measured
    8.7e-7 / 4.6e-6 on a logistic regression of scikit-learn's digits (``params="last"``),
    1.4e-6 / 1.4e-6 on a 50,000-sample one, 4.8e-7 / 2.4e-6 on an MLP on the digits
    (``params="all"``), 1.2e-7 / 3.4e-7 on an untrained 32² paper CNN (Gauss-Newton,
    ``params="all"``). ``1e-6``, the float64 default, sits on these floors (a solve then warns
    that it missed ``tol`` after converging as far as float32 can); ``1e-4`` keeps a margin of
    20 over the highest. Badly conditioned float32 problems stall higher and still warn,
    rightly: the same CNN after 50 Adam steps stops at 5.4e-4 / 7.4e-3 (more damping, or
    float64, is the remedy).
    """
    return 1e-6 if dtype == torch.float64 else 1e-4


def with_default_tol(config, dtype: torch.dtype):
    """``config`` with ``tol=None`` replaced by :func:`default_tol` of ``dtype``."""
    return config if config.tol is not None else replace(config, tol=default_tol(dtype))



@dataclass(frozen=True)
class DirectConfig:
    """Explicit ``H``, then Cholesky: the Gauss-Newton matrix summed from per-sample Jacobian
    rows (one pass over the data, memory ``p²`` whatever ``n``), the exact Hessian from
    batched Hessian-vector products with identity columns (``p`` products), K-FAC in closed
    form.

    The in-memory solver: it holds ``p × p`` numbers and refuses, before building them, a
    matrix larger than the device's memory (:func:`device_memory_bytes`); K-FAC's closed-form
    inverse holds no matrix.

    Attributes:
        chunk: identity columns per batched product while building ``H`` (the Gauss-Newton
            matrix: samples per vectorised Jacobian).
        tol: relative residual above which the solve is reported as not converged.
    """

    chunk: int = 32
    tol: float = 1e-3

    def __post_init__(self) -> None:
        _require_integer(self, "chunk", minimum=1)
        _require_positive_finite(self, "tol")


@dataclass(frozen=True)
class CGConfig:
    """Conjugate gradients on ``H + λI``, on the operator's device, optionally preconditioned.

    Attributes:
        max_iter: most iterations (each is one Hessian-vector product over the data).
        tol: stop when every column's relative residual ``‖r‖/‖b‖`` of the system
            ``(H + λI)x = b`` (never of the preconditioned one) is below this; ``None``:
            :func:`default_tol` of the compute dtype (1e-6 in float64, 1e-4 in float32).
        preconditioner: ``None`` (plain CG), ``"kfac"`` or ``"ekfac"``: preconditioned CG
            with ``(K + λI)^{-1}`` of the Kronecker-factored Gauss-Newton matrix ``K`` of the
            same model and training samples, for ``hessian="gauss-newton"`` or ``"exact"``
            (:mod:`fastinfluence.hessian.preconditioner`; its factors cost one pass over the
            training samples, two for EK-FAC, counted in the first report).
    """

    max_iter: int = 500
    tol: float | None = None
    preconditioner: str | None = None

    def __post_init__(self) -> None:
        _require_integer(self, "max_iter", minimum=1)
        if self.tol is not None:
            _require_positive_finite(self, "tol")
        if self.preconditioner is not None and self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be None or one of {PRECONDITIONERS}, got "
                             f"{self.preconditioner!r}")


@dataclass(frozen=True)
class LiSSAConfig:
    """LiSSA (Agarwal et al. 2017; Koh & Liang 2017) with automatic scale.

    The recursion ``h₀ = b``, ``h_{t+1} = b + (1 − λ/scale)·h_t − H_B h_t / scale`` converges to
    ``scale·(H + λI)^{-1} b`` when every eigenvalue of ``(H + λI)/scale`` lies in ``(0, 2)``;
    the estimate is ``h_t / scale``, averaged over ``repeats``. ``H_B`` is the Hessian on a
    minibatch of ``minibatch_size`` training samples drawn with replacement (``None``: the whole
    training set, so the recursion is deterministic and ``h_{t+1} − h_t`` is exactly the
    residual of the current estimate).

    Attributes:
        depth: most recursion steps per repeat.
        repeats: independent recursions averaged (useful with minibatches).
        scale: step divisor; ``None`` picks ``1.1·(|λ|_max(H) + λ)`` by power iteration.
        minibatch_size: samples per Hessian-vector product, ``None`` for all of them.
        tol: stop a repeat when ``‖h_{t+1} − h_t‖ ≤ tol·‖b‖`` for every column ``b``. A
            full-batch repeat also stops when that step has stalled (a tolerance below the
            rounding floor, see :class:`_StallDetector`), reported as not converged.
            ``None``: :func:`default_tol` of the compute dtype.
        seed: seeds the minibatch sampling and the power iteration.
        power_iters: most power-iteration steps for the automatic scale.
    """

    depth: int = 10_000
    repeats: int = 1
    scale: float | None = None
    minibatch_size: int | None = None
    tol: float | None = None
    seed: int = 0
    power_iters: int = 30

    def __post_init__(self) -> None:
        _require_integer(self, "depth", minimum=1)
        _require_integer(self, "repeats", minimum=1)
        if self.scale is not None:
            _require_positive_finite(self, "scale")
        if self.minibatch_size is not None:
            _require_integer(self, "minibatch_size", minimum=1)
        if self.tol is not None:
            _require_positive_finite(self, "tol")
        _require_integer(self, "seed", minimum=0)
        _require_integer(self, "power_iters", minimum=1)


@dataclass(frozen=True)
class WoodburyConfig:
    """Exact Gauss-Newton solves through the training set's Jacobian rows (Woodbury identity).

    Attributes:
        max_gib: largest ``B`` (``n·K × p`` numbers: ``K`` rows a sample, the rank of the
            loss's output Hessian, ``C − 1`` for softmax cross-entropy over ``C`` classes) it
            builds, in GiB; above it, or above the device's memory, the solver refuses and
            the direct solver (memory ``p²``) or CG is the way.
        tol: relative residual above which the solve is reported as not converged.
        chunk_size: training samples per vectorised Jacobian while building ``B``; small
            chunks stay in cache (on CPU, the set-up on the benchmark's residual CNN took
            7.9–9.5 s at 16, 11.1–15.1 s in whole batches of 256).
    """

    max_gib: float = 8.0
    tol: float = 1e-3
    chunk_size: int = 16

    def __post_init__(self) -> None:
        _require_positive_finite(self, "max_gib")
        _require_positive_finite(self, "tol")
        _require_integer(self, "chunk_size", 1)


@dataclass(frozen=True)
class SolveReport:
    """How an inverse-HVP solve went.

    Attributes:
        solver: a name of :data:`REGISTRY` (``"direct"``, ``"cg"``, ``"lissa"``,
            ``"woodbury"``).
        iterations: CG iterations or LiSSA steps (summed over repeats); 0 for direct.
        hessian_products: Hessian-vector products taken, on the whole training set or on a
            LiSSA minibatch: the residual check included, and in a solver's first report
            also those taken to build it (the explicit matrix, LiSSA's power iteration). A
            pass of Gauss-Newton Jacobian rows (the Woodbury rows, or the direct solver's
            explicit Gauss-Newton matrix) counts as one.
        relative_residual: ``max_j ‖(H + λI)x_j − b_j‖ / ‖b_j‖`` measured after the solve.
        converged: whether ``relative_residual`` met the solver's tolerance.
        seconds: wall time of the solve.
        scale: LiSSA's scale (``None`` for other solvers).
        preconditioner: CG's preconditioner (``"kfac"``, ``"ekfac"``; ``None`` for none).
        preconditioner_passes: passes over the training samples taken to fit it (in the
            solver's first report; each costs about one Hessian-vector product per output
            class, more than a product in a network with many classes).
    """

    solver: str
    iterations: int
    hessian_products: int
    relative_residual: float
    converged: bool
    seconds: float
    scale: float | None = None
    preconditioner: str | None = None
    preconditioner_passes: int = 0

    def as_dict(self) -> dict:
        """The fields as a plain dictionary (for JSON)."""
        return asdict(self)


class Solver:
    """Solves ``(H + λI) X = B`` for ``B`` of shape ``[k, p]``.

    ``operator`` is the curvature half of a :class:`~fastinfluence.hessian.protocol.
    CurvatureBackend`: ``matvec``, ``dense``, ``subsample``, ``num_samples``, ``passes`` and the
    optional capabilities it declares (``closed_form_inverse``, ``lissa_recursion``,
    ``factor_rows``).
    """

    name: str

    def __init__(self, operator: CurvatureBackend, damping: float, config, progress: bool):
        self.operator = operator
        self.damping = damping
        self.config = with_default_tol(config, operator.dtype)
        self.progress = progress
        # The first solve's report counts the products taken while the solver was built
        # (the explicit matrix, LiSSA's power iteration).
        self._products_counted = operator.passes

    def solve(self, rhs: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
        """``X`` with ``(H + λI) X = rhs`` row by row, and how the solve went (warns when the
        true residual misses the tolerance)."""
        start = time.perf_counter()
        solution, iterations, scale = self._solve(rhs)
        residual = self._relative_residual(solution, rhs)
        products = self.operator.passes - self._products_counted
        self._products_counted = self.operator.passes
        report = SolveReport(
            solver=self.name,
            iterations=iterations,
            hessian_products=products,
            relative_residual=residual,
            converged=residual <= self.config.tol,
            seconds=time.perf_counter() - start,
            scale=scale,
            **self._preconditioning(),
        )
        if not report.converged:
            warnings.warn(
                f"{self.name} solve did not reach tol={self.config.tol:g}: relative residual "
                f"{residual:.3g} after {iterations} iterations (see Influence.report)"
                f"{self._exact_alternatives()}",
                RuntimeWarning,
                stacklevel=3,
            )
        return solution, report

    def _exact_alternatives(self) -> str:
        """For an iterative solve of a Gauss-Newton matrix that missed its tolerance: the
        solvers that are exact without iterating, with the memory each would hold."""
        operator = self.operator
        if self.name in ("direct", "woodbury") or not operator.offers(Capability.FACTOR_ROWS):
            return ""
        size = operator.dtype.itemsize / 2**30
        return (f"; exact without iterations: solver='direct' ({operator.dim**2 * size:.3g} "
                f"GiB for the p × p matrix, p = {operator.dim}) or solver='woodbury' "
                f"(n·K × p Jacobian rows, {operator.num_samples * operator.dim * size:.3g} GiB "
                f"per row a sample, K = C − 1 for softmax cross-entropy)")

    def quadratic_form(self, vectors: torch.Tensor) -> tuple[torch.Tensor, SolveReport | None]:
        """``vᵀ(H + λI)^{-1}v`` for each row ``v`` of ``vectors``, and the report of the solve
        it took (``None`` where the solver's factorisation gives it without a solve)."""
        solutions, report = self.solve(vectors)
        return (vectors * solutions).sum(dim=1), report

    def _solve(self, rhs: torch.Tensor) -> tuple[torch.Tensor, int, float | None]:
        raise NotImplementedError

    def _preconditioning(self) -> dict:
        """The report's preconditioner fields (none by default)."""
        return {}

    def _apply(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.operator.matvec(vectors) + self.damping * vectors

    def _relative_residual(self, solution: torch.Tensor, rhs: torch.Tensor) -> float:
        residual = (self._apply(solution) - rhs).norm(dim=1)
        norms = rhs.norm(dim=1)
        relative = torch.where(norms > 0, residual / norms.clamp_min(1e-300), residual)
        return float(relative.max()) if len(relative) else 0.0


class DirectSolver(Solver):
    """Cholesky factorisation of the explicit ``H + λI``, reused for every later solve; or the
    operator's ``closed_form_inverse`` where it has one (no explicit matrix then)."""

    name = "direct"

    def __init__(self, operator: CurvatureBackend, damping: float, config: DirectConfig,
                 progress: bool = False):
        super().__init__(operator, damping, config, progress)
        self.matrix: torch.Tensor | None = None
        if operator.offers(Capability.CLOSED_FORM_INVERSE):
            return
        _check_fits(operator.dim**2 * operator.dtype.itemsize, operator,
                    f"solver='direct' builds the explicit p × p matrix (p = {operator.dim})",
                    "use solver='cg'")
        self.matrix = operator.dense(config.chunk)
        self.matrix.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(self.matrix)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(self.matrix)[0])
            advice = f"a damping above {damping - smallest:.4g}"
            raise NotPositiveDefiniteError(
                f"H + λI is not positive definite (smallest eigenvalue {smallest:.4g} with "
                f"damping λ={damping:g}): {_remedy(operator, advice)}"
            )
        self.factor = factor

    def _solve(self, rhs):
        if self.matrix is None:
            return self.operator.closed_form_inverse(rhs, self.damping), 0, None
        solution = self._factor_solve(rhs)
        if self.matrix.dtype == torch.float64:
            return solution, 0, None
        # One step of iterative refinement, the residual in float64: a float32 Cholesky solve
        # loses digits in proportion to the condition number of H + λI (2e-4 relative
        # residual on a small CNN at λ = 1e-4, 7e-6 after the step). More steps do not help:
        # the float32 solution's own rounding, amplified by the matrix, is the floor. The step
        # is kept only where it lowers the residual.
        residual = rhs.double() - self._apply(solution)
        refined = solution + self._factor_solve(residual.to(rhs.dtype))
        if (rhs.double() - self._apply(refined)).norm() < residual.norm():
            solution = refined
        return solution, 0, None

    def _factor_solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(LLᵀ)^{-1}`` of each row: two triangular solves, not ``cholesky_solve``, which
        copies the ``p × p`` factor each call (at p = 18,043 in float64: 2.4 GiB, 4× the time)."""
        whitened = torch.linalg.solve_triangular(self.factor, rhs.T, upper=False)
        return torch.linalg.solve_triangular(self.factor.mT, whitened, upper=True).T

    def _apply(self, vectors):
        """``(H + λI)`` times each row, in float64 (the matrix upcast a block of rows at a
        time), so that the refinement's and the report's residuals are not float32's."""
        if self.matrix is None:
            return super()._apply(vectors)
        if self.matrix.dtype == torch.float64:
            return vectors @ self.matrix
        product = vectors.new_zeros(len(vectors), self.matrix.shape[1], dtype=torch.float64)
        for start in range(0, len(self.matrix), UPCAST_ROWS):
            stop = start + UPCAST_ROWS
            product += vectors[:, start:stop].double() @ self.matrix[start:stop].double()
        return product

    def quadratic_form(self, vectors: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``vᵀ(H + λI)^{-1}v`` for each row ``v``, as ``‖L^{-1}v‖²`` (no solve to report)."""
        if self.matrix is None:
            return (vectors * self._solve(vectors)[0]).sum(dim=1), None
        whitened = torch.linalg.solve_triangular(self.factor, vectors.T, upper=False)
        return (whitened * whitened).sum(dim=0), None


UPCAST_ROWS = 1024
"""Rows of the direct solver's explicit matrix upcast to float64 at a time (:meth:`DirectSolver.
_apply`)."""


class WoodburySolver(Solver):
    """``(G + λI)^{-1}`` of a Gauss-Newton matrix ``G = BᵀB`` of rank at most ``n·K`` (``B``:
    the backend's ``factor_rows``, ``K`` rows a sample), exactly, by the Woodbury identity

        (BᵀB + λI)^{-1} b = (b − Bᵀ(BBᵀ + λI)^{-1} B b) / λ,

    so the only factorisation is of the ``n·K × n·K`` matrix ``BBᵀ + λI`` (positive definite
    for ``λ > 0``), built once and reused for every later solve. Cheaper than the direct solver
    whenever ``n·K < p``; memory ``n·K·p`` numbers."""

    name = "woodbury"

    def __init__(self, operator: CurvatureBackend, damping: float, config: WoodburyConfig,
                 progress: bool = False):
        super().__init__(operator, damping, config, progress)
        if not operator.offers(Capability.FACTOR_ROWS):
            raise ValueError(_woodbury_refusal(operator))
        if not damping > 0:
            raise ValueError(f"solver='woodbury' needs damping > 0 (BBᵀ + λI is singular at "
                             f"λ = 0 when n·K > p), got {damping!r}")
        # B has K rows per sample: one row per sample bounds its size before it is built.
        _check_size(operator.num_samples * operator.dim * operator.dtype.itemsize, operator,
                    config)
        self.rows = operator.factor_rows(config.chunk_size)
        _check_size(self.rows.numel() * self.rows.element_size(), operator, config)
        gram = _gram(self.rows)
        gram.diagonal().add_(damping)
        self.factor = torch.linalg.cholesky(gram)

    def _solve(self, rhs):
        inner = torch.cholesky_solve(self.rows @ rhs.T, self.factor)
        return ((rhs.T - self.rows.T @ inner) / self.damping).T, 0, None

    def _apply(self, vectors):
        return (vectors @ self.rows.T) @ self.rows + self.damping * vectors


def _woodbury_refusal(operator: CurvatureBackend) -> str:
    """Why ``operator`` offers no Woodbury rows, and what solves its curvature instead."""
    if operator.name == HEAD_CLOSED_FORM:
        return ("solver='woodbury' is for the Gauss-Newton matrix of a network; the closed-form "
                "head's Hessian is explicit and small: use solver='direct' (exact) or 'cg' "
                "(solver='auto' picks one)")
    if operator.name in KRONECKER_CURVATURES:
        return (f"solver='woodbury' factors the Gauss-Newton matrix, not "
                f"hessian={operator.name!r}, whose inverse is already in closed form: use "
                "solver='direct' (solver='auto' picks it)")
    if isinstance(operator, DistributedBackend):
        return ("solver='woodbury' is not offered across processes (its n·K × n·K system spans "
                "every rank's rows): use solver='cg' (or 'direct' for a small θ_S)")
    return (f"solver='woodbury' factors the Gauss-Newton matrix, not hessian={operator.name!r}: "
            "pass hessian='gauss-newton' (or keep the exact Hessian with solver='cg')")


def _gram(rows: torch.Tensor, block: int = 384) -> torch.Tensor:
    """``rows @ rows.T`` from its lower block triangle, mirrored: the product is most of the
    Woodbury set-up time and symmetric, so the blocks above the diagonal are copied, not
    computed (on CPU, 1,536 × 284k float32: 6–7 s against 10–11 s for the full product)."""
    gram = rows.new_empty(len(rows), len(rows))
    for start in range(0, len(rows), block):
        stop = start + block
        below = rows[start:] @ rows[start:stop].T
        gram[start:, start:stop] = below
        gram[start:stop, start:] = below.T
    return gram


def device_memory_bytes(device: torch.device) -> int | None:
    """The total memory of ``device`` (the machine's physical memory for the CPU); ``None``
    where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def _check_fits(size: int, operator: CurvatureBackend, what: str, instead: str) -> None:
    """Refuse an in-memory solver whose matrix of ``size`` bytes exceeds the device's memory,
    before it is built (it would be killed for memory part-way instead)."""
    memory = device_memory_bytes(operator.device)
    if memory is not None and size > memory:
        raise ValueError(f"{what}: {size / 2**30:.3g} GiB, more than the {memory / 2**30:.3g} "
                         f"GiB of memory of {operator.device}; {instead}")


def _check_size(size: int, operator: CurvatureBackend, config: WoodburyConfig) -> None:
    """Refuse Woodbury rows of ``size`` bytes above ``config.max_gib`` or the device's
    memory."""
    _check_fits(size, operator, f"solver='woodbury' holds n·K × p numbers (n = "
                f"{operator.num_samples}, p = {operator.dim})",
                "use solver='direct' (p × p numbers) or 'cg'")
    if size / 2**30 > config.max_gib:
        raise ValueError(
            f"solver='woodbury' needs n·K × p numbers, {size / 2**30:.3g} GiB or more (n = "
            f"{operator.num_samples}, p = {operator.dim}), above max_gib={config.max_gib:g}: "
            "raise max_gib, or use solver='direct' (p × p numbers) or 'cg'"
        )


class CGSolver(Solver):
    """Conjugate gradients, all columns at once (each iteration: one batched product);
    preconditioned CG with ``M^{-1}`` applied to each residual when the config names a
    preconditioner (the identity otherwise, which is plain CG).

    Per column: ``r₀ = b``, ``z₀ = M^{-1}r₀``, ``d₀ = z₀``; then ``α = rᵀz / dᵀ(H + λI)d``,
    ``x += αd``, ``r −= α(H + λI)d``, ``z = M^{-1}r``, ``d = z + (r'ᵀz'/rᵀz) d``, until
    ``‖r‖ ≤ tol·‖b‖``: ``r`` is the residual of the unpreconditioned system, so the stop is
    the same with or without ``M``.
    """

    name = "cg"

    def __init__(self, operator: CurvatureBackend, damping: float, config: CGConfig,
                 progress: bool = False):
        super().__init__(operator, damping, config, progress)
        self.preconditioner = None
        self._fit_passes = 0
        if config.preconditioner is not None:
            self.preconditioner = KroneckerPreconditioner(operator, config.preconditioner,
                                                          damping, progress)
            self._fit_passes = self.preconditioner.passes

    def _preconditioning(self) -> dict:
        passes, self._fit_passes = self._fit_passes, 0  # counted in the first report only
        return {"preconditioner": self.config.preconditioner, "preconditioner_passes": passes}

    def _precondition(self, residual: torch.Tensor) -> torch.Tensor:
        return residual if self.preconditioner is None else self.preconditioner(residual)

    def _solve(self, rhs):
        config: CGConfig = self.config
        solution = torch.zeros_like(rhs)
        residual = rhs.clone()
        preconditioned = self._precondition(residual)
        direction = preconditioned.clone()
        squared = (residual * residual).sum(dim=1)
        inner = (residual * preconditioned).sum(dim=1)
        targets = (config.tol * rhs.norm(dim=1)) ** 2
        iterations = 0
        bar = progress_bar(range(config.max_iter), self.progress, "CG")
        for _ in bar:
            active = squared > targets
            if not bool(active.any()):
                break
            iterations += 1
            product = self._apply(direction)
            curvature = (direction * product).sum(dim=1)
            if bool((active & (curvature <= 0)).any()):
                raise NotPositiveDefiniteError(
                    f"CG met non-positive curvature at iteration {iterations}: H + λI is not "
                    f"positive definite (damping λ={self.damping:g}): "
                    f"{_remedy(self.operator, 'more damping')}"
                )
            step = torch.where(active, inner / curvature.where(active, 1.0), 0.0)
            solution += step[:, None] * direction
            residual -= step[:, None] * product
            preconditioned = self._precondition(residual)
            new_inner = (residual * preconditioned).sum(dim=1)
            ratio = torch.where(active, new_inner / inner.where(active, 1.0), 0.0)
            direction = torch.where(active[:, None], preconditioned + ratio[:, None] * direction,
                                    0.0)
            inner = torch.where(active, new_inner, inner)
            squared = torch.where(active, (residual * residual).sum(dim=1), squared)
        return solution, iterations, None


class LiSSASolver(Solver):
    """LiSSA, see :class:`LiSSAConfig`.

    Deterministic recursions (full-batch products) stop early on the residual; an operator
    that declares :attr:`~.protocol.Capability.MINIBATCH_LISSA` (the closed-form head: one
    native call) runs minibatch recursions itself.
    """

    name = "lissa"

    def __init__(self, operator: CurvatureBackend, damping: float, config: LiSSAConfig,
                 progress: bool = False):
        super().__init__(operator, damping, config, progress)
        self.scale = config.scale if config.scale is not None else (
            1.1 * (power_iteration(operator, config.power_iters, config.seed) + damping)
        )

    def _solve(self, rhs):
        config: LiSSAConfig = self.config
        total = torch.zeros_like(rhs)
        iterations = 0
        native = (config.minibatch_size is not None
                  and self.operator.offers(Capability.MINIBATCH_LISSA))
        for repeat in range(config.repeats):
            seed = config.seed + repeat
            if native:
                estimate = self.operator.lissa_recursion(
                    rhs, self.damping, self.scale, config.depth, config.minibatch_size, seed
                )
                self._check_finite(estimate, config.depth)
                iterations += config.depth
            else:
                estimate, steps = self._recursion(rhs, seed)
                iterations += steps
            total += estimate
        return total / config.repeats, iterations, self.scale

    def _recursion(self, rhs: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
        config: LiSSAConfig = self.config
        generator = torch.Generator(device="cpu").manual_seed(seed)
        iterate = rhs.clone()
        rhs_norm = float(rhs.norm())
        column_norms = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
        deterministic = config.minibatch_size is None
        bound = _iterate_bound(rhs_norm, self.scale, self.damping, deterministic)
        stall = _StallDetector()
        steps = 0
        for steps in progress_bar(range(1, config.depth + 1), self.progress, "LiSSA"):
            operator = self._minibatch_operator(generator)
            previous = iterate.clone()
            ops.lissa_update_(iterate, rhs, operator.matvec(iterate), self.damping, self.scale)
            if operator is not self.operator:
                self.operator.passes += 1
            size = float(iterate.norm())
            if not math.isfinite(size) or size > bound:
                self._diverged(steps, size, bound)
            # With full-batch products the step is the residual b − (H + λI)h_t/scale of
            # each column, so this is the relative residual the report measures.
            relative_step = float(((iterate - previous).norm(dim=1) / column_norms).max())
            if relative_step <= config.tol:
                break
            if deterministic and stall.stalled(steps, relative_step):
                break
        return iterate / self.scale, steps

    def _minibatch_operator(self, generator: torch.Generator) -> CurvatureBackend:
        size = self.config.minibatch_size
        if size is None or size >= self.operator.num_samples:
            return self.operator
        return self.operator.subsample(size, generator)

    def _check_finite(self, estimate: torch.Tensor, steps: int) -> None:
        if not bool(torch.isfinite(estimate).all()):
            self._diverged(steps, float("inf"), float("inf"))

    def _diverged(self, steps: int, size: float, bound: float) -> None:
        raise DivergenceError(
            f"LiSSA diverged at step {steps} (‖h‖ = {size:.3g}, bound {bound:.3g}, "
            f"scale {self.scale:.4g}, damping {self.damping:g}): H + λI is probably not "
            f"positive definite: {_remedy(self.operator, 'more damping, or solver=cg')}"
        )


def _remedy(operator: CurvatureBackend, damping_advice: str) -> str:
    """What to do about a non-positive-definite ``H + λI``: Gauss-Newton only helps where the
    curvature is not positive semi-definite already."""
    if operator.positive_semidefinite:
        return f"this curvature is positive semi-definite but singular; use {damping_advice}"
    return f"use hessian='gauss-newton', or {damping_advice}"


class _StallDetector:
    """Whether a full-batch LiSSA recursion has stopped making progress.

    With full-batch products the step ``h_{t+1} − h_t = b − (H + λI)h_t/scale`` is the residual
    of the current estimate. In exact arithmetic each step shrinks every column's residual by
    at least ``ρ = max|1 − μ/scale| < 1`` over the eigenvalues ``μ`` of ``H + λI``, so the
    largest relative one, which is what is tracked, never grows. Once rounding dominates it
    only fluctuates around a floor, so a tolerance below that floor would run all ``depth``
    steps for nothing. A *record* is a step norm at least
    ``RECORD_GAIN`` below the previous record; the recursion has stalled when no record was
    set for ``max(MIN_PATIENCE, t_record)`` steps (at least as long as it took to reach the
    last record). A geometric decrease sets a record every ``RECORD_GAIN/(1 − ρ)`` steps, so
    no recursion converging at ``1 − ρ ≥ 2e-6`` is ever stopped early.
    """

    RECORD_GAIN = 1e-3
    MIN_PATIENCE = 1000

    def __init__(self) -> None:
        self.record = math.inf
        self.record_step = 0

    def stalled(self, step: int, step_norm: float) -> bool:
        if step_norm < (1 - self.RECORD_GAIN) * self.record:
            self.record, self.record_step = step_norm, step
            return False
        return step - self.record_step > max(self.MIN_PATIENCE, self.record_step)


def _iterate_bound(rhs_norm: float, scale: float, damping: float, deterministic: bool) -> float:
    """An upper bound on ‖h_t‖ for a convergent recursion: ‖h_t‖ ≤ Σ ρ^k ‖b‖ ≤ scale‖b‖/λ
    (ρ = 1 − λ/scale); minibatch noise gets a 10× margin. Without damping: only finiteness."""
    if damping <= 0:
        return math.inf
    margin = 2.0 if deterministic else 10.0
    return margin * scale * rhs_norm / damping + rhs_norm


def power_iteration(operator: CurvatureBackend, iterations: int, seed: int,
                    rtol: float = 1e-2) -> float:
    """An estimate of ``max |eigenvalue(H)|`` by power iteration from a seeded start."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vector = torch.randn(operator.dim, generator=generator, dtype=operator.dtype)
    vector = (vector / vector.norm()).to(operator.device)[None]
    estimate = 0.0
    for _ in range(iterations):
        product = operator.matvec(vector)
        norm = float(product.norm())
        if norm == 0.0:
            return 0.0
        converged = abs(norm - estimate) <= rtol * norm
        estimate = norm
        vector = product / norm
        if converged:
            break
    return estimate


def _require_integer(config, name: str, minimum: int) -> None:
    """``config.name`` must be an integer (``bool`` is not) ``>= minimum``; stored as ``int``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    object.__setattr__(config, name, int(value))


def _require_positive_finite(config, name: str) -> None:
    """``config.name`` must be a finite real number ``> 0`` (``bool`` is not); stored as
    ``float``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    object.__setattr__(config, name, float(value))


Config = DirectConfig | CGConfig | LiSSAConfig | WoodburyConfig

REGISTRY: dict[str, tuple[type[Solver], type[Config]]] = {
    solver.name: (solver, config) for solver, config in (
        (DirectSolver, DirectConfig), (CGSolver, CGConfig), (LiSSASolver, LiSSAConfig),
        (WoodburySolver, WoodburyConfig),
    )
}
"""The solvers: name (each class's ``name``) → solver class and its config class. The one list
of solvers: the ``solver=`` choices, the solver options accepted and the CLI's help are read
from it; a new solver is one line here."""
AUTO = "auto"
SOLVERS = (*REGISTRY, AUTO)
"""The values of ``solver=``: every registered solver, and ``"auto"`` (:func:`choose_solver`)."""
CONFIGS: dict[str, type[Config]] = {name: config for name, (_, config) in REGISTRY.items()}
SOLVER_OPTIONS = frozenset(f.name for config in CONFIGS.values() for f in fields(config))
"""Every keyword option of some solver's config."""
DIRECT_MAX_DIM = {HEAD_CLOSED_FORM: 1024, "network": 512}
"""``solver="auto"`` picks the direct solver up to these sizes of θ_S, CG above. Measured on the
paper CNN's head (512 samples, 2 CPU threads): direct 7 ms vs CG 2 ms at p = 771, 172 ms vs
2 ms at p = 3,075 (Cholesky is cubic in p); a network's explicit Hessian costs p products."""


def choose_solver(solver: str, operator: CurvatureBackend) -> str:
    """``solver`` with ``"auto"`` resolved for ``operator``: direct where the inverse is in
    closed form or θ_S is small (:data:`DIRECT_MAX_DIM`), CG otherwise."""
    if solver != AUTO:
        return solver
    limit = DIRECT_MAX_DIM[HEAD_CLOSED_FORM if operator.name == HEAD_CLOSED_FORM else "network"]
    closed_form = operator.offers(Capability.CLOSED_FORM_INVERSE)
    return "direct" if closed_form or operator.dim <= limit else "cg"


def make_config(solver: str, options: dict, dtype: torch.dtype) -> Config:
    """Build the config of ``solver`` from keyword options, naming any unknown option; a
    default ``tol`` is resolved for the compute ``dtype``."""
    config_type = CONFIGS[solver]
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for solver={solver!r}; it accepts {sorted(known)}"
        )
    return with_default_tol(config_type(**options), dtype)


AUTO_CHOICES = ("direct", "cg")
"""The solvers ``solver="auto"`` picks from."""


def check_options(options: dict, solver: str) -> None:
    """Check each option's value against every config that has a field of its name (before
    ``solver="auto"`` is resolved, any of them may be built), and that ``solver`` can take it
    (``"auto"``: one of :data:`AUTO_CHOICES` does), raising the config's
    ``TypeError``/``ValueError``; names no config has are left to the caller."""
    candidates = AUTO_CHOICES if solver == AUTO else (solver,)
    accepted = sorted({f.name for kind in candidates if kind in CONFIGS
                       for f in fields(CONFIGS[kind])})
    for name, value in options.items():
        owners = [kind for kind, config_type in CONFIGS.items()
                  if name in {f.name for f in fields(config_type)}]
        if owners and name not in accepted:
            picks = f" (it picks {' or '.join(AUTO_CHOICES)})" if solver == AUTO else ""
            raise TypeError(f"unknown option(s) [{name!r}] for solver={solver!r}{picks}; it "
                            f"accepts {accepted} ({name!r} is an option of "
                            f"solver={' or '.join(owners)})")
        for kind in owners:
            CONFIGS[kind](**{name: value})


def make_solver(name: str, operator: CurvatureBackend, damping: float, config: Config,
                progress: bool = False) -> Solver:
    """The registered solver called ``name`` on ``operator``."""
    return REGISTRY[name][0](operator, damping, config, progress)
