"""Gauss-Newton CG with and without a K-FAC / EK-FAC preconditioner, and curvature on a
subsample, on trained networks.

Trains, briefly and on one thread, the paper CNN and the residual CNN of ``bench_peers`` on
32² slices of the embedded brain-tumour generator (the paper CNN with channels
(8, 8, 16, 16, 16), as in ``default_curvature.py``), the compact ResNet-18 (width 8,
``stem="small"``) on the same slices, and an MLP on scikit-learn's digits (bundled, offline;
``--mlp-epochs``, as its epochs are short). For each, in float64 (so that a true relative
residual of 1e-6 is reachable; the product counts are those of the mathematics, not of the
dtype), it counts the Gauss-Newton products CG takes to reach
the relative residuals ``1e-4`` and ``1e-6`` of ``(G + λI)x = ∇L(val)``, with
``preconditioner=None``, ``"kfac"`` and ``"ekfac"`` (one solve to 1e-6 each, its residual
traced per iteration; each solve's report, with the factors' passes over the data
separately, and seconds).

Then, on the paper CNN, it builds the curvature from ``m`` of the ``n`` training samples
(``curvature_samples=m``) and compares the scores of all ``n`` with those of the full-``n``
curvature (Pearson correlation, relative error ``‖Δ‖/‖full‖``)::

    python benchmarks/bench_preconditioner.py --threads 1 \\
        --out benchmarks/results/preconditioner.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from bench_peers import ResidualCNN
from torch import nn

import fastinfluence as fi
from fastinfluence.hessian.solvers import CGConfig, make_solver
from fastinfluence.models import PaperCNN, resnet18

NETWORKS = ("paper-cnn", "residual-cnn", "resnet18-compact", "digits-mlp")
PRECONDITIONERS = (None, "kfac", "ekfac")
TOLERANCES = (1e-4, 1e-6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--mlp-epochs", type=int, default=40)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--samples", type=int, nargs="*", default=[64, 128, 256],
                        help="curvature_samples m compared with the full n (paper CNN)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_train + n_val`` brain-tumour slices at 32² (three classes), standardised."""
    from fastinfluence.datasets.brain_tumour import make_brain_tumour

    n = args.n_train + args.n_val
    data = make_brain_tumour(n_slices=n, image_size=32, seed=args.seed, progress=False)
    x = data.images.float()
    x = (x - x.mean()) / x.std()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    return x[order], data.labels[order]


def digits(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits, flattened and scaled to [0, 1], shuffled."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16
    y = torch.tensor(bunch.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    n = min(args.n_train + args.n_val, len(y))
    return x[order][:n], y[order][:n]


def build(network: str) -> nn.Module:
    if network == "paper-cnn":
        return PaperCNN(image_size=32, num_classes=3, channels=(8, 8, 16, 16, 16))
    if network == "residual-cnn":
        return ResidualCNN(in_channels=1, num_classes=3)
    if network == "resnet18-compact":
        return resnet18(3, width=8, in_channels=1, stem="small")
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_train: int, epochs: int,
          args: argparse.Namespace) -> dict:
    """A few epochs of Adam on the first ``n_train`` samples; accuracies on both parts."""
    torch.manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(n_train).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    correct = (predicted == y).float()
    return {"epochs": epochs, "seconds": time.perf_counter() - start,
            "train_accuracy": float(correct[:n_train].mean()),
            "val_accuracy": float(correct[n_train:].mean())}


def traced(precondition, trace: list[float], norm: float, residual: torch.Tensor):
    """``precondition(residual)``, after appending its relative norm to ``trace``."""
    trace.append(float(residual.norm()) / norm)
    return precondition(residual)


def solves(influence: fi.Influence, gradient: torch.Tensor, args: argparse.Namespace) -> list:
    """One CG solve to the smallest tolerance per preconditioner, on the Influence's
    Gauss-Newton backend, with the residual after every iteration: the products to reach a
    larger tolerance are those of the same iteration stopped there (CG is deterministic, so
    the shorter solve is a prefix of the longer), plus the closing residual check."""
    rows = []
    norm = float(gradient.norm())
    for preconditioner in PRECONDITIONERS:
        config = CGConfig(max_iter=args.max_iter, tol=min(TOLERANCES),
                          preconditioner=preconditioner)
        trace: list[float] = []
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a miss is in the report
            solver = make_solver("cg", influence.backend, args.damping, config)
            fitted = time.perf_counter() - start
            # The residual CG preconditions after each step: r₀ = b, then one per iteration.
            precondition = solver._precondition
            solver._precondition = functools.partial(traced, precondition, trace, norm)
            _, report = solver.solve(gradient[None])
        seconds = time.perf_counter() - start
        per_tol = {}
        for tol in TOLERANCES:
            reached = next((k for k, value in enumerate(trace) if value <= tol), None)
            per_tol[f"{tol:g}"] = None if reached is None else reached + 1
        rows.append({**report.as_dict(), "products_to": per_tol, "factor_seconds": fitted,
                     "seconds_with_factors": seconds,
                     "seconds_per_product": report.seconds / report.hessian_products})
        print(f"  {preconditioner or 'none':5}: products to {per_tol} "
              f"(+{report.preconditioner_passes} factor passes), residual "
              f"{report.relative_residual:.2e}, {seconds:.1f} s", flush=True)
    return rows


def subsample_scores(model: nn.Module, train_data, val_data, args: argparse.Namespace) -> list:
    """Scores of every training sample with the curvature of ``m`` of them, against the
    full curvature's (PCG to 1e-6, so the solve's own error is far below the differences)."""
    options = {"params": "all", "hessian": "gauss-newton", "solver": "cg",
               "damping": args.damping, "tol": 1e-6, "max_iter": args.max_iter,
               "preconditioner": "kfac"}
    start = time.perf_counter()
    full = fi.Influence(model, train_data, val_data, **options)
    reference = full.scores()
    rows = [{"m": len(train_data[1]), "pearson": 1.0, "relative_error": 0.0,
             "seconds": time.perf_counter() - start}]
    for m in args.samples:
        start = time.perf_counter()
        part = fi.Influence(model, train_data, val_data, curvature_samples=m, **options)
        scores = part.scores()
        pearson = float(torch.corrcoef(torch.stack([scores, reference]))[0, 1])
        error = float((scores - reference).norm() / reference.norm())
        rows.append({"m": m, "pearson": pearson, "relative_error": error,
                     "seconds": time.perf_counter() - start,
                     "products": part.report.solve.hessian_products})
        print(f"  m = {m:4d}: Pearson {pearson:.4f}, relative error {error:.3f}, "
              f"{rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    results: dict = {"settings": {**vars(args), "out": str(args.out), "dtype": "float64",
                                  "torch": torch.__version__, "cpu": platform.processor()},
                     "networks": {}}
    tumour = images(args) if set(args.networks) - {"digits-mlp"} else None
    for network in args.networks:
        x, y = digits(args) if network == "digits-mlp" else tumour
        n_train = min(args.n_train, len(y) - args.n_val)
        torch.manual_seed(args.seed)
        model = build(network)
        epochs = args.mlp_epochs if network == "digits-mlp" else args.epochs
        training = train(model, x, y, n_train, epochs, args)
        model = model.double()
        x = x.double()
        train_data, val_data = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
        print(f"{network}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"accuracy {training['train_accuracy']:.3f} / {training['val_accuracy']:.3f}",
              flush=True)
        influence = fi.Influence(model, train_data, val_data, params="all",  # no solve: tol 1
                                 hessian="gauss-newton", solver="cg", damping=args.damping,
                                 tol=1.0)
        gradient = influence.backend.mean_gradient(influence.val)
        results["networks"][network] = {
            "parameters": influence.report.num_params, "n_train": n_train,
            "training": training, "solves": solves(influence, gradient, args)}
        if network == "paper-cnn" and args.samples:
            results["networks"][network]["curvature_samples"] = subsample_scores(
                model, train_data, val_data, args)
    results["seconds"] = time.perf_counter() - began
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
