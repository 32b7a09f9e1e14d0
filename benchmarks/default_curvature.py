"""Which curvature should ``params="all"`` use by default? Exact Hessian vs Gauss-Newton.

For the paper CNN (small images, so that each case takes seconds) and a ReLU MLP, untrained
and after some training steps, over several seeds, runs ``Influence(params="all")`` with each
curvature and the default damping and solver, and records: whether the solve succeeds
(``ok``, ``not-positive-definite``, ``diverged``), its residual and Hessian-vector products,
the seconds of one curvature product, and where both succeed the Pearson correlation of the two
curvatures' scores::

    python benchmarks/default_curvature.py --threads 2 \
        --out benchmarks/results/default_curvature.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fastinfluence as fi
from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.probe import probe_model
from fastinfluence.hessian.selection import select_backend
from fastinfluence.labelled_data import LabelledData
from fastinfluence.models import PaperCNN
from fastinfluence.params import select_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, nargs="+", default=[0, 50])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def make_case(kind: str, seed: int, steps: int, args: argparse.Namespace):
    """A model trained for ``steps`` Adam steps on random data, in eval mode, and the data."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = args.n_train + args.n_val
    if kind == "paper-cnn":
        model: nn.Module = PaperCNN(image_size=args.image_size, channels=(8, 8, 16, 16, 16))
        X = torch.rand(n, 1, args.image_size, args.image_size, generator=generator)
    else:
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 3))
        X = torch.randn(n, 20, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, args.n_train, (32,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
        optimizer.step()
    if steps == 0 and kind == "paper-cnn":
        with torch.no_grad():  # BatchNorm statistics of the data, as after any training
            model(X[: args.n_train])
    model.eval()
    return model, (X[: args.n_train], y[: args.n_train]), (X[args.n_train:], y[args.n_train:])


def run(model, train, val, hessian: str) -> dict:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            inf = fi.Influence(model, train, val, params="all", hessian=hessian)
    except fi.NotPositiveDefiniteError:
        return {"outcome": "not-positive-definite", "seconds": time.perf_counter() - start}
    except fi.DivergenceError:
        return {"outcome": "diverged", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    return {
        "outcome": "ok",
        "seconds": seconds,
        "solver": inf.report.solver,
        "converged": inf.report.solve.converged,
        "relative_residual": inf.report.solve.relative_residual,
        "hessian_products": inf.report.solve.hessian_products,
        "scores": inf.scores(),
    }


def product_seconds(model, train, val, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one curvature product over the training set, per curvature, timed in
    turns (the engine's backends, as ``Influence`` builds them)."""
    selection = select_parameters(model, "all")
    fmodel = FunctionalModel(model, selection, None, torch.device("cpu"))
    example = val[0][:2]
    probe = probe_model(fmodel, example)
    data = LabelledData(train, "train")
    backends = {h: select_backend(fmodel, probe, data, example, h)
                for h in ("exact", "gauss-newton")}
    vector = torch.randn(1, fmodel.dim, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {h: [] for h in backends}
    for _ in range(repeats + 1):  # the first round warms up
        for name, backend in backends.items():
            start = time.perf_counter()
            backend.matvec(vector)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values[1:])[len(values[1:]) // 2] for name, values in times.items()}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for kind in ("mlp", "paper-cnn"):
        for steps in args.train_steps:
            for seed in range(args.seeds):
                model, train, val = make_case(kind, seed, steps, args)
                results = {h: run(model, train, val, h) for h in ("exact", "gauss-newton")}
                row = {"model": kind, "train_steps": steps, "seed": seed,
                       "product_seconds": product_seconds(model, train, val)}
                exact, gauss = results["exact"], results["gauss-newton"]
                if exact["outcome"] == gauss["outcome"] == "ok":
                    row["pearson_exact_vs_gauss_newton"] = pearson(exact["scores"],
                                                                   gauss["scores"])
                for name, result in results.items():
                    result.pop("scores", None)
                    row[name] = result
                rows.append(row)
                print(json.dumps(row))
    summary = {}
    for kind in ("mlp", "paper-cnn"):
        for steps in args.train_steps:
            chosen = [r for r in rows if r["model"] == kind and r["train_steps"] == steps]
            summary[f"{kind}, {steps} steps"] = {
                h: f"{sum(r[h]['outcome'] == 'ok' for r in chosen)}/{len(chosen)} ok"
                for h in ("exact", "gauss-newton")
            }
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
              "rows": rows}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
