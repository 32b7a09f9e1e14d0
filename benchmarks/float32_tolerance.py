"""The float32 rounding floor of CG's true residual, behind the float32 default tolerance.

CG's recursive residual keeps shrinking, but the true relative residual
``‖(H + λI)x − b‖/‖b‖`` that every solve measures afterwards stops at a floor set by float32
rounding. For each problem this runs CG in float32 with an unreachable tolerance (``tol=1e-12``,
at most ``--max-iter`` iterations) at each damping and reports the residual it ends at (an upper
bound of the floor where the cap stopped it: ``capped``), next to
``default_tol(float32)``, which must sit above the floors of ordinary problems (docs/design.md
§2)::

    python benchmarks/float32_tolerance.py --threads 2 \
        --out benchmarks/results/float32_tolerance.json

Problems: logistic regression (``params="last"``) and a tanh MLP (``params="all"``) on
scikit-learn's digits, a 50,000-sample logistic regression on Gaussian data, and
``default_curvature.py``'s paper CNN at 32² untrained and after 50 Adam steps (Gauss-Newton,
``params="all"``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from default_curvature import make_case
from torch import nn

import fastinfluence as fi
from fastinfluence.hessian.solvers import default_tol


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.001])
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--digits", type=int, default=1500, help="digits training samples")
    parser.add_argument("--n-large", type=int, default=50_000,
                        help="samples of the large logistic regression")
    parser.add_argument("--cnn-steps", type=int, nargs="+", default=[0, 50],
                        help="Adam steps of the paper CNN cases")
    parser.add_argument("--n-train", type=int, default=128, help="paper CNN training samples")
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def fitted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """``model`` after ``steps`` full-batch SGD steps on the cross-entropy, in eval mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def problems(args: argparse.Namespace):
    """``(name, model, train, val, options)`` for each problem, float32."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train, val = (x[:args.digits], y[:args.digits]), (x[args.digits:], y[args.digits:])
    yield "digits-logistic", fitted(nn.Linear(64, 10), *train, 200), train, val, \
        {"params": "last"}
    mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    yield "digits-mlp", fitted(mlp, *train, 200), train, val, {"params": "all"}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.n_large, 20, generator=generator)
    weights = torch.randn(20, 5, generator=generator)
    y = (x @ weights + torch.randn(args.n_large, 5, generator=generator)).argmax(dim=1)
    yield f"logistic-{args.n_large}", fitted(nn.Linear(20, 5), x, y, 100), (x, y), \
        (x[:500], y[:500]), {"params": "last"}
    for steps in args.cnn_steps:
        model, train, val = make_case("paper-cnn", 0, steps, args)
        yield f"paper-cnn-{steps}-steps", model, train, val, \
            {"params": "all", "hessian": "gauss-newton"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, model, train, val, options in problems(args):
        for damping in args.dampings:
            with warnings.catch_warnings():  # tol=1e-12 is unreachable on purpose
                warnings.simplefilter("ignore", RuntimeWarning)
                solve = fi.Influence(model, train, val, solver="cg", tol=1e-12,
                                     max_iter=args.max_iter, damping=damping,
                                     **options).report.solve
            # CG stopped by max_iter has not shown its floor yet: the residual is an upper bound.
            capped = solve.iterations == args.max_iter
            rows.append({"problem": name, "damping": damping, "floor": solve.relative_residual,
                         "iterations": solve.iterations, "capped": capped})
            print(f"{name:24s} damping {damping:<6g} floor {solve.relative_residual:.2e} "
                  f"after {solve.iterations} iterations{' (capped)' if capped else ''}",
                  flush=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()},
              "default_tol_float32": default_tol(torch.float32), "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
