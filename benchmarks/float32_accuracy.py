"""How far float32 scores are from float64 ones, on the benchmark's problem.

For the ``params="all"`` problem of ``bench_influence.py`` (same model, data and capped CG
solve), computes the scores ``−sᵀ∇l(z_i)`` three ways on the same ``s``: fastinfluence in
float32 (``Influence.scores()``), the reference per-sample loop in float32, and the reference
loop on a float64 copy of the model (the truth). Prints each float32 result's relative error::

    python benchmarks/float32_accuracy.py --sizes 64 128 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from bench_influence import make_problem, relative_error

import fastinfluence
from fastinfluence import reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--cg-max-iter", type=int, default=3)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(size < 32 or size % 32 for size in args.sizes):
        parser.error("--sizes must be positive multiples of 32 (five 2x2 pools)")
    return args


def errors(size: int, args: argparse.Namespace) -> dict[str, float | str]:
    model, train, val = make_problem(size, args)
    with warnings.catch_warnings():  # the capped CG warns; s is what it is, for all three
        warnings.simplefilter("ignore", RuntimeWarning)
        inf = fastinfluence.Influence(model, train, val, params="all", solver="cg",
                                      max_iter=args.cg_max_iter, hessian="gauss-newton",
                                      damping=args.damping)
    s = inf.ihvp.detach()
    X, y = train
    loop = -(reference.per_sample_grads(model, list(model.parameters()), X, y) @ s)
    wide = copy.deepcopy(model).double()
    truth = -(reference.per_sample_grads(wide, list(wide.parameters()), X.double(), y)
              @ s.double())
    return {
        "scoring": inf.report.scoring,
        "fastinfluence": relative_error(inf.scores(), truth),
        "reference_loop": relative_error(loop, truth),
    }


def main(argv: list[str] | None = None) -> dict[int, dict[str, float | str]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    print("| size | fastinfluence scores (pass) | reference loop |")
    print("| ---: | ---: | ---: |")
    for size in args.sizes:
        r = results[size] = errors(size, args)
        print(f"| {size}² | {r['fastinfluence']:.1e} ({r['scoring']}) | "
              f"{r['reference_loop']:.1e} |", flush=True)
    return results


if __name__ == "__main__":
    main()
