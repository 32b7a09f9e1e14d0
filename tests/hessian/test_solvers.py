"""Every solver against ``torch.linalg.solve`` on a dense operator, in float64 (float32 where
rounding is the point), and the solver configs' argument checks."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings

import pytest
import torch
from problems import make_problem

import fastinfluence as fi
from fastinfluence.hessian.solvers import (
    CGConfig,
    DirectConfig,
    DivergenceError,
    LiSSAConfig,
    NotPositiveDefiniteError,
    _StallDetector,
    check_options,
    make_config,
    make_solver,
    power_iteration,
)

DAMPING = 0.1


def exact_solution(operator, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    matrix = operator.matrix.double() + damping * torch.eye(operator.dim, dtype=torch.float64)
    return torch.linalg.solve(matrix, rhs.double().T).T


def true_relative_residual(operator, solution, rhs, damping) -> float:
    """``max_j ‖(H + λI)x_j − b_j‖ / ‖b_j‖`` in float64."""
    matrix = operator.matrix.double() + damping * torch.eye(operator.dim, dtype=torch.float64)
    residual = solution.double() @ matrix - rhs.double()
    return float((residual.norm(dim=1) / rhs.double().norm(dim=1)).max())


def relative_error(estimate: torch.Tensor, expected: torch.Tensor) -> float:
    return float((estimate.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_direct_solves_exactly(make_operator, rhs, columns, chunk):
    operator = make_operator()
    solver = make_solver("direct", operator, DAMPING, DirectConfig(chunk=chunk))
    solution, report = solver.solve(rhs[:columns])
    assert solution.shape == (columns, operator.dim)
    assert relative_error(solution, exact_solution(operator, rhs[:columns], DAMPING)) < 1e-12
    assert report.solver == "direct" and report.iterations == 0 and report.converged
    assert report.relative_residual < 1e-12
    assert operator.passes == math.ceil(operator.dim / chunk)


def test_direct_quadratic_form_is_the_inverse_quadratic_form(make_operator, rhs):
    operator = make_operator()
    solver = make_solver("direct", operator, DAMPING, DirectConfig())
    expected = (rhs * exact_solution(operator, rhs, DAMPING)).sum(dim=1)
    values, report = solver.quadratic_form(rhs)
    assert torch.allclose(values, expected, rtol=1e-12, atol=0)
    assert report is None  # from the Cholesky factor, without a solve


def test_an_iterative_quadratic_form_solves_and_reports(make_operator, rhs):
    operator = make_operator()
    solver = make_solver("cg", operator, DAMPING, CGConfig(tol=1e-12))
    expected = (rhs * exact_solution(operator, rhs, DAMPING)).sum(dim=1)
    values, report = solver.quadratic_form(rhs)
    assert torch.allclose(values, expected, rtol=1e-10, atol=0)
    assert report.solver == "cg" and report.converged


@pytest.mark.parametrize("columns", [1, 3])
def test_cg_solves_every_column(make_operator, rhs, columns):
    operator = make_operator()
    solver = make_solver("cg", operator, DAMPING, CGConfig(tol=1e-12))
    solution, report = solver.solve(rhs[:columns])
    assert relative_error(solution, exact_solution(operator, rhs[:columns], DAMPING)) < 1e-10
    assert report.solver == "cg" and report.converged
    # Conjugate gradients in exact arithmetic end within p iterations; allow rounding slack.
    assert 1 <= report.iterations <= 2 * operator.dim
    assert report.hessian_products >= report.iterations
    assert report.relative_residual <= 1e-12


@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("scale", [None, 50.0])
def test_full_batch_lissa_converges_to_the_solution(make_operator, rhs, columns, scale):
    operator = make_operator()
    config = LiSSAConfig(scale=scale, tol=1e-11, depth=20_000)
    solver = make_solver("lissa", operator, DAMPING, config)
    solution, report = solver.solve(rhs[:columns])
    assert relative_error(solution, exact_solution(operator, rhs[:columns], DAMPING)) < 1e-9
    assert report.solver == "lissa" and report.converged
    assert report.iterations < config.depth
    assert report.hessian_products >= report.iterations
    largest = float(torch.linalg.eigvalsh(operator.matrix)[-1])
    if scale is None:
        # 1.1·(λ_max + λ) from power iteration, which approaches λ_max from below.
        assert 1.0 * (largest + DAMPING) < report.scale <= 1.1 * (largest + DAMPING) + 1e-9
    else:
        assert report.scale == scale


def test_minibatch_lissa_is_unbiased_and_seeded(make_operator, rhs):
    """Each step's minibatch is independent of the iterate, so the mean of the minibatch
    recursion follows the full-batch one: averaged repeats approach the solution (the bias
    left after 150 steps is about (1 − 1.6/40)^150 ≈ 0.2%)."""
    operator = make_operator()
    expected = exact_solution(operator, rhs, DAMPING)

    def minibatch_solve(repeats: int, seed: int = 0):
        config = LiSSAConfig(minibatch_size=8, depth=150, repeats=repeats, scale=40.0,
                             tol=1e-14, seed=seed)
        with pytest.warns(RuntimeWarning, match="did not reach"):
            return make_solver("lissa", operator, DAMPING, config).solve(rhs)

    averaged, report = minibatch_solve(repeats=40)
    one_repeat, _ = minibatch_solve(repeats=1)
    assert relative_error(averaged, expected) < 0.05
    # One minibatch recursion is noisy (so minibatches were really drawn); the average less so.
    assert relative_error(one_repeat, expected) > 2 * relative_error(averaged, expected)
    assert report.iterations == 150 * 40
    assert report.relative_residual == pytest.approx(
        true_relative_residual(operator, averaged, rhs, DAMPING), rel=1e-10)
    assert torch.equal(minibatch_solve(repeats=1)[0], one_repeat)
    assert not torch.allclose(minibatch_solve(repeats=1, seed=1)[0], one_repeat)


def test_minibatch_as_large_as_the_data_is_the_full_batch_recursion(make_operator, rhs):
    operator = make_operator()
    full = LiSSAConfig(scale=40.0, tol=1e-10)
    whole = LiSSAConfig(scale=40.0, tol=1e-10, minibatch_size=operator.num_samples)
    expected, expected_report = make_solver("lissa", operator, DAMPING, full).solve(rhs)
    solution, report = make_solver("lissa", operator, DAMPING, whole).solve(rhs)
    assert torch.allclose(solution, expected, rtol=1e-13, atol=0)
    assert report.iterations == expected_report.iterations < full.depth


@pytest.mark.parametrize(
    ("solver", "config"),
    [("cg", CGConfig(max_iter=2)), ("lissa", LiSSAConfig(depth=3, scale=40.0))],
)
def test_an_unconverged_solve_reports_its_true_residual_and_warns(make_operator, rhs, solver,
                                                                 config):
    operator = make_operator()
    solver = make_solver(solver, operator, DAMPING, config)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        solution, report = solver.solve(rhs)
    assert not report.converged
    residual = true_relative_residual(operator, solution, rhs, DAMPING)
    assert residual > solver.config.tol
    assert report.relative_residual == pytest.approx(residual, rel=1e-10)


def test_direct_names_the_smallest_eigenvalue_of_an_indefinite_operator(make_operator):
    operator = make_operator("indefinite")
    smallest = float(torch.linalg.eigvalsh(operator.matrix)[0]) + DAMPING
    assert smallest < -1
    with pytest.raises(NotPositiveDefiniteError, match=f"smallest eigenvalue {smallest:.4g}"):
        make_solver("direct", operator, DAMPING, DirectConfig())


def test_cg_detects_negative_curvature(make_operator, rhs):
    solver = make_solver("cg", make_operator("indefinite"), DAMPING, CGConfig())
    with pytest.raises(NotPositiveDefiniteError, match="non-positive curvature"):
        solver.solve(rhs)


def test_lissa_detects_divergence_on_an_indefinite_operator(make_operator, rhs):
    operator = make_operator("indefinite")
    with pytest.raises(DivergenceError, match="diverged"):
        make_solver("lissa", operator, DAMPING, LiSSAConfig(depth=5000)).solve(rhs)


def test_lissa_detects_divergence_from_a_too_small_scale(make_operator, rhs):
    """With ``scale`` below ``λ_max/2`` the recursion's factor ``1 − μ/scale`` drops below
    −1 and the iterates oscillate outwards."""
    operator = make_operator()
    largest = float(torch.linalg.eigvalsh(operator.matrix)[-1])
    config = LiSSAConfig(scale=0.3 * largest, depth=5000)
    with pytest.raises(DivergenceError, match="diverged"):
        make_solver("lissa", operator, DAMPING, config).solve(rhs)


def test_full_batch_lissa_stops_when_the_residual_stalls(make_operator, rhs):
    """tol=1e-12 lies far below float32 rounding: without the stall stop this would take 10⁶
    steps; with it, the solve returns the float32-accurate answer, reported unconverged (the
    only other stops are the depth, tol and a divergence, which raises)."""
    operator = make_operator(dtype=torch.float32)
    config = LiSSAConfig(depth=10**6, tol=1e-12)
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="did not reach"):
        solution, report = make_solver("lissa", operator, DAMPING, config).solve(rhs.float())
    assert time.perf_counter() - start < 10
    assert 0 < report.iterations < 20_000
    assert not report.converged and report.relative_residual > config.tol
    assert relative_error(solution, exact_solution(operator, rhs, DAMPING)) < 1e-5


def test_stall_detector_never_stops_a_slow_geometric_decrease():
    detector = _StallDetector()
    rate = 1 - 2e-6
    norm = 1.0
    for step in range(1, 400_001):
        norm *= rate
        assert not detector.stalled(step, norm)


def test_stall_detector_stops_a_noisy_floor_soon():
    generator = torch.Generator().manual_seed(0)
    floor = 1e-7 * (1 + torch.rand(200_000, generator=generator, dtype=torch.float64))
    detector = _StallDetector()
    reached = 300
    norms = [0.5 ** step for step in range(1, reached)] + floor.tolist()
    stop = next(step for step, norm in enumerate(norms, start=1) if detector.stalled(step, norm))
    assert reached < stop < 100 * reached + _StallDetector.MIN_PATIENCE


def test_power_iteration_estimates_the_largest_eigenvalue(make_operator):
    operator = make_operator()
    largest = float(torch.linalg.eigvalsh(operator.matrix)[-1])
    estimate = power_iteration(operator, iterations=200, seed=0, rtol=1e-9)
    assert estimate == pytest.approx(largest, rel=1e-6)


@pytest.mark.parametrize(
    ("config", "options", "error", "message"),
    [
        (LiSSAConfig, {"depth": 2.5}, TypeError, "depth must be an integer"),
        (LiSSAConfig, {"depth": "100"}, TypeError, "depth must be an integer"),
        (LiSSAConfig, {"depth": True}, TypeError, "depth must be an integer"),
        (LiSSAConfig, {"depth": 0}, ValueError, "depth must be >= 1"),
        (LiSSAConfig, {"repeats": 1.0}, TypeError, "repeats must be an integer"),
        (LiSSAConfig, {"power_iters": False}, TypeError, "power_iters must be an integer"),
        (LiSSAConfig, {"minibatch_size": 8.0}, TypeError, "minibatch_size must be an integer"),
        (LiSSAConfig, {"minibatch_size": 0}, ValueError, "minibatch_size must be >= 1"),
        (LiSSAConfig, {"seed": -1}, ValueError, "seed must be >= 0"),
        (LiSSAConfig, {"seed": 0.5}, TypeError, "seed must be an integer"),
        (LiSSAConfig, {"scale": math.inf}, ValueError, "scale must be > 0 and finite"),
        (LiSSAConfig, {"scale": math.nan}, ValueError, "scale must be > 0 and finite"),
        (LiSSAConfig, {"scale": -1.0}, ValueError, "scale must be > 0 and finite"),
        (LiSSAConfig, {"scale": True}, TypeError, "scale must be a finite number"),
        (LiSSAConfig, {"scale": "2"}, TypeError, "scale must be a finite number"),
        (LiSSAConfig, {"tol": math.inf}, ValueError, "tol must be > 0 and finite"),
        (LiSSAConfig, {"tol": math.nan}, ValueError, "tol must be > 0 and finite"),
        (LiSSAConfig, {"tol": 0.0}, ValueError, "tol must be > 0 and finite"),
        (CGConfig, {"max_iter": 10.5}, TypeError, "max_iter must be an integer"),
        (CGConfig, {"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        (CGConfig, {"tol": -1e-3}, ValueError, "tol must be > 0 and finite"),
        (DirectConfig, {"chunk": True}, TypeError, "chunk must be an integer"),
        (DirectConfig, {"chunk": 0}, ValueError, "chunk must be >= 1"),
        (DirectConfig, {"tol": math.inf}, ValueError, "tol must be > 0 and finite"),
    ],
)
def test_bad_config_values_raise_clear_errors(config, options, error, message):
    with pytest.raises(error, match=message):
        config(**options)


def test_config_numbers_of_other_numeric_types_are_stored_as_python_numbers():
    import numpy as np

    config = LiSSAConfig(depth=np.int64(10), scale=np.float32(2.0), tol=1)
    assert type(config.depth) is int and config.depth == 10
    assert type(config.scale) is float and config.scale == 2.0
    assert type(config.tol) is float


def test_make_config_names_unknown_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depth'\]"):
        make_config("cg", {"depth": 3}, torch.float64)
    assert make_config("lissa", {"depth": 7}, torch.float64) == LiSSAConfig(depth=7, tol=1e-6)


def test_the_default_tolerance_follows_the_compute_dtype():
    assert CGConfig().tol is None and LiSSAConfig().tol is None
    assert make_config("cg", {}, torch.float64).tol == 1e-6
    assert make_config("lissa", {}, torch.float32).tol == 1e-4
    assert make_config("cg", {"tol": 1e-7}, torch.float32).tol == 1e-7  # a given tol is kept
    assert make_config("direct", {}, torch.float32).tol == DirectConfig().tol


def test_a_float32_solve_at_its_rounding_floor_does_not_warn():
    """A float32 CNN whose CG solve stops at a true residual of 1.5e-6, on the rounding floor:
    under the float64 default of 1e-6 it warned; under float32's own it converges, and ``s``
    agrees with the float64 solve. A solve cut short still warns."""
    model, train, val = make_problem("cnn", seed=0, n_train=200, n_val=20)
    expected = fi.Influence(model, train, val, params="all", solver="cg", tol=1e-10).ihvp

    model32 = copy.deepcopy(model).float()
    train32, val32 = (train[0].float(), train[1]), (val[0].float(), val[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        influence = fi.Influence(model32, train32, val32, params="all", solver="cg")
    assert influence.solver.config.tol == 1e-4
    assert influence.report.solve.converged
    assert relative_error(influence.ihvp, expected) <= 1e-3

    with pytest.warns(RuntimeWarning, match="cg solve did not reach tol=0.0001"):
        cut = fi.Influence(model32, train32, val32, params="all", solver="cg", max_iter=1)
    assert not cut.report.solve.converged


def test_option_values_are_checked_before_the_solver_is_chosen():
    check_options({"tol": 1e-3, "max_iter": 10}, "auto")
    with pytest.raises(TypeError, match="tol must be a finite number > 0, got 'abc'"):
        check_options({"tol": "abc"}, "auto")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        check_options({"chunk": 0}, "auto")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depth'\] for solver='auto' "
                                        r"\(it picks direct or cg\)"):
        check_options({"depth": 10}, "auto")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_iter'\] for "
                                        r"solver='direct'; it accepts \['chunk', 'tol'\]"):
        check_options({"max_iter": 10}, "direct")


def test_the_registry_is_the_one_list_of_solvers(make_operator, capsys):
    """Every solver name, config and option the API and the CLI accept comes from REGISTRY."""
    import fastinfluence.hessian.solvers as solvers
    from fastinfluence.cli import main

    assert solvers.SOLVERS == (*solvers.REGISTRY, "auto")
    options = set()
    for name, (solver_class, config_class) in solvers.REGISTRY.items():
        assert solver_class.name == name and solvers.CONFIGS[name] is config_class
        options |= {f.name for f in dataclasses.fields(config_class)}
    assert solvers.SOLVER_OPTIONS == options
    config = solvers.make_config("cg", {}, torch.float64)
    built = solvers.make_solver("cg", make_operator(), DAMPING, config)
    assert type(built) is solvers.REGISTRY["cg"][0]
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert ", ".join(solvers.SOLVERS) in " ".join(capsys.readouterr().out.split())


def test_auto_picks_direct_for_small_or_closed_form_curvatures(make_operator):
    from fastinfluence.hessian.protocol import Capability
    from fastinfluence.hessian.solvers import DIRECT_MAX_DIM, choose_solver

    operator = make_operator()  # p = 12, a network-sized limit of 512
    assert choose_solver("auto", operator) == "direct"
    assert choose_solver("lissa", operator) == "lissa"
    operator.dim = DIRECT_MAX_DIM["network"] + 1
    assert choose_solver("auto", operator) == "cg"
    operator.capabilities = frozenset({Capability.CLOSED_FORM_INVERSE})
    assert choose_solver("auto", operator) == "direct"
