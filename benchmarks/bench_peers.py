"""fastinfluence side by side with captum, pyDVL and Kronfluence, against an exact reference.

Every method scores the same training samples of the same model (eval mode) with the same
damping λ, and is compared with an exact float64 reference. Tasks: the paper CNN
(:class:`fastinfluence.models.PaperCNN`) at each ``--sizes`` with ``params="last"`` (its Linear
head) and ``params="all"``, plus a small residual CNN (:class:`ResidualCNN`) at the first size.

**The quantity.** Our group influence ``I(z) = −∇L_valᵀ (H + λI)^{-1} ∇l(z)``, ``L_val`` the mean
validation loss, ``H`` the curvature of the MEAN training loss over the selected parameters,
additive damping λ. The curvature is Gauss-Newton (GN) ``G = (1/n) Σ_i J_iᵀ Q_i J_i``
(``Q_i = diag(p_i) − p_i p_iᵀ`` for softmax cross-entropy), which for the Linear head equals the
exact Hessian. Each peer's options are mapped to this quantity, and its output converted to our
sign and scale inside its adapter (the mapping, by peer):

* **captum** (``NaiveInfluenceFunction``, ``ArnoldiInfluenceFunction``): its Hessian is that of the
  SUMMED training loss (``n H``), and ``hessian_reg`` is added to that, so ``hessian_reg = n λ``
  gives ``n (H + λI)``. Its score ``influence((X_val, y_val))[j, i]`` is
  ``∇l(val_j)ᵀ (nH_λ)^{-1} ∇l(z_i)`` (no minus; measured: relative error ~1e-4 after the
  mapping, on the head), hence ``I(z_i) = −n · mean_j score[j, i]``. captum uses the exact Hessian
  (no GN option): identical for the head, indefinite for ``"all"`` (its eigen-filtering keeps the
  positive part). Naive builds the explicit ``p × p`` Hessian with ``projection_dim = p``
  (exact); it is not run above ``--naive-max-params`` (reported so). Arnoldi keeps
  ``--projection-dim`` eigenpairs of a ``--arnoldi-dim`` Krylov space (damping only there).
* **pyDVL** (``DirectInfluence``, ``CgInfluence``, ``LissaInfluence``): curvature of the MEAN
  loss (``loss=F.cross_entropy``), ``regularization = λ`` additive,
  ``second_order_mode=HESSIAN`` (pyDVL's ``GAUSS_NEWTON`` mode is the empirical Fisher
  ``Σ ∇l ∇lᵀ``, a different matrix; its exact Hessian equals GN for the head and is indefinite
  for ``"all"``, as captum's); parameters outside the selection get ``requires_grad=False``
  (pyDVL differentiates only trainable ones). ``influences(X_val, y_val, X, y, mode=Up)[j, i]``
  is ``+∇l(val_j)ᵀ H_λ^{-1} ∇l(z_i)`` (measured: exactly −1 × ours with Direct on the head),
  hence ``I(z_i) = −mean_j``. pyDVL has no solve against the mean validation gradient: CG and
  LiSSA solve one system per validation sample (CG block-wise, ``solve_simultaneously=True``).
  Direct is not run above ``--naive-max-params``.
* **Kronfluence** (``ekfac``, ``kfac``): factors are covariances averaged per sample (the mean
  loss), ``ScoreArguments(damping_factor=λ)`` adds λ to the Kronecker eigenvalues, i.e.
  additive λ. Labels are sampled from the model (``use_empirical_fisher=False``: the true
  Fisher, equal to GN in expectation). The query gradients are aggregated
  (``aggregate_query_gradients=True``: the gradient of the SUMMED validation loss); its score
  ``= ∇(Σ_j l(val_j))ᵀ F_λ^{-1} ∇l(z_i)`` with no minus, hence ``I(z_i) = −score / n_val``.
  Kronfluence tracks Linear and Conv2d modules only: BatchNorm parameters are left out for
  ``"all"``.
* **fastinfluence**: ``fi.Influence(model, train, val, params=..., damping=λ, ...)`` then
  ``.scores()``; for ``"last"`` the defaults (closed-form head), for ``"all"`` the variants of
  ``--fi-all`` (``cgN``: Gauss-Newton CG capped at N iterations; ``woodbury``: the exact
  Gauss-Newton solve through the n·C Jacobian rows; ``kfac``/``ekfac``: over the Linear and
  Conv2d modules, BatchNorm left out as in Kronfluence).

Pearson is sign-sensitive: each adapter returns scores in our sign (the rules above, checked on
the head, where Naive/Direct are exact: their relative error to the reference is reported too).

**The reference** (float64, ``exact_gauss_newton_scores``): per-sample output Jacobians
``J_i`` by ``vmap(jacrev)``; ``B`` stacks ``Q_i^{1/2} J_i / √n``, so ``G = BᵀB``; then
``s = (G + λI)^{-1} ∇L_val`` by an explicit Cholesky solve when ``p ≤ n·C`` (the head: the
closed-form head solve) and otherwise exactly by the Woodbury identity
``s = (g − Bᵀ(BBᵀ + λI)^{-1} B g)/λ`` (an explicit GN solve, no iteration); scores ``−G_train s``.

**Timing.** Each method runs in its own worker process (fresh interpreter), which builds the
problem (same seed), warms up on 8 training samples and then, on request, runs the whole method
(fit + scoring) once per round: the coordinator asks each worker in turn, ``--rounds`` rounds
(this VM drifts by tens of percent: turns keep methods comparable), median seconds per stage.
``--method-cap S`` bounds each method's timed runs on a task to S seconds in all (the reference is
exempt, it is the yardstick): a round is not started when the time used plus the previous
round's would pass S (fewer rounds, reported as ``rounds``), a round still running at S is
killed, and a method with no finished round is reported ``not run: over cap`` (then not started
on the larger sizes of the same model and selection either). The setup and warm-up, which run
in all workers at once, do not count; they are killed after S seconds of waiting for them
(``warmup_seconds`` reports the warm-up).
Peak memory is the worker's peak resident set (``getrusage`` max RSS, MiB), reported with the
RSS after building the problem (its baseline: interpreter, torch, the peer's imports, data). A
method that fails or is not installed is reported as such, never dropped.

Where fastinfluence's K-FAC/EK-FAC and Kronfluence's ran on a task, the Pearson between their
scores is reported too (``agreement``). ``--tasks`` picks tasks by name, run in that order.

Writes JSON to ``--out`` and a plot (seconds vs Pearson, log-x) to ``--plot``, both rewritten
after every round (``config.complete`` is false until the run ends)::

    python benchmarks/bench_peers.py                       # CPU default (32², small sets)
    python benchmarks/bench_peers.py --sizes 64 128 --n-train 512 --n-val 64
    python benchmarks/bench_peers.py --summary results/peers_cpu.json   # table of a saved run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_influence import make_problem, synchronize
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import fastinfluence

HERE = Path(__file__).resolve().parent
PROTOCOL = "@@bench_peers "
"""Prefix of the worker's protocol lines on stdout (libraries may print there too)."""
PEER_MODULES = {"captum": "captum.influence", "pydvl": "pydvl.influence.torch",
                "kronfluence": "kronfluence"}
PEER_METHODS = {
    "captum-naive": "captum", "captum-arnoldi": "captum",
    "pydvl-direct": "pydvl", "pydvl-cg": "pydvl", "pydvl-lissa": "pydvl",
    "kronfluence-ekfac": "kronfluence", "kronfluence-kfac": "kronfluence",
}
EXACT_PEARSON = 0.999
LAST_SPEEDUP_TARGET = 3.0


class ResidualCNN(nn.Module):
    """A small residual CNN: a conv–BN–ReLU stem, ``blocks`` residual blocks
    ``x + BN(conv(ReLU(BN(conv(x)))))`` followed by ReLU, global average pooling, one Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 16,
                 blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                          nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                          nn.BatchNorm2d(width))
            for _ in range(blocks)
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.classifier(x.mean(dim=(2, 3)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="PaperCNN sides")
    parser.add_argument("--params", nargs="+", choices=["last", "all"], default=["last", "all"])
    parser.add_argument("--no-resnet", action="store_true", help="skip the residual CNN tasks")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="run only these tasks (e.g. cnn64-last), in this order")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--train-steps", type=int, default=10,
                        help="brief Adam training on the random data (0: random init)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per method, in turns")
    parser.add_argument("--method-cap", type=float, default=None,
                        help="seconds per method and task for the timed runs (not the reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods (reference always runs)")
    parser.add_argument("--fi-all", nargs="+", default=["cg10", "cg50", "ekfac", "kfac"],
                        help='fastinfluence variants for params="all": cgN, woodbury, kfac, '
                             'ekfac')
    parser.add_argument("--peer-batch", type=int, default=32, help="peers' batch size")
    parser.add_argument("--naive-max-params", type=int, default=2000,
                        help="largest p for captum Naive / pyDVL Direct (explicit p×p Hessian)")
    parser.add_argument("--projection-dim", type=int, default=50, help="captum Arnoldi")
    parser.add_argument("--arnoldi-dim", type=int, default=200, help="captum Arnoldi")
    parser.add_argument("--cg-maxiter", type=int, default=50, help="pyDVL CG")
    parser.add_argument("--lissa-maxiter", type=int, default=50, help="pyDVL LiSSA")
    parser.add_argument("--lissa-scale", type=float, default=10.0, help="pyDVL LiSSA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where every method runs (the problem is built on the CPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--summary", type=Path, default=None, metavar="JSON",
                        help="run nothing: print the table, agreement and targets of a saved "
                             "report (the tables of docs/benchmarks.md come from this) and "
                             "redraw its plot (the JSON's name with .png)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/peers_<device>.json")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default: results/peers_<device>.png")
    args = parser.parse_args(argv)
    for name in ("n_train", "n_val", "rounds", "threads", "peer_batch", "num_classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(size < 32 or size % 32 for size in args.sizes):
        parser.error("--sizes must be positive multiples of 32 (five 2x2 pools)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    args.out = args.out or HERE / "results" / f"peers_{args.device}.json"
    args.plot = args.plot or HERE / "results" / f"peers_{args.device}.png"
    if args.method_cap is not None and args.method_cap <= 0:
        parser.error("--method-cap must be > 0")
    if args.tasks is not None:
        known = [task["name"] for task in tasks_of(argparse.Namespace(**{**vars(args),
                                                                           "tasks": None}))]
        unknown = [name for name in args.tasks if name not in known]
        if unknown:
            parser.error(f"--tasks: unknown {unknown}; these settings give {known}")
    if args.damping <= 0:
        parser.error("--damping must be > 0 (the Woodbury reference divides by it)")
    for variant in args.fi_all:
        if (variant not in ("kfac", "ekfac", "woodbury")
                and not (variant[:2] == "cg" and variant[2:].isdigit())):
            parser.error(f"--fi-all: unknown variant {variant!r} (cgN, woodbury, kfac, ekfac)")
    return args


# ----------------------------------------------------------------------------- problems


def make_task(task: dict[str, Any], args: argparse.Namespace):
    """Model (briefly trained, eval mode), train and val tensors of ``task`` on ``--device``;
    seeded and built on the CPU (the problem of ``bench_influence.py``)."""
    build = None if task["model"] == "cnn" else lambda: ResidualCNN(num_classes=args.num_classes)
    model, train, val = make_problem(task["size"], args, build)
    return (model.to(args.device),
            *((X.to(args.device), y.to(args.device)) for X, y in (train, val)))


def selected_names(model: nn.Module, which: str) -> list[str]:
    """Parameter names of the selection, in ``named_parameters`` order (the head is
    ``classifier`` in both models)."""
    names = [name for name, _ in model.named_parameters()]
    return [n for n in names if n.startswith("classifier.")] if which == "last" else names


def tasks_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The tasks of the settings (``--tasks``: those, in its order)."""
    models = [("cnn", size) for size in args.sizes]
    if not args.no_resnet:
        models.append(("resnet", args.sizes[0]))
    tasks = [dict(name=f"{kind}{size}-{which}", model=kind, size=size, params=which)
             for kind, size in models for which in args.params]
    if args.tasks is None:
        return tasks
    by_name = {task["name"]: task for task in tasks}
    return [by_name[name] for name in args.tasks]


def methods_of(task: dict[str, Any], args: argparse.Namespace) -> list[str]:
    fi = (["fastinfluence"] if task["params"] == "last"
          else [f"fastinfluence-{variant}" for variant in args.fi_all])
    chosen = [*fi, *PEER_METHODS]
    if args.methods is not None:
        chosen = [m for m in chosen if m in args.methods]
    return ["reference", *chosen]


# ----------------------------------------------------------------------------- reference


def exact_gauss_newton_scores(model: nn.Module, names: list[str], train, val, damping: float,
                              chunk: int = 8) -> torch.Tensor:
    """``−∇l(z_i)ᵀ (G + λI)^{-1} ∇L_val`` in float64, G the GN matrix of the mean training
    loss over ``names`` (softmax cross-entropy); exact (module docstring)."""
    model64 = copy.deepcopy(model).double().eval()
    theta = {name: p.detach() for name, p in model64.named_parameters() if name in names}

    def logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model64, params, (x[None],))[0]

    sample_jacobian = vmap(jacrev(logits), in_dims=(None, 0))

    def pieces(X: torch.Tensor, y: torch.Tensor):
        """Per chunk: per-sample gradients ``[b, p]``, rows ``Q_i^{1/2} J_i`` ``[b·C, p]``."""
        for start in range(0, len(X), chunk):
            x = X[start : start + chunk].double()
            jac = sample_jacobian(theta, x)
            J = torch.cat([jac[name].reshape(len(x), jac[name].shape[1], -1) for name in names],
                          dim=2)
            with torch.no_grad():
                probs = torch.softmax(functional_call(model64, theta, (x,)), dim=1)
            residual = probs - F.one_hot(y[start : start + chunk], probs.shape[1]).double()
            gradients = torch.einsum("bcp,bc->bp", J, residual)
            Q = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
            values, vectors = torch.linalg.eigh(Q)
            root = vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.mT
            yield gradients, (root @ J).reshape(-1, J.shape[2])

    with torch.no_grad():
        n = len(train[0])
        g_val = sum(g.sum(0) for g, _ in pieces(*val)) / len(val[0])
        train_pieces = list(pieces(*train))
        G_train = torch.cat([g for g, _ in train_pieces])
        B = torch.cat([rows for _, rows in train_pieces]) / n**0.5
        p = B.shape[1]
        if p <= B.shape[0]:
            H = B.T @ B + damping * torch.eye(p, dtype=B.dtype)
            s = torch.cholesky_solve(g_val[:, None], torch.linalg.cholesky(H))[:, 0]
        else:
            K = B @ B.T + damping * torch.eye(B.shape[0], dtype=B.dtype)
            inner = torch.cholesky_solve((B @ g_val)[:, None], torch.linalg.cholesky(K))[:, 0]
            s = (g_val - B.T @ inner) / damping
        return -(G_train @ s)


# ----------------------------------------------------------------------------- adapters
# Each adapter runs one method end to end and returns (scores in our convention, {stage: s}).

Stages = dict[str, float]


def run_reference(model, names, train, val, args, tmp) -> tuple[torch.Tensor, Stages]:
    synchronize()
    start = time.perf_counter()
    scores = exact_gauss_newton_scores(model, names, train, val, args.damping)
    synchronize()
    return scores, {"total": time.perf_counter() - start}


def run_fastinfluence(variant: str | None):
    def run(model, names, train, val, args, tmp):
        which: Any = "last" if names == selected_names(model, "last") else "all"
        if variant in ("kfac", "ekfac") and which == "all":  # K-FAC covers Linear and Conv2d
            which = [name for name, module in model.named_modules()
                     if isinstance(module, (nn.Linear, nn.Conv2d))]
        options: dict[str, Any] = dict(params=which, damping=args.damping)
        if variant in ("kfac", "ekfac"):
            options["hessian"] = variant
        elif variant == "woodbury":
            options.update(hessian="gauss-newton", solver="woodbury")
        elif variant is not None:
            options.update(hessian="gauss-newton", solver="cg", max_iter=int(variant[2:]))
        def fit():
            with warnings.catch_warnings():  # a capped CG warns: its cap is the variant's point
                warnings.filterwarnings("ignore", "cg solve did not reach", RuntimeWarning)
                return fastinfluence.Influence(model, train, val, **options)

        def score(inf):
            report = inf.report
            run.notes = {"path": report.path, "scoring": report.scoring,
                         "feature_pass": report.feature_pass, "hessian": report.hessian,
                         "solver": report.solver}
            return inf.scores()

        return _timed(fit, score)

    run.notes = {}
    return run


def _timed(fit: Callable[[], Any], score: Callable[[Any], torch.Tensor]):
    """Scores and seconds of the two stages, queued GPU work included."""
    synchronize()
    start = time.perf_counter()
    fitted = fit()
    synchronize()
    middle = time.perf_counter()
    scores = score(fitted)
    synchronize()
    return scores, {"fit": middle - start, "scoring": time.perf_counter() - middle}


def run_captum(kind: str):
    def run(model, names, train, val, args, tmp):
        from captum.influence import NaiveInfluenceFunction
        from captum.influence._core.arnoldi_influence_function import (  # not re-exported
            ArnoldiInfluenceFunction,
        )
        p = sum(param.numel() for name, param in model.named_parameters() if name in names)
        if kind == "naive" and p > args.naive_max_params:
            raise NotRun(f"p = {p} > --naive-max-params {args.naive_max_params}: the explicit "
                         f"p×p Hessian would take {p * p * 4 / 2**30:.1f} GiB and p backward "
                         "passes")
        checkpoint = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), checkpoint)

        def load(module: nn.Module, path: str) -> float:
            module.load_state_dict(torch.load(path))
            return 1.0

        n = len(train[0])
        loss = nn.CrossEntropyLoss(reduction="none")
        common = dict(checkpoint=checkpoint, checkpoints_load_func=load,
                      layers=["classifier"] if names == selected_names(model, "last") else None,
                      loss_fn=loss, test_loss_fn=loss, batch_size=args.peer_batch,
                      hessian_reg=n * args.damping)
        dataset = TensorDataset(*train)
        if kind == "naive":
            def fit():
                return NaiveInfluenceFunction(model, dataset, projection_dim=p, **common)
        else:
            def fit():
                return ArnoldiInfluenceFunction(
                    model, dataset, projection_dim=min(args.projection_dim, p - 1),
                    arnoldi_dim=min(args.arnoldi_dim, p - 1), **common)
        return _timed(fit, lambda inf: -n * inf.influence(val).mean(0))
    return run


def run_pydvl(kind: str):
    def run(model, names, train, val, args, tmp):
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            CgInfluence,
            DirectInfluence,
            LissaInfluence,
            SecondOrderMode,
        )
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        p = sum(param.numel() for name, param in model.named_parameters() if name in names)
        common = dict(regularization=args.damping,
                      second_order_mode=SecondOrderMode.HESSIAN)
        if kind == "direct":
            if p > args.naive_max_params:
                raise NotRun(f"p = {p} > --naive-max-params {args.naive_max_params}: explicit "
                             f"p×p matrix ({p * p * 4 / 2**30:.1f} GiB)")
            model_ = DirectInfluence(model, F.cross_entropy, **common)
        elif kind == "cg":
            model_ = CgInfluence(model, F.cross_entropy, maxiter=args.cg_maxiter,
                                 solve_simultaneously=True, warn_on_max_iteration=False,
                                 **common)
        else:
            model_ = LissaInfluence(model, F.cross_entropy, maxiter=args.lissa_maxiter,
                                    scale=args.lissa_scale, warn_on_max_iteration=False,
                                    **common)
        loader = DataLoader(TensorDataset(*train), batch_size=args.peer_batch)
        return _timed(lambda: model_.fit(loader),
                      lambda fitted: -fitted.influences(*val, *train, mode=InfluenceMode.Up)
                      .mean(0))
    return run


def kronfluence_classification_task(tracked_modules: list[str] | None = None) -> Any:
    """Kronfluence's ``Task`` for cross-entropy, summed over the batch (its convention), its
    true Fisher from labels drawn from the model; ``tracked_modules`` limits the influence to
    those modules (``None``: every supported one)."""
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, dim=1), 1)[:, 0]
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked_modules

    return Classification()


def run_kronfluence(strategy: str):
    def run(model, names, train, val, args, tmp):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        last = names == selected_names(model, "last")
        task = kronfluence_classification_task(["classifier"] if last else None)
        prepared = prepare_model(model, task)
        analyzer = Analyzer(analysis_name="bench", model=prepared, task=task,
                            cpu=args.device == "cpu",
                            disable_tqdm=True, disable_model_save=True, output_dir=tmp)
        train_set, val_set = TensorDataset(*train), TensorDataset(*val)

        def fit():
            analyzer.fit_all_factors(factors_name=strategy, dataset=train_set,
                                     per_device_batch_size=args.peer_batch,
                                     factor_args=FactorArguments(strategy=strategy),
                                     overwrite_output_dir=True)

        def score(_fitted):
            analyzer.compute_pairwise_scores(
                scores_name=strategy, factors_name=strategy, query_dataset=val_set,
                train_dataset=train_set, per_device_query_batch_size=len(val[0]),
                per_device_train_batch_size=args.peer_batch,
                score_args=ScoreArguments(damping_factor=args.damping,
                                          aggregate_query_gradients=True),
                overwrite_output_dir=True)
            raw = analyzer.load_pairwise_scores(strategy)["all_modules"]
            return -raw.sum(0) / len(val[0])

        return _timed(fit, score)
    return run


class NotRun(Exception):
    """A method deliberately not run on a task (the message says why)."""


def adapter(method: str):
    if method == "reference":
        return run_reference
    if method == "fastinfluence":
        return run_fastinfluence(None)
    if method.startswith("fastinfluence-"):
        return run_fastinfluence(method.split("-", 1)[1])
    library, kind = method.split("-", 1)
    return {"captum": run_captum, "pydvl": run_pydvl, "kronfluence": run_kronfluence}[library](
        kind)


# ----------------------------------------------------------------------------- worker


def _say(message: dict[str, Any]) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict[str, Any]) -> None:
    """One method on one task: warm up, then one full run per ``run`` line on stdin."""
    args = parse_args(spec["argv"])
    torch.set_num_threads(args.threads)
    task, method = spec["task"], spec["method"]
    library = PEER_METHODS.get(method)
    if library is not None and importlib.util.find_spec(library) is None:
        _say({"status": "not installed", "reason": f"{library} is not importable"})
        return
    model, train, val = make_task(task, args)
    names = selected_names(model, task["params"])
    run = adapter(method)
    baseline = _max_rss_mib()
    tmp = tempfile.mkdtemp(prefix=f"bench_peers_{method}_")

    def once(train_part):
        torch.manual_seed(args.seed)  # LiSSA / Kronfluence sampling: the same draws each run
        return run(copy.deepcopy(model), names, train_part, val, args, tmp)

    start = time.perf_counter()
    try:
        if method != "reference":
            once((train[0][:8], train[1][:8]))
    except NotRun as reason:
        _say({"status": "not run", "reason": str(reason)})
        return
    except Exception as error:  # any failure is a result to report, not a crash
        _say({"status": "failed", "reason": f"{type(error).__name__}: {error}"})
        return
    _say({"status": "ready", "baseline_rss_mib": baseline,
          "warmup_seconds": time.perf_counter() - start})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        try:
            scores, stages = once(train)
        except Exception as error:
            _say({"status": "failed", "reason": f"{type(error).__name__}: {error}"})
            return
        _say({"status": "ok", "stages": stages, "notes": getattr(run, "notes", {}),
              "scores": scores.detach().double().flatten().tolist()})
    peak_gpu = ({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
                if args.device == "cuda" else {})
    _say({"status": "done", "peak_rss_mib": _max_rss_mib(), **peak_gpu})


class OverCap(Exception):
    """A worker's step ran past the time it had left under ``--method-cap`` (it was killed)."""


class Worker:
    """The coordinator's handle on one worker process; a thread reads its protocol lines, so
    that the coordinator can wait for one with a timeout."""

    def __init__(self, task: dict[str, Any], method: str, argv: list[str], log: Path) -> None:
        spec = json.dumps({"task": task, "method": method, "argv": argv})
        env = {**os.environ, "OMP_NUM_THREADS": str(parse_args(argv).threads),
               "PYTHONPATH": os.pathsep.join(
                   [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                self.messages.put(json.loads(line[len(PROTOCOL):]))
        self.messages.put(None)  # end of output

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The worker's next message; after ``timeout`` seconds the worker is killed and
        :class:`OverCap` raised."""
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            self.process.wait()
            raise OverCap from None
        if message is None:
            self.messages.put(None)  # every later receive sees the end too
            return {"status": "failed", "reason": f"worker exited ({self.process.wait()}); "
                                                  f"see {self.log.name}"}
        return message

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.send("quit")
            message = self.receive()
        else:
            message = {}
        self.process.wait()
        self.log.close()
        return message


# ----------------------------------------------------------------------------- coordinator


def ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def compare(scores: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Pearson, Spearman and relative error ``‖m − r‖/‖r‖`` (which also checks the mapped
    sign and scale) of scores ``m`` against the exact ``r``."""
    return {
        "pearson": pearson(scores, exact),
        "spearman": pearson(ranks(scores), ranks(exact)),
        "relative_error": float((scores - exact).norm() / exact.norm()),
    }


class Budget:
    """One method's time on one task under ``--method-cap`` (``cap=None``: unbounded)."""

    def __init__(self, cap: float | None) -> None:
        self.cap = cap
        self.used = 0.0
        self.last = 0.0

    def spend(self, seconds: float) -> None:
        """Count a finished round of ``seconds``."""
        self.used += seconds
        self.last = seconds

    def left(self) -> float | None:
        """Seconds left for the next step, the timeout of waiting for it."""
        return None if self.cap is None else max(self.cap - self.used, 0.0)

    def allows_round(self) -> bool:
        """Whether a round may start: time is left, and the time used plus the previous
        round's (before the first: none) stays within the cap."""
        return self.cap is None or (self.used < self.cap and self.used + self.last <= self.cap)


def over_cap(cap: float, what: str) -> dict[str, Any]:
    """The result of a method stopped by ``--method-cap`` before any finished round."""
    return {"status": "not run", "reason": f"over cap: {what} passed --method-cap {cap:g} s"}


def bench_task(task: dict[str, Any], args: argparse.Namespace, argv: list[str], logs: Path,
               skip: dict[str, str] | None = None,
               progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """All methods of one task: workers alive together, runs taken in turns. ``skip`` maps
    methods not to start to the reason; ``progress`` gets the entry so far after the warm-up
    and after every round."""
    skip = skip or {}
    methods = methods_of(task, args)
    results: dict[str, dict[str, Any]] = {m: {"status": "not run", "reason": skip[m]}
                                          for m in methods if m in skip}
    workers = {m: Worker(task, m, argv, logs / f"{task['name']}_{m}.log")
               for m in methods if m not in skip}
    budgets = {m: Budget(None if m == "reference" else args.method_cap) for m in workers}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}

    def report() -> None:
        if progress is not None:
            progress(summarize(task, {m: results.get(m, {"status": "pending"}) for m in methods},
                               runs, args))

    killed: set[str] = set()
    for method, handle in workers.items():  # setup and warm-up, each in turn
        try:
            results[method] = handle.receive(budgets[method].left())
        except OverCap:
            results[method] = over_cap(args.method_cap, "the setup and warm-up")
            killed.add(method)
            continue
    report()
    for number in range(1, args.rounds + 1):
        for method, handle in workers.items():
            if results[method]["status"] != "ready" or method in killed:
                continue
            if not budgets[method].allows_round():
                results[method].setdefault(
                    "cap_note", f"round {number} not started: it would pass --method-cap")
                continue
            handle.send("run")
            start = time.perf_counter()
            try:
                message = handle.receive(budgets[method].left())
            except OverCap:
                killed.add(method)
                if runs[method]:
                    results[method]["cap_note"] = f"round {number} killed at --method-cap"
                else:
                    results[method] = over_cap(args.method_cap, f"round {number}")
                continue
            budgets[method].spend(time.perf_counter() - start)
            if message["status"] == "ok":
                runs[method].append(message)
                print(f"  {task['name']} {method}: round {number} "
                      f"{sum(message['stages'].values()):.2f} s", flush=True)
            else:  # a failed run is the method's result, whatever ran before
                results[method] = message
        report()
    for method, handle in workers.items():
        closing = handle.close()
        if closing.pop("status", None) == "done" and method not in killed:
            results[method].update(closing)
    entry = summarize(task, results, runs, args)
    if progress is not None:
        progress(entry)
    return entry


def summarize(task: dict[str, Any], results: dict[str, dict[str, Any]],
              runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """The task's entry from the workers' messages and finished runs so far (median seconds
    per stage, comparison with the reference, agreement of the K-FAC variants)."""
    exact = torch.tensor(runs["reference"][0]["scores"] if runs["reference"] else [],
                         dtype=torch.float64)
    n = args.n_train
    methods: dict[str, dict[str, Any]] = {}
    scores: dict[str, torch.Tensor] = {}
    for method, message in results.items():
        result = dict(message)
        methods[method] = result
        if not runs[method] or result["status"] not in ("ready", "ok"):
            continue
        stages = {stage: statistics.median(r["stages"][stage] for r in runs[method])
                  for stage in runs[method][0]["stages"]}
        stages["total"] = statistics.median(sum(r["stages"].values()) for r in runs[method])
        scores[method] = torch.tensor(runs[method][0]["scores"], dtype=torch.float64)
        result.update(status="ok", seconds=stages, samples_per_second=n / stages["total"],
                      rounds=len(runs[method]), runs=[r["stages"] for r in runs[method]])
        if runs[method][-1].get("notes"):  # how fastinfluence ran (its report)
            result["notes"] = runs[method][-1]["notes"]
        if "peak_rss_mib" in result and "baseline_rss_mib" in result:
            result["peak_over_baseline_mib"] = result["peak_rss_mib"] - result["baseline_rss_mib"]
        if len(exact):
            result.update(compare(scores[method], exact))
    agreement = {f"{ours} vs {peer}": pearson(scores[ours], scores[peer])
                 for strategy in ("kfac", "ekfac")
                 for ours, peer in [(f"fastinfluence-{strategy}", f"kronfluence-{strategy}")]
                 if ours in scores and peer in scores}
    return {"task": task, "methods": methods, "agreement": agreement}


def targets(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios within this run."""
    rows = []
    for entry in tasks:
        name, methods = entry["task"]["name"], entry["methods"]
        ok = {m: r for m, r in methods.items() if r.get("status") == "ok" and "pearson" in r}
        fi = {m: r for m, r in ok.items() if m.startswith("fastinfluence")}
        peers = {m: r for m, r in ok.items() if m in PEER_METHODS}
        if entry["task"]["params"] == "last":
            exact = {m: r for m, r in peers.items() if r["pearson"] >= EXACT_PEARSON}
            row: dict[str, Any] = {"task": name, "target": f"≥ {LAST_SPEEDUP_TARGET:g}× faster "
                                   f"than the fastest exact peer (Pearson ≥ {EXACT_PEARSON})"}
            if "fastinfluence" not in fi or not exact:
                row.update(met=None, note="no exact peer ran" if not exact else "fastinfluence "
                           "did not run")
            else:
                fastest = min(exact, key=lambda m: exact[m]["seconds"]["total"])
                ratio = exact[fastest]["seconds"]["total"] / fi["fastinfluence"]["seconds"]["total"]
                row.update(fastest_exact_peer=fastest, speedup=ratio,
                           met=ratio >= LAST_SPEEDUP_TARGET)
            rows.append(row)
            continue
        per_peer = {}
        for peer, r in peers.items():
            dominating = [m for m, f in fi.items()
                          if f["seconds"]["total"] <= r["seconds"]["total"]
                          and f["pearson"] >= r["pearson"]]
            per_peer[peer] = dominating
        rows.append({"task": name, "target": "for every peer, a fastinfluence variant at most "
                     "as slow and at least as accurate (Pearson)",
                     "dominated_by": per_peer,
                     "met": all(per_peer.values()) if per_peer else None})
    return rows


def load_average() -> list[float]:
    return list(os.getloadavg())


def markdown(report: dict[str, Any]) -> str:
    lines = ["| task | method | seconds (fit + scoring) | samples/s | Pearson | Spearman | "
             "peak RSS MiB (over baseline) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for entry in report["tasks"]:
        for method, r in entry["methods"].items():
            if r.get("status") != "ok":
                lines.append(f"| {entry['task']['name']} | {method} | {r.get('status')}: "
                             f"{r.get('reason', '')} | | | | |")
                continue
            s = r["seconds"]
            stages = (f" ({s['fit']:.2f} + {s['scoring']:.2f})" if "fit" in s else "")
            if r["rounds"] < report["config"]["rounds"]:
                stages += f", {r['rounds']} round{'s' if r['rounds'] > 1 else ''}"
            peak = (f"{r['peak_rss_mib']:.0f} (+{r['peak_over_baseline_mib']:.0f})"
                    if "peak_over_baseline_mib" in r else "-")
            lines.append(f"| {entry['task']['name']} | {method} | {s['total']:.2f}{stages} | "
                         f"{r['samples_per_second']:,.1f} | {r.get('pearson', float('nan')):.4f} "
                         f"| {r.get('spearman', float('nan')):.4f} | {peak} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>pP*Xh"
    methods = sorted({m for e in report["tasks"] for m in e["methods"] if m != "reference"})
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    figure, axes = plt.subplots(figsize=(11, 6))
    points = 0
    for t, entry in enumerate(report["tasks"]):
        for method, r in entry["methods"].items():
            if method == "reference" or "pearson" not in r:
                continue
            points += 1
            axes.scatter(r["seconds"]["total"], r["pearson"], color=colors[method],
                         marker=markers[t % len(markers)], s=60,
                         edgecolors="black" if method.startswith("fastinfluence") else "none")
    for method in methods:
        axes.scatter([], [], color=colors[method], marker="o", label=method)
    for t, entry in enumerate(report["tasks"]):
        axes.scatter([], [], color="gray", marker=markers[t % len(markers)],
                     label=entry["task"]["name"])
    if points:  # a partial report may have none yet, and an empty axis cannot be log-scaled
        axes.set_xscale("log")
    axes.set_xlabel("seconds, end to end (log)")
    axes.set_ylabel("Pearson with the exact float64 scores")
    axes.set_title(f"influence scores: time vs accuracy (n_train={report['config']['n_train']}, "
                   f"{report['config']['threads']} threads)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # clear of points
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return {}
    if args.summary is not None:
        report = json.loads(args.summary.read_text())
        print(summary_text(report))
        plot(report, args.summary.with_suffix(".png"))
        return report
    load_start = load_average()
    logs = Path(tempfile.mkdtemp(prefix="bench_peers_logs_"))
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    over_cap_at: dict[tuple[str, str, str], dict[str, Any]] = {}  # (model, params, method)

    def write(current: dict[str, Any] | None = None, complete: bool = False) -> dict[str, Any]:
        tasks = entries if current is None else [*entries, current]
        report = {
            "config": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                   if k != "worker"},
                "argv": argv,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "peers": {lib: importlib.util.find_spec(lib) is not None
                          for lib in PEER_MODULES},
                "reference": "float64 Gauss-Newton, exact: Cholesky (p ≤ n·C) or Woodbury",
                "memory": "worker max RSS (getrusage), MiB; baseline = after building the "
                          "problem",
                "load_average_start": load_start,
                "load_average_end": load_average(),
                "wall_seconds": time.perf_counter() - started,
                "worker_logs": str(logs),
                "complete": complete,
            },
            "tasks": tasks,
            "targets": targets(tasks),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        plot(report, args.plot)
        return report

    for task in tasks_of(args):
        print(f"{task['name']} ...", flush=True)
        skip = {}
        for method in methods_of(task, args):
            earlier = over_cap_at.get((task["model"], task["params"], method))
            if earlier is not None and earlier["size"] < task["size"]:
                skip[method] = f"over cap: not started, as it was over cap on {earlier['name']}"
        entry = bench_task(task, args, argv, logs, skip, progress=write)
        for method, result in entry["methods"].items():
            if result.get("reason", "").startswith("over cap"):
                over_cap_at.setdefault((task["model"], task["params"], method), task)
        entries.append(entry)
    report = write(complete=True)
    print(summary_text(report))
    print(f"wrote {args.out} and {args.plot}")
    return report


def kronecker_ratios(entry: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Ours over Kronfluence's, for each K-FAC variant both ran on a task (same run, in
    turns): median seconds (fit, scoring, total) and peak RSS (whole, and over the worker's
    baseline)."""
    ratios = {}
    for pair in entry["agreement"]:
        ours, peer = (entry["methods"][name] for name in pair.split(" vs "))
        ratio = {f"{stage} seconds": ours["seconds"][stage] / peer["seconds"][stage]
                 for stage in ("fit", "scoring", "total")}
        ratio["peak RSS"] = ours["peak_rss_mib"] / peer["peak_rss_mib"]
        ratio["peak RSS over baseline"] = (ours["peak_over_baseline_mib"]
                                           / max(peer["peak_over_baseline_mib"], 1.0))
        ratios[pair.replace(" vs ", " / ")] = ratio
    return ratios


def summary_text(report: dict[str, Any]) -> str:
    """The table (:func:`markdown`), the K-FAC agreement and the targets of a report."""
    config = report["config"]
    lines = [f"`{' '.join(['python benchmarks/bench_peers.py', *config['argv']])}`: "
             f"{config['wall_seconds'] / 60:.0f} min wall, load average "
             f"{config['load_average_start'][0]:.1f} at the start, "
             f"{config['load_average_end'][0]:.1f} at the end"
             f"{'' if config['complete'] else ' (interrupted: config.complete is false)'}",
             "", markdown(report), ""]
    for entry in report["tasks"]:
        for pair, value in entry["agreement"].items():
            lines.append(f"- {entry['task']['name']}: Pearson {pair} = {value:.4f}")
        lines += [f"- {entry['task']['name']}: {pair}: " + ", ".join(
            f"{what} {value:.2f}x" for what, value in ratios.items())
            for pair, ratios in kronecker_ratios(entry).items()]
    for row in report["targets"]:
        if "speedup" in row:
            verdict = (f"{row['speedup']:.1f}x the fastest exact peer "
                       f"({row['fastest_exact_peer']})")
        elif "dominated_by" in row:
            verdict = "; ".join(f"{peer} by {', '.join(by) or 'none'}"
                                for peer, by in row["dominated_by"].items())
        else:
            verdict = row.get("note", "")
        lines.append(f"- target {row['task']}: {'met' if row['met'] else 'not met'}"
                     f"{'' if row['met'] is not None else ' (undecided)'}: {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
