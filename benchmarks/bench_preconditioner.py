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

Then, on the digits MLP, it builds the curvature from ``m`` of the ``n`` training samples
(``curvature_samples=m``) and compares the scores of all ``n`` with those of the full-``n``
curvature (Pearson correlation, relative error ``‖Δ‖/‖full‖``)::

    python benchmarks/bench_preconditioner.py --threads 1 \\
        --out benchmarks/results/preconditioner.json

and the subsample comparison at three dampings, with the condition numbers
(:func:`conditioning`)::

    python benchmarks/bench_preconditioner.py --threads 1 --networks digits-mlp \\
        --preconditioners none --samples 128 256 512 768 896 992 \\
        --sample-dampings 1e-3 1e-2 1e-1 --conditioning \\
        --out benchmarks/results/curvature_samples.json
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
TOLERANCES = (1e-4, 1e-6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--n-train", type=int, default=128,
                        help="training samples of the CNNs (float64 products cost 1 s each "
                             "at 128 on one thread)")
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--fit-images", type=int, default=640,
                        help="slices the CNNs are trained on (the influence's training set is "
                             "the first --n-train of them; validation: --n-val others)")
    parser.add_argument("--mlp-n-train", type=int, default=1024)
    parser.add_argument("--preconditioners", nargs="+", default=["none", "kfac", "ekfac"],
                        choices=["none", "kfac", "ekfac"])
    parser.add_argument("--cnn-preconditioners", nargs="+", default=["none", "kfac"],
                        choices=["none", "kfac", "ekfac"],
                        help="those run on the CNNs (each solve there takes minutes)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--mlp-epochs", type=int, default=40)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--cnn-max-iter", type=int, default=120)
    parser.add_argument("--samples", type=int, nargs="*", default=[32, 64, 128, 256, 512],
                        help="curvature_samples m compared with the full n (digits MLP)")
    parser.add_argument("--sample-dampings", type=float, nargs="+", default=None,
                        help="dampings of that comparison (default: --damping)")
    parser.add_argument("--conditioning", action="store_true",
                        help="also the condition numbers of a small MLP, explicitly")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``fit_images + n_val`` brain-tumour slices at 32² (three classes), standardised."""
    from fastinfluence.datasets.brain_tumour import make_brain_tumour

    n = args.fit_images + args.n_val
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
    n = min(args.mlp_n_train + args.n_val, len(y))
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
    """A few epochs of Adam on the first ``n_train`` samples; accuracies on them and on the
    rest."""
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


def solves(influence: fi.Influence, gradient: torch.Tensor, preconditioners: list[str],
           max_iter: int, args: argparse.Namespace) -> list:
    """One CG solve to the smallest tolerance per preconditioner, on the Influence's
    Gauss-Newton backend, with the residual after every iteration: the products to reach a
    larger tolerance are those of the same iteration stopped there (CG is deterministic, so
    the shorter solve is a prefix of the longer), plus the closing residual check."""
    rows = []
    norm = float(gradient.norm())
    for name in preconditioners:
        preconditioner = None if name == "none" else name
        config = CGConfig(max_iter=max_iter, tol=min(TOLERANCES), preconditioner=preconditioner)
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
    full curvature's (CG to 1e-6, so the solve's own error is far below the differences), at
    each damping."""
    rows = []
    for damping in args.sample_dampings or [args.damping]:
        options = {"params": "all", "hessian": "gauss-newton", "solver": "cg",
                   "damping": damping, "tol": 1e-6, "max_iter": args.max_iter}
        start = time.perf_counter()
        full = fi.Influence(model, train_data, val_data, **options)
        reference = full.scores()
        rows.append({"damping": damping, "m": len(train_data[1]), "pearson": 1.0,
                     "relative_error": 0.0, "seconds": time.perf_counter() - start,
                     "products": full.report.solve.hessian_products})
        for m in args.samples:
            start = time.perf_counter()
            part = fi.Influence(model, train_data, val_data, curvature_samples=m, **options)
            scores = part.scores()
            pearson = float(torch.corrcoef(torch.stack([scores, reference]))[0, 1])
            error = float((scores - reference).norm() / reference.norm())
            rows.append({"damping": damping, "m": m, "pearson": pearson,
                         "relative_error": error, "seconds": time.perf_counter() - start,
                         "products": part.report.solve.hessian_products})
            print(f"  damping {damping:g}, m = {m:4d}: Pearson {pearson:.4f}, relative error "
                  f"{error:.3f}, {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def conditioning(args: argparse.Namespace, damping: float) -> dict:
    """Why K-FAC preconditions badly, on a small trained digits MLP (64–16–10, p = 1,210,
    300 samples, float64) where everything is explicit: the condition numbers of ``G + λI``
    preconditioned by nothing, by the exact block diagonal of ``G`` (one block per layer, what
    K-FAC approximates) and by K-FAC, and K-FAC's relative Frobenius error per block."""
    x, y = digits(args)
    x, y = x[:300].double(), y[:300]
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    data = (x, y)
    gauss_newton = fi.Influence(model, data, data, params="all", hessian="gauss-newton",
                                solver="cg", damping=damping, tol=1.0).backend.dense()
    kfac = fi.Influence(model, data, data, params="all", hessian="kfac",
                        damping=damping).backend.dense()
    eye = torch.eye(len(gauss_newton), dtype=torch.float64)
    block_diagonal = torch.zeros_like(gauss_newton)
    errors = []
    start = 0
    for layer in (model[0], model[2]):
        stop = start + layer.weight.numel() + layer.bias.numel()
        block = gauss_newton[start:stop, start:stop]
        block_diagonal[start:stop, start:stop] = block
        errors.append(float((kfac[start:stop, start:stop] - block).norm() / block.norm()))
        start = stop

    def condition(preconditioner: torch.Tensor) -> float:
        root = torch.linalg.cholesky(torch.linalg.inv(preconditioner + damping * eye))
        values = torch.linalg.eigvalsh(root.T @ (gauss_newton + damping * eye) @ root)
        return float(values[-1] / values[0])

    return {"damping": damping, "parameters": len(gauss_newton),
            "condition_none": condition(0 * eye), "condition_block_diagonal":
            condition(block_diagonal), "condition_kfac": condition(kfac),
            "kfac_block_relative_error": errors}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    results: dict = {"settings": {**vars(args), "out": str(args.out), "dtype": "float64",
                                  "torch": torch.__version__, "cpu": platform.processor()},
                     "networks": {}}
    tumour = images(args) if set(args.networks) - {"digits-mlp"} else None
    for network in args.networks:
        mlp = network == "digits-mlp"
        x, y = digits(args) if mlp else tumour
        n_train = args.mlp_n_train if mlp else args.n_train
        torch.manual_seed(args.seed)
        model = build(network)
        epochs = args.mlp_epochs if mlp else args.epochs
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
            "training": training,
            "solves": solves(influence, gradient,
                             args.preconditioners if mlp else args.cnn_preconditioners,
                             args.max_iter if mlp else args.cnn_max_iter, args)}
        if mlp and args.samples:
            results["networks"][network]["curvature_samples"] = subsample_scores(
                model, train_data, val_data, args)
    if args.conditioning:
        results["conditioning"] = conditioning(args, args.damping)
        print(results["conditioning"], flush=True)
    results["seconds"] = time.perf_counter() - began
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
