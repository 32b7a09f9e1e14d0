"""How close are the gradient store's scores to the exact Gauss-Newton scores as k grows?

For a small MLP and a small CNN (no BatchNorm: every parameter in a layer the store projects),
trained for a few Adam steps on random data, builds ``GradientStore(params="all")`` for each
``k`` and compares its pairwise scores of the queries against
``Influence(params="all", hessian="gauss-newton", solver="direct")``'s (same damping): the
Pearson correlation over all ``n × m`` scores, the median over queries of the per-query
Pearson, the relative error, and the mean overlap of each query's top-10 (``top_influences``)
with the exact top-10; with seconds for the build and for the queries. The largest ``k`` is at
least every layer dimension: the projections are then orthogonal and the scores exact::

    python benchmarks/bench_store.py --threads 2 --out benchmarks/results/store_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_influence import train_briefly
from torch import nn

import fastinfluence as fi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-query", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 130])
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def make_case(kind: str, args: argparse.Namespace):
    """A float64 model trained ``args.steps`` Adam steps on random data, and its data."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = args.n_train + args.n_query
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16),
                                         nn.ReLU(), nn.Linear(16, 3))
        X = torch.randn(n, 20, generator=generator, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
        X = torch.randn(n, 1, 16, 16, generator=generator, dtype=torch.float64)
    model = model.double()
    y = torch.randint(0, 3, (n,), generator=generator)
    train_briefly(model, X[: args.n_train], y[: args.n_train], args.steps, 1e-2, generator)
    train = (X[: args.n_train], y[: args.n_train])
    return model, train, (X[args.n_train:], y[args.n_train:])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def compare(store: fi.GradientStore, queries, exact: torch.Tensor) -> dict:
    start = time.perf_counter()
    scores = store.pairwise(queries)
    top, _ = store.top_influences(queries, top=10)
    seconds = time.perf_counter() - start
    exact_top = exact.T.topk(10, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, exact_top,
                                                                           strict=True)]
    per_query = [pearson(scores[:, j], exact[:, j]) for j in range(exact.shape[1])]
    return {
        "pearson": pearson(scores, exact),
        "pearson_per_query_median": float(torch.tensor(per_query).median()),
        "relative_error": float((scores - exact).norm() / exact.norm()),
        "top10_overlap": sum(overlap) / len(overlap),
        "query_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cases": {}}
    for kind in ("mlp", "cnn"):
        model, train, queries = make_case(kind, args)
        start = time.perf_counter()
        influence = fi.Influence(model, train, queries, params="all", hessian="gauss-newton",
                                 solver="direct", damping=args.damping)
        exact = influence.pairwise(queries)
        exact_seconds = time.perf_counter() - start
        rows = []
        for k in args.ks:
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                store = fi.GradientStore(model, train, k=k, out=out, params="all",
                                         damping=args.damping, dtype=torch.float64).build()
                build_seconds = time.perf_counter() - start
                row = {"k": k, "dim": store.dim, "build_seconds": build_seconds,
                       **compare(store, queries, exact)}
            rows.append(row)
            print(kind, row, flush=True)
        results["cases"][kind] = {"p": influence.backend.dim, "exact_seconds": exact_seconds,
                                  "stores": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
