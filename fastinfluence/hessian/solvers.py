"""Solvers for ``x = (H + λI)^{-1} b`` with one or many right-hand sides ``b``.

``λ`` (``damping``) is always the additive damping of DESIGN.md §1; the solvers converge to
``(H + λI)^{-1} b`` and nothing else. LiSSA's ``scale`` is an internal step size, not damping.
Every solve returns a :class:`SolveReport` with the *true* relative residual
``‖(H + λI)x − b‖ / ‖b‖`` measured after the solve; a solve that misses its tolerance warns.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, fields

import torch

from fastinfluence import ops
from fastinfluence.hessian.operators import HeadHessian, HessianOperator
from fastinfluence.progress import progress_bar

SOLVERS = ("direct", "cg", "lissa", "auto")


class NotPositiveDefiniteError(ValueError):
    """``H + λI`` has a non-positive eigenvalue, so the inverse-HVP is not defined as asked."""


class DivergenceError(RuntimeError):
    """LiSSA's iterates grew without bound."""


@dataclass(frozen=True)
class DirectConfig:
    """Explicit ``H`` (from batched Hessian-vector products or closed form), then Cholesky.

    Attributes:
        chunk: identity columns per batched product while building ``H``.
        tol: relative residual above which the solve is reported as not converged.
    """

    chunk: int = 32
    tol: float = 1e-3

    def __post_init__(self) -> None:
        _require(self.chunk >= 1, "chunk", self.chunk, ">= 1")
        _require(self.tol > 0, "tol", self.tol, "> 0")


@dataclass(frozen=True)
class CGConfig:
    """Conjugate gradients on ``H + λI``, on the operator's device.

    Attributes:
        max_iter: most iterations (each is one Hessian-vector product over the data).
        tol: stop when every column's relative residual ``‖r‖/‖b‖`` is below this.
    """

    max_iter: int = 500
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _require(self.max_iter >= 1, "max_iter", self.max_iter, ">= 1")
        _require(self.tol > 0, "tol", self.tol, "> 0")


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
        tol: stop a repeat when ``‖h_{t+1} − h_t‖ ≤ tol·‖b‖``.
        seed: seeds the minibatch sampling and the power iteration.
        power_iters: most power-iteration steps for the automatic scale.
    """

    depth: int = 10_000
    repeats: int = 1
    scale: float | None = None
    minibatch_size: int | None = None
    tol: float = 1e-6
    seed: int = 0
    power_iters: int = 30

    def __post_init__(self) -> None:
        _require(self.depth >= 1, "depth", self.depth, ">= 1")
        _require(self.repeats >= 1, "repeats", self.repeats, ">= 1")
        _require(self.scale is None or self.scale > 0, "scale", self.scale, "> 0 or None")
        _require(self.minibatch_size is None or self.minibatch_size >= 1, "minibatch_size",
                 self.minibatch_size, ">= 1 or None")
        _require(self.tol > 0, "tol", self.tol, "> 0")
        _require(self.power_iters >= 1, "power_iters", self.power_iters, ">= 1")


CONFIGS = {"direct": DirectConfig, "cg": CGConfig, "lissa": LiSSAConfig}


def make_config(solver: str, options: dict) -> DirectConfig | CGConfig | LiSSAConfig:
    """Build the config of ``solver`` from keyword options, naming any unknown option."""
    config_type = CONFIGS[solver]
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for solver={solver!r}; it accepts {sorted(known)}"
        )
    return config_type(**options)


@dataclass(frozen=True)
class SolveReport:
    """How an inverse-HVP solve went.

    Attributes:
        solver: ``"direct"``, ``"cg"`` or ``"lissa"``.
        iterations: CG iterations or LiSSA steps (summed over repeats); 0 for direct.
        hessian_products: Hessian-vector products taken, on the whole training set or on a
            LiSSA minibatch (power iteration and the residual check included).
        relative_residual: ``max_j ‖(H + λI)x_j − b_j‖ / ‖b_j‖`` measured after the solve.
        converged: whether ``relative_residual`` met the solver's tolerance.
        seconds: wall time of the solve.
        scale: LiSSA's scale (``None`` for other solvers).
    """

    solver: str
    iterations: int
    hessian_products: int
    relative_residual: float
    converged: bool
    seconds: float
    scale: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class Solver:
    """Solves ``(H + λI) X = B`` for ``B`` of shape ``[k, p]``."""

    name: str

    def __init__(self, operator: HessianOperator, damping: float, config, progress: bool):
        self.operator = operator
        self.damping = damping
        self.config = config
        self.progress = progress

    def solve(self, rhs: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
        start = time.perf_counter()
        products_before = self.operator.passes
        solution, iterations, scale = self._solve(rhs)
        residual = self._relative_residual(solution, rhs)
        report = SolveReport(
            solver=self.name,
            iterations=iterations,
            hessian_products=self.operator.passes - products_before,
            relative_residual=residual,
            converged=residual <= self.config.tol,
            seconds=time.perf_counter() - start,
            scale=scale,
        )
        if not report.converged:
            warnings.warn(
                f"{self.name} solve did not reach tol={self.config.tol:g}: relative residual "
                f"{residual:.3g} after {iterations} iterations (see Influence.report)",
                RuntimeWarning,
                stacklevel=3,
            )
        return solution, report

    def _solve(self, rhs: torch.Tensor) -> tuple[torch.Tensor, int, float | None]:
        raise NotImplementedError

    def _apply(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.operator.matvec(vectors) + self.damping * vectors

    def _relative_residual(self, solution: torch.Tensor, rhs: torch.Tensor) -> float:
        residual = (self._apply(solution) - rhs).norm(dim=1)
        norms = rhs.norm(dim=1)
        relative = torch.where(norms > 0, residual / norms.clamp_min(1e-300), residual)
        return float(relative.max()) if len(relative) else 0.0


class DirectSolver(Solver):
    """Cholesky factorisation of the explicit ``H + λI``; reused for every later solve."""

    name = "direct"

    def __init__(self, operator: HessianOperator, damping: float, config: DirectConfig,
                 progress: bool = False):
        super().__init__(operator, damping, config, progress)
        self.matrix = operator.dense(config.chunk)
        self.matrix.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(self.matrix)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(self.matrix)[0])
            raise NotPositiveDefiniteError(
                f"H + λI is not positive definite (smallest eigenvalue {smallest:.4g} with "
                f"damping λ={damping:g}): use hessian='gauss-newton', or a damping above "
                f"{damping - smallest:.4g}"
            )
        self.factor = factor

    def _solve(self, rhs):
        return torch.cholesky_solve(rhs.T, self.factor).T, 0, None

    def _apply(self, vectors):
        return vectors @ self.matrix

    def quadratic_form(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vᵀ(H + λI)^{-1}v`` for each row ``v``, as ``‖L^{-1}v‖²``."""
        whitened = torch.linalg.solve_triangular(self.factor, vectors.T, upper=False)
        return (whitened * whitened).sum(dim=0)


class CGSolver(Solver):
    """Conjugate gradients, all columns at once (each iteration: one batched product)."""

    name = "cg"

    def _solve(self, rhs):
        config: CGConfig = self.config
        solution = torch.zeros_like(rhs)
        residual = rhs.clone()
        direction = residual.clone()
        squared = (residual * residual).sum(dim=1)
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
                    f"positive definite (damping λ={self.damping:g}); use "
                    "hessian='gauss-newton' or more damping"
                )
            step = torch.where(active, squared / curvature.where(active, 1.0), 0.0)
            solution += step[:, None] * direction
            residual -= step[:, None] * product
            new_squared = (residual * residual).sum(dim=1)
            ratio = torch.where(active, new_squared / squared.where(active, 1.0), 0.0)
            direction = torch.where(active[:, None], residual + ratio[:, None] * direction, 0.0)
            squared = torch.where(active, new_squared, squared)
        return solution, iterations, None


class LiSSASolver(Solver):
    """LiSSA, see :class:`LiSSAConfig`.

    Deterministic recursions (full-batch products) stop early on the residual; a minibatch
    recursion over a closed-form head runs all ``depth`` steps in one native call.
    """

    name = "lissa"

    def __init__(self, operator: HessianOperator, damping: float, config: LiSSAConfig,
                 progress: bool = False):
        super().__init__(operator, damping, config, progress)
        self.scale = config.scale if config.scale is not None else (
            1.1 * (power_iteration(operator, config.power_iters, config.seed) + damping)
        )

    def _solve(self, rhs):
        config: LiSSAConfig = self.config
        total = torch.zeros_like(rhs)
        iterations = 0
        for repeat in range(config.repeats):
            seed = config.seed + repeat
            if isinstance(self.operator, HeadHessian) and config.minibatch_size is not None:
                estimate = self._head_recursion(rhs, seed)
                iterations += config.depth
            else:
                estimate, steps = self._recursion(rhs, seed)
                iterations += steps
            total += estimate
        return total / config.repeats, iterations, self.scale

    def _head_recursion(self, rhs: torch.Tensor, seed: int) -> torch.Tensor:
        operator: HeadHessian = self.operator
        layout = operator.layout
        weights, biases = layout.split(rhs)
        xw, xb = ops.head_lissa(operator.data.features, operator.data.probs, weights, biases,
                                self.damping, self.scale, self.config.depth,
                                self.config.minibatch_size, seed)
        estimate = layout.join(xw, xb)
        self._check_finite(estimate, self.config.depth)
        return estimate

    def _recursion(self, rhs: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
        config: LiSSAConfig = self.config
        generator = torch.Generator(device="cpu").manual_seed(seed)
        iterate = rhs.clone()
        rhs_norm = float(rhs.norm())
        bound = _iterate_bound(rhs_norm, self.scale, self.damping, config.minibatch_size is None)
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
            if float((iterate - previous).norm()) <= config.tol * rhs_norm:
                break
        return iterate / self.scale, steps

    def _minibatch_operator(self, generator: torch.Generator) -> HessianOperator:
        size = self.config.minibatch_size
        if size is None or size >= len(self.operator.data):
            return self.operator
        return self.operator.subsample(size, generator)

    def _check_finite(self, estimate: torch.Tensor, steps: int) -> None:
        if not bool(torch.isfinite(estimate).all()):
            self._diverged(steps, float("inf"), float("inf"))

    def _diverged(self, steps: int, size: float, bound: float) -> None:
        raise DivergenceError(
            f"LiSSA diverged at step {steps} (‖h‖ = {size:.3g}, bound {bound:.3g}, "
            f"scale {self.scale:.4g}, damping {self.damping:g}): H + λI is probably not "
            "positive definite — use hessian='gauss-newton', more damping, or solver='cg'"
        )


def _iterate_bound(rhs_norm: float, scale: float, damping: float, deterministic: bool) -> float:
    """An upper bound on ‖h_t‖ for a convergent recursion: ‖h_t‖ ≤ Σ ρ^k ‖b‖ ≤ scale‖b‖/λ
    (ρ = 1 − λ/scale); minibatch noise gets a 10× margin. Without damping: only finiteness."""
    if damping <= 0:
        return math.inf
    margin = 2.0 if deterministic else 10.0
    return margin * scale * rhs_norm / damping + rhs_norm


def power_iteration(operator: HessianOperator, iterations: int, seed: int,
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


def _require(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def make_solver(name: str, operator: HessianOperator, damping: float, config,
                progress: bool = False) -> Solver:
    kinds = {"direct": DirectSolver, "cg": CGSolver, "lissa": LiSSASolver}
    return kinds[name](operator, damping, config, progress)
