"""Influence throughput on the paper CNN, a ResNet-18 and a ViT: fastinfluence against pure
autograd.

Times, for each model (``--models``: ``cnn``, the paper CNN; ``resnet18``, the compact
ResNet-18 of :mod:`fastinfluence.models` with residual adds, ``--resnet-width`` channels in
its first stage and the small-image stem; ``vit``, the compact ViT of
:mod:`fastinfluence.models` with ``--vit-patch``, ``--vit-dim``, ``--vit-depth`` and
``--vit-heads``), image size and parameter selection
(``params="last"``: the final Linear layer; ``"all"``: every parameter):

* the floor: one plain no-grad forward pass over train+val;
* ``fastinfluence.score`` end to end, and its two stages: ``fastinfluence.Influence(...)``
  construction (the IHVP ``s = H_λ^{-1} ∇L(D_val)``) and ``Influence.scores()`` (scoring);
* the pure-autograd baselines of ``fastinfluence.reference`` with the same ``s``: per-sample
  ``autograd.grad`` loop scoring and ``vmap(grad)`` scoring; and, for the head, the
  textbook double-backward LiSSA IHVP (timed over ``--lissa-timed-steps`` HVPs and
  extrapolated to ``depth x repeats`` HVPs when fewer are timed; the output says so);
* peers (captum, pydvl, kronfluence) are reported as skipped when not installed.

The curvature defaults to Gauss-Newton (``--hessian``): the exact Hessian of a CNN is
indefinite and CG stops on it for ``params="all"``; for the softmax-CE head both are the same.
For ``params="all"`` the IHVP is CG capped at ``--cg-max-iter`` iterations (each one HVP over the
whole training set): that stage is timed as capped, and its residual is printed. Warm-ups run
the same calls on a few samples; each timing is the median of ``--repeats`` runs
(``--baseline-repeats`` for the slow baselines). The scoring stage and the baselines' scoring
are timed in turns (one call of each per round), so their ratio compares the same minutes.

``--device cuda`` runs every stage on the GPU (the problem is built on the CPU with the same
seed, then moved): each timed call is bracketed by ``torch.cuda.synchronize()``, and the peak
GPU memory of ``fastinfluence.score`` is recorded.

Prints Markdown tables (seconds, samples/s, ratios checked against the targets) and writes
JSON to ``--out`` (default ``results/influence_<device>.json``). Example::

    python benchmarks/bench_influence.py --sizes 64 128 --threads 2
    python benchmarks/bench_influence.py --sizes 64 128 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastinfluence
from fastinfluence import reference
from fastinfluence.models import PaperCNN, resnet18, vit_tiny

PEERS = ("captum", "pydvl", "kronfluence")
MODELS = ("cnn", "resnet18", "vit")
FLOOR_BATCH_SIZES = (8, 32, 128)

# (key, description, numerator, denominator, comparison, target)
TARGETS = (
    (
        "score_last_over_forward",
        'score(params="last") total / forward(train+val)',
        ("last", "score_total"),
        (None, "forward_train_val"),
        "<=",
        1.5,
    ),
    (
        "scoring_all_over_forward_train",
        'scoring stage (params="all") / forward(train)',
        ("all", "scoring"),
        (None, "forward_train"),
        "<=",
        3.0,
    ),
    (
        "loop_over_scoring_all",
        'per-sample loop scoring / scoring stage (params="all")',
        ("all", "reference_loop_scoring"),
        ("all", "scoring"),
        ">=",
        1.5,
    ),
    (
        "vmap_over_scoring_all",
        'vmap(grad) scoring / scoring stage (params="all")',
        ("all", "reference_vmap_scoring"),
        ("all", "scoring"),
        ">=",
        1.0,
    ),
    (
        "lissa_over_ihvp_solve_last",
        "reference LiSSA head IHVP / fastinfluence head IHVP solve (features cached)",
        ("last", "reference_lissa_ihvp"),
        ("last", "ihvp_solve"),
        ">=",
        500.0,
    ),
    (
        "lissa_over_ihvp_last",
        "reference LiSSA head IHVP / fastinfluence IHVP stage incl. the feature pass",
        ("last", "reference_lissa_ihvp"),
        ("last", "ihvp"),
        None,
        None,
    ),
    (
        "hvp_last",
        "reference double-backward head HVP / closed-form head HVP (train set)",
        ("last", "reference_hvp"),
        ("last", "hvp"),
        None,
        None,
    ),
)
"""Ratios with a target are checked; those without one are reported for context."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["cnn"])
    parser.add_argument(
        "--resnet-width", type=int, default=16, help="channels of the ResNet-18's first stage"
    )
    parser.add_argument("--vit-patch", type=int, default=8, help="the ViT's patch side")
    parser.add_argument("--vit-dim", type=int, default=32, help="the ViT's token width")
    parser.add_argument("--vit-depth", type=int, default=2, help="the ViT's blocks")
    parser.add_argument("--vit-heads", type=int, default=2, help="the ViT's attention heads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sides")
    parser.add_argument("--params", nargs="+", choices=["last", "all"], default=["last", "all"])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size of fastinfluence and the vmap chunks (default: the engine's own "
        "choice); the forward floor is the fastest of batch sizes 8, 32 and 128",
    )
    parser.add_argument("--solver", default="auto", help='fastinfluence solver, params="last"')
    parser.add_argument(
        "--solver-all", default="cg", help='fastinfluence solver, params="all" (default cg)'
    )
    parser.add_argument(
        "--cg-max-iter",
        type=int,
        default=5,
        help="CG iterations cap whenever the solver is cg: each is a Hessian-vector product over "
        "the whole training set, so the 'all' IHVP stage is timed for this many, converged or "
        "not (the output reports the residual)",
    )
    parser.add_argument(
        "--hessian",
        default="gauss-newton",
        choices=["exact", "gauss-newton"],
        help="gauss-newton (default) is PSD, so CG/LiSSA converge for params=all where the exact "
        "Hessian of a CNN is indefinite; for the softmax-CE head both are identical",
    )
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument(
        "--train-steps",
        type=int,
        default=10,
        help="brief Adam training on the random data before timing (0: random init)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is kept")
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="timed runs of the slow baselines"
    )
    parser.add_argument("--lissa-depth", type=int, default=100)
    parser.add_argument("--lissa-batch", type=int, default=32)
    parser.add_argument("--lissa-repeats", type=int, default=1)
    parser.add_argument("--lissa-scale", type=float, default=10.0)
    parser.add_argument(
        "--lissa-timed-steps",
        type=int,
        default=None,
        help="HVPs actually timed for the reference LiSSA (default: all depth x repeats); "
        "fewer are extrapolated linearly",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the pure-autograd baselines"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/influence_<device>.json"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.out is None:
        args.out = Path(__file__).parent / "results" / f"influence_{args.device}.json"
    for name in (
        "n_train",
        "n_val",
        "repeats",
        "baseline_repeats",
        "threads",
        "lissa_depth",
        "lissa_batch",
        "lissa_repeats",
        "cg_max_iter",
        "resnet_width",
        "vit_patch",
        "vit_dim",
        "vit_depth",
        "vit_heads",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_size", "lissa_timed_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(size < 32 or size % 32 for size in args.sizes):
        parser.error("--sizes must be positive multiples of 32 (five 2x2 pools)")
    return args


def build_model(name: str, size: int, args: argparse.Namespace) -> nn.Module:
    """The untrained model ``name`` (see ``--models``) for ``size``² grey images."""
    if name == "cnn":
        return PaperCNN(image_size=size, num_classes=args.num_classes)
    if name == "vit":
        return vit_tiny(args.num_classes, image_size=size, patch=args.vit_patch,
                        dim=args.vit_dim, depth=args.vit_depth, heads=args.vit_heads)
    return resnet18(args.num_classes, width=args.resnet_width, in_channels=1, stem="small")


def task_key(name: str, size: int) -> str:
    """The key of a model and size in the JSON: the size alone for the paper CNN (as in the
    runs before ``--models``), ``"<model>-<size>"`` otherwise."""
    return str(size) if name == "cnn" else f"{name}-{size}"


def synchronize() -> None:
    """Waits for queued GPU work, so that a wall time covers it (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds_of(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn``, GPU work included."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def median_seconds(
    fn: Callable[[], Any], repeats: int, warmup: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call.

    ``warmup`` replaces ``fn`` for the warm-up (a cheaper call of the same code path).
    """
    (warmup or fn)()
    times = [seconds_of(fn) for _ in range(repeats)]
    return statistics.median(times), times


def interleaved_medians(
    timed: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]],
) -> dict[str, float]:
    """Median wall time of each ``name: (fn, warmup, repeats)``, the calls taken in turns.

    Ratios between these stages are the benchmark's targets; on a shared machine the speed
    drifts by tens of percent within minutes, so timing them in alternation (round r runs
    every function that still has repeats left) keeps a ratio from comparing a fast minute
    with a slow one.
    """
    for _fn, warmup, _repeats in timed.values():
        warmup()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(max(repeats for _fn, _warmup, repeats in timed.values())):
        for name, (fn, _warmup, repeats) in timed.items():
            if round_ < repeats:
                times[name].append(seconds_of(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def train_briefly(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                  generator: torch.Generator) -> None:
    """``steps`` Adam steps on cross-entropy over random batches of 32 of ``(X, y)`` (drawn
    from ``generator``), so that a benchmark's model is not at its random initialisation; the
    model is left in eval mode."""
    if steps:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            batch = torch.randint(0, len(X), (32,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


def make_problem(
    size: int, args: argparse.Namespace, build: Callable[[], nn.Module] | None = None
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The paper CNN, or the model ``build()`` makes (built after seeding), briefly trained on
    random images if ``--train-steps``, in eval mode; its training and validation tensors
    (on the CPU: :func:`bench_size` moves them to ``--device``)."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = PaperCNN(image_size=size, num_classes=args.num_classes) if build is None else build()
    n = args.n_train + args.n_val
    X = torch.rand(n, 1, size, size, generator=gen)
    y = torch.randint(0, args.num_classes, (n,), generator=gen)
    train_briefly(model, X[: args.n_train], y[: args.n_train], args.train_steps, 1e-3, gen)
    train = (X[: args.n_train], y[: args.n_train])
    val = (X[args.n_train :], y[args.n_train :])
    return model, train, val


def selected_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters fastinfluence selects for ``params=which``, in its flattening order
    (``"last"``: the final Linear layer, which every model runs last)."""
    if which == "all":
        return list(model.parameters())
    return list([m for m in model.modules() if isinstance(m, nn.Linear)][-1].parameters())


def forward(model: nn.Module, X: torch.Tensor, batch_size: int) -> None:
    """The floor: a plain no-grad forward pass."""
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            model(X[start : start + batch_size])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_params(
    model: nn.Module, train, val, which: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Times fastinfluence and the baselines for one parameter selection."""
    solver = args.solver if which == "last" else args.solver_all
    options: dict[str, Any] = dict(
        params=which,
        solver=solver,
        hessian=args.hessian,
        damping=args.damping,
        batch_size=args.batch_size,
    )
    if solver == "cg":
        options["max_iter"] = args.cg_max_iter
    few = (train[0][:8], train[1][:8])  # warm-up on a few samples: same code path, cheaper
    out: dict[str, Any] = {"solver": solver}
    with warnings.catch_warnings():  # a capped CG warns; the report below says how it went
        warnings.filterwarnings("ignore", "(cg|lissa|direct) solve did not reach", RuntimeWarning)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out["score_total"], _ = median_seconds(
            lambda: fastinfluence.score(model, train, val, **options),
            args.repeats,
            warmup=lambda: fastinfluence.score(model, few, val, **options),
        )
        if args.device == "cuda":
            out["score_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        built: list[fastinfluence.Influence] = []
        out["ihvp"], _ = median_seconds(
            lambda: built.append(fastinfluence.Influence(model, train, val, **options)),
            args.repeats,
            warmup=lambda: fastinfluence.Influence(model, few, val, **options),
        )
    inf = built[-1]
    # the solve alone takes milliseconds for the head: the median of the timed constructions
    out["ihvp_solve"] = statistics.median(b.report.seconds["solve"] for b in built)
    probe = inf.ihvp[None]
    out["hvp"], _ = median_seconds(lambda: inf.backend.matvec(probe), args.repeats)
    solve = inf.report.solve
    out["engine_path"] = inf.report.path
    out["engine_scoring"] = inf.report.scoring
    out["engine_scoring_reason"] = inf.report.scoring_reason
    if solve is not None:
        out["solve_iterations"] = solve.iterations
        out["solve_hessian_products"] = solve.hessian_products
        out["solve_relative_residual"] = solve.relative_residual
        out["solve_converged"] = solve.converged
    timed: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]] = {
        "scoring": (inf.scores, inf.scores, args.repeats)
    }
    if not args.no_baselines:
        params = selected_parameters(model, which)
        s = inf.ihvp.detach()
        X, y = train
        per_sample = {
            "loop": lambda n: reference.per_sample_grads(model, params, X[:n], y[:n]),
            "vmap": lambda n: reference.per_sample_grads_vmap(
                model, params, X[:n], y[:n], chunk_size=args.batch_size or 32
            ),
        }
        for method, grads in per_sample.items():

            def run(n: int | None = None, grads: Callable[[int | None], torch.Tensor] = grads):
                return -(grads(n) @ s)

            timed[f"reference_{method}_scoring"] = (
                run, lambda run=run: run(4), args.baseline_repeats
            )
    out.update(interleaved_medians(timed))
    if args.no_baselines:
        return out
    scores = inf.scores()
    for method in per_sample:
        out[f"reference_{method}_rel_error"] = relative_error(
            timed[f"reference_{method}_scoring"][0](), scores
        )
    if which == "last":
        out["reference_hvp"], _ = median_seconds(
            lambda: reference.hvp(model, params, X, y, s), args.baseline_repeats
        )
        out.update(bench_reference_lissa(model, params, train, val, s, args))
    return out


def bench_reference_lissa(
    model: nn.Module,
    params: list[nn.Parameter],
    train,
    val,
    s: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The textbook double-backward LiSSA for the head IHVP, timed per HVP."""
    X, y = train
    v = reference.mean_loss_grad(model, params, *val)
    total_steps = args.lissa_depth * args.lissa_repeats
    timed_steps = min(args.lissa_timed_steps or total_steps, total_steps)
    full = timed_steps == total_steps
    settings = dict(
        damping=args.damping,
        scale=args.lissa_scale,
        batch_size=args.lissa_batch,
        seed=args.seed,
    )
    if full:
        settings.update(depth=args.lissa_depth, repeats=args.lissa_repeats)
    else:
        settings.update(depth=timed_steps, repeats=1)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["h"] = reference.lissa(model, params, X, y, v, **settings)
        except RuntimeError as error:  # divergence is reported; its time still counts
            result["error"] = str(error)

    reference.hvp(model, params, X[: args.lissa_batch], y[: args.lissa_batch], v)  # warm-up
    seconds, _ = median_seconds(run, args.baseline_repeats, warmup=lambda: None)
    per_hvp = seconds / timed_steps
    out: dict[str, Any] = {
        "reference_lissa_seconds_per_hvp": per_hvp,
        "reference_lissa_ihvp": per_hvp * total_steps,
        "reference_lissa_extrapolated": not full,
        "reference_lissa_timed_hvps": timed_steps,
        "reference_lissa_total_hvps": total_steps,
    }
    if "error" in result:
        out["reference_lissa_note"] = result["error"]
    elif full:
        out["reference_lissa_rel_error_vs_fastinfluence"] = relative_error(result["h"], s)
    return out


def bench_size(size: int, args: argparse.Namespace, name: str = "cnn") -> dict[str, Any]:
    model, train, val = make_problem(size, args, lambda: build_model(name, size, args))
    # built on the CPU with the same seed, so every device times the same problem
    model.to(args.device)
    train, val = ((X.to(args.device), y.to(args.device)) for X, y in (train, val))
    X_all = torch.cat([train[0], val[0]])
    result: dict[str, Any] = {"model": name, "size": size}
    for key, inputs in (("forward_train_val", X_all), ("forward_train", train[0])):
        result[key] = min(
            median_seconds(lambda b=batch, x=inputs: forward(model, x, b), args.repeats)[0]
            for batch in FLOOR_BATCH_SIZES
        )
    for which in args.params:
        print(f"  {name} {size}², params={which} ...", flush=True)
        result[which] = bench_params(model, train, val, which, args)
    return result


def peers() -> dict[str, str]:
    """Which peer libraries are importable. None is benchmarked yet: each is reported."""
    return {
        name: "installed; not benchmarked by this script"
        if importlib.util.find_spec(name)
        else "skipped: not installed"
        for name in PEERS
    }


def ratios(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for result in results.values():
        size, model = result["size"], result["model"]
        for key, description, (num_p, num_k), (den_p, den_k), op, target in TARGETS:
            num = (result.get(num_p) or {}).get(num_k) if num_p else result.get(num_k)
            den = (result.get(den_p) or {}).get(den_k) if den_p else result.get(den_k)
            if num is None or den is None:
                continue
            value = num / den
            if op is None:
                met = None
            else:
                met = value <= target if op == "<=" else value >= target
            rows.append(
                dict(
                    model=model,
                    size=size,
                    key=key,
                    description=description,
                    value=value,
                    target="-" if op is None else f"{op} {target:g}",
                    met=met,
                )
            )
    return rows


def device_name(device: str) -> str:
    """What ran the benchmark: ``cpu`` or the GPU's name."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def markdown(
    results: dict[str, dict[str, Any]], ratio_rows: list[dict[str, Any]], args: argparse.Namespace
) -> str:
    n_tv = args.n_train + args.n_val
    lines = [
        f"torch {torch.__version__}, {device_name(args.device)}, {args.threads} threads, "
        f"n_train={args.n_train}, "
        f"n_val={args.n_val}, solver={args.solver}, hessian={args.hessian}, "
        f"damping={args.damping}",
        "",
        "| model | size | params | stage | seconds | samples/s |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]

    def row(size: str, which: str, stage: str, seconds: float, n: int) -> None:
        lines.append(f"| {size} | {which} | {stage} | {seconds:.4f} | {n / seconds:,.0f} |")

    for result in results.values():
        size = f"{result['model']} | {result['size']}²"
        row(size, "-", "forward, no grad (train+val)", result["forward_train_val"], n_tv)
        row(size, "-", "forward, no grad (train)", result["forward_train"], args.n_train)
        for which in args.params:
            r = result[which]
            row(size, which, "fastinfluence.score total", r["score_total"], args.n_train)
            solve = f"{r['solver']}, {r['engine_path']} path"
            if "solve_iterations" in r:
                solve += (
                    f", {r['solve_hessian_products']} HVPs, residual "
                    f"{r['solve_relative_residual']:.1e}"
                    + ("" if r["solve_converged"] else " (not converged)")
                )
            row(size, which, f"IHVP stage (Influence(...); {solve})", r["ihvp"], n_tv)
            # which pass scored, and why not a faster one: a fallback changes every ratio
            scoring = r["engine_scoring"]
            if r.get("engine_scoring_reason"):
                scoring += f"; {r['engine_scoring_reason']}"
            row(size, which, f"scoring stage (inf.scores(); {scoring})", r["scoring"],
                args.n_train)
            for method in ("loop", "vmap"):
                if f"reference_{method}_scoring" in r:
                    row(
                        size,
                        which,
                        f"reference {method} scoring (same s; rel. diff "
                        f"{r[f'reference_{method}_rel_error']:.1e})",
                        r[f"reference_{method}_scoring"],
                        args.n_train,
                    )
            if "reference_lissa_ihvp" in r:
                how = (
                    f"extrapolated from {r['reference_lissa_timed_hvps']} HVPs"
                    if r["reference_lissa_extrapolated"]
                    else "measured"
                )
                error = r.get("reference_lissa_rel_error_vs_fastinfluence")
                note = f", rel. error vs fastinfluence s {error:.2f}" if error is not None else ""
                note += f", {r['reference_lissa_note']}" if "reference_lissa_note" in r else ""
                lines.append(
                    f"| {size} | {which} | reference LiSSA IHVP (depth {args.lissa_depth}, "
                    f"batch {args.lissa_batch}, repeats {args.lissa_repeats}; {how}{note}) | "
                    f"{r['reference_lissa_ihvp']:.4f} | - |"
                )
    lines += ["", "| model | size | ratio | value | target | |",
              "| --- | ---: | --- | ---: | --- | --- |"]
    for r in ratio_rows:
        mark = {True: "✓", False: "✗", None: ""}[r["met"]]
        lines.append(
            f"| {r['model']} | {r['size']}² | {r['description']} | {r['value']:.2f} | "
            f"{r['target']} | {mark} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for name in args.models:
        for size in args.sizes:
            print(f"benchmarking {name} at {size}x{size} ...", flush=True)
            results[task_key(name, size)] = bench_size(size, args, name)
    ratio_rows = ratios(results)
    peer_notes = peers()
    print()
    print(markdown(results, ratio_rows, args))
    print()
    for name, note in peer_notes.items():
        print(f"peer {name}: {note}")
    report = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "device_name": device_name(args.device),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "results": results,
        "ratios": ratio_rows,
        "peers": peer_notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
