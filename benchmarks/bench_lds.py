"""Linear datamodeling score (LDS) of fastinfluence's attributions, and of Kronfluence's.

**The metric** (Park et al. 2023, TRAK; dattri's ``dattri.metric.lds``). Draw ``M`` random
subsets ``S_1 … S_M`` of ``α·n`` training samples (seeded, ``α = 1/2``), retrain one model on
each (seeded), and record its target ``f_q(S_m)`` on every query ``q``. A method gives scores
``τ`` of shape ``[n_train, n_query]``; its prediction for subset ``m`` is ``Σ_{i∈S_m} τ_iq``.
The LDS of query ``q`` is the Spearman rank correlation over the ``M`` subsets between the
predictions and the targets; the LDS of a method is its mean over queries, with a 95 %
percentile-bootstrap interval over queries (queries whose targets or predictions are constant
have no rank correlation and are left out, counted in ``queries``).

**Sign.** fastinfluence's ``Influence.pairwise`` gives ``I(z_i, z_q) = −∇l_qᵀ H_λ^{-1} ∇l_i``:
*positive = harmful*, the first-order rise of ``l_q`` when ``z_i`` is up-weighted. Training on
``S`` instead of all ``n`` samples changes the query loss by about ``−(1/n) Σ_{i∉S} I_iq =
(1/n) Σ_{i∈S} I_iq − const``, so with the query **loss** as target (the default) ``τ = I``
itself, and a good method has LDS near +1. With the **margin** target
``log p_y − log(1 − p_y)`` (TRAK's multi-class margin), which rises as the loss falls,
``τ = −I``. The margin is a strictly decreasing function of the loss ``−log p_y`` of the same
model, so both targets give the same LDS up to ties; the option is there for comparison with
papers that report it.

**Tasks** (data offline, float64, 1 thread, every training run deterministic):

* ``digits-logreg``: sklearn's 8×8 digits (standardised), multinomial logistic regression
  ``nn.Linear(64, 10)`` trained from zero by full-batch L-BFGS on the mean cross-entropy plus
  ``(wd/2)‖θ‖²``. Convex: the retrained models are the unique optima, and fastinfluence with
  ``damping = wd`` uses the exact Hessian of the training objective. Also reports the
  leave-one-out correlation: ``--loo`` random training samples are each removed and the model
  retrained (warm-started at the full optimum); the actual change of every query loss is
  compared with the prediction ``−I_iq / n`` (Pearson over the removed samples, mean over
  queries).
* ``digits-mlp``: a 64–``width``–10 tanh MLP, same objective, seeded random initialisation,
  ``--mlp-iters`` L-BFGS iterations from it (the retrained model ``m`` uses seed ``1000 + m``).

**Methods** (fastinfluence ``params="all"``, every one at each ``--dampings`` value): ``gn``
(exact Gauss-Newton, direct solve), ``exact`` (exact Hessian, direct solve; where ``H + λI``
is not positive definite the method is reported as failed), ``kfac``, ``ekfac``; ``last``
(``params="last"``: the MLP's output layer in closed form, the library's defaults); ``ensK``
variants average a method's scores over ``K`` models trained with seeds ``0 … K−1`` (the MLP);
``kronfluence-ekfac`` and ``kronfluence-kfac`` where Kronfluence imports (run on a float32 copy
of the model, its sign converted as in ``bench_peers.py``); ``trak`` where ``traker`` imports
(CPU Gaussian projector to ``--trak-proj-dim``, its ``lambda_reg`` swept over
``--trak-lambdas``, its own ensembles over the same ``K`` models; its score, positive for a
sample that raises the query's margin, negated). Seconds are the method's wall time (fit +
pairwise scores, training of ensemble members excluded), 1 thread.

**Cache.** Retrained targets go to ``--cache`` (one ``.npz`` per task, named by a hash of the
settings that determine them, rewritten after every model): a stopped run resumes where it
stopped, and methods are added later without retraining. Writes JSON to ``--out`` and a plot
(LDS against seconds) to ``--plot``::

    python benchmarks/bench_lds.py                          # both tasks, 100 subsets
    python benchmarks/bench_lds.py --summary benchmarks/results/lds_cpu.json  # its table
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

import fastinfluence

HERE = Path(__file__).resolve().parent
TASKS = ("digits-logreg", "digits-mlp")
BASE_METHODS = ("gn", "exact", "kfac", "ekfac", "last")
PEER_METHODS = ("kronfluence-ekfac", "kronfluence-kfac", "trak")
PEER_MODULES = {"kronfluence-ekfac": "kronfluence", "kronfluence-kfac": "kronfluence",
                "trak": "trak"}
TRAK_BLOCK = 100
"""traker's ``BasicProjector`` block size: a projection of at most one block fails at scoring."""
Data = tuple[torch.Tensor, torch.Tensor]


# -- the metric -------------------------------------------------------------------------------

def subset_predictions(scores: torch.Tensor, subsets: np.ndarray) -> np.ndarray:
    """``Σ_{i∈S_m} τ_iq`` for every subset ``m`` and query ``q``: ``[M, n_query]``."""
    tau = scores.detach().double().cpu().numpy()
    return np.stack([tau[rows].sum(axis=0) for rows in subsets])


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (``[M, q]``
    each): Pearson of the average ranks; NaN where a column is constant."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    norms = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (ra * rb).sum(axis=0) / np.where(norms > 0, norms, 1), np.nan)


def lds_per_query(scores: torch.Tensor, subsets: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """LDS of each query: Spearman over subsets of ``Σ_{i∈S_m} τ_iq`` against
    ``targets[m, q]``; ``scores`` is ``[n_train, n_query]``, ``subsets`` ``[M, |S|]``."""
    if scores.ndim != 2 or scores.shape[1] != targets.shape[1]:
        raise ValueError(f"scores must be [n_train, {targets.shape[1]}], got "
                         f"{tuple(scores.shape)}")
    if subsets.shape[0] != targets.shape[0]:
        raise ValueError(f"subsets has {subsets.shape[0]} rows, targets {targets.shape[0]}")
    return spearman_columns(subset_predictions(scores, subsets), targets)


def bootstrap_mean(values: np.ndarray, seed: int = 0, resamples: int = 2000,
                   level: float = 0.95) -> dict[str, Any]:
    """Mean of the finite ``values`` and its percentile-bootstrap interval (resampling the
    values, i.e. the queries, with replacement)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"lds": None, "ci": [None, None], "queries": 0}
    draws = np.random.default_rng(seed).integers(0, finite.size, (resamples, finite.size))
    means = finite[draws].mean(axis=1)
    tail = (1 - level) / 2
    return {"lds": float(finite.mean()),
            "ci": [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))],
            "queries": int(finite.size)}


def random_subsets(n: int, count: int, alpha: float, seed: int) -> np.ndarray:
    """``count`` sorted random subsets of ``round(α n)`` of ``range(n)``: ``[count, ⌊αn⌉]``."""
    rng = np.random.default_rng(seed)
    size = round(alpha * n)
    return np.stack([np.sort(rng.choice(n, size, replace=False)) for _ in range(count)])


# -- tasks: data, models, deterministic training ------------------------------------------

def digits_data(n_train: int, n_query: int, seed: int) -> tuple[Data, Data]:
    """sklearn's digits, standardised with the training split's statistics, float64: a seeded
    permutation gives ``n_train`` training and ``n_query`` query samples (disjoint)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    if n_train + n_query > len(y):
        raise ValueError(f"n_train + n_query must be <= {len(y)}, got {n_train + n_query}")
    order = np.random.default_rng(seed).permutation(len(y))
    train, query = order[:n_train], order[n_train:n_train + n_query]
    mean, std = X[train].mean(axis=0), X[train].std(axis=0) + 1e-3  # constant border pixels

    def tensors(rows: np.ndarray) -> Data:
        return (torch.tensor((X[rows] - mean) / std, dtype=torch.float64),
                torch.tensor(y[rows], dtype=torch.long))

    return tensors(train), tensors(query)


def make_model(task: str, seed: int, width: int) -> nn.Module:
    """The task's model in float64; the logistic regression starts at zero (convex: its
    optimum does not depend on the start), the MLP at a seeded random initialisation."""
    torch.manual_seed(seed)
    if task == "digits-logreg":
        model = nn.Linear(64, 10)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
    else:
        model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))
    return model.double()


def fit(model: nn.Module, data: Data, wd: float, max_iter: int, tolerance: float) -> nn.Module:
    """Full-batch L-BFGS (strong Wolfe) on ``mean CE + (wd/2)‖θ‖²``; deterministic on one
    thread, so the same start and data give the same model."""
    X, y = data
    params = list(model.parameters())
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=0,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(X), y) + wd / 2 * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model.eval()


def train_model(task: str, data: Data, seed: int, args: argparse.Namespace,
                start: nn.Module | None = None) -> nn.Module:
    """The task's model trained on ``data`` from ``make_model(task, seed)`` (or a copy of
    ``start``): the logistic regression to convergence, the MLP for ``--mlp-iters``."""
    model = copy.deepcopy(start) if start is not None else make_model(task, seed, args.width)
    if task == "digits-logreg":
        return fit(model, data, args.wd, max_iter=1000, tolerance=1e-10)
    return fit(model, data, args.wd, max_iter=args.mlp_iters, tolerance=1e-12)


def query_targets(model: nn.Module, query: Data) -> dict[str, np.ndarray]:
    """Per query: the cross-entropy loss ``−log p_y`` and the margin ``log p_y − log(1−p_y)``."""
    with torch.no_grad():
        logits = model(query[0])
        log_p = torch.log_softmax(logits, dim=1).gather(1, query[1][:, None])[:, 0]
        margin = log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-16))
    return {"loss": (-log_p).numpy(), "margin": margin.numpy()}


# -- the retraining cache ---------------------------------------------------------------

def cache_settings(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the retrained targets depend on (the cache's key)."""
    settings = {"task": task, "n_train": args.n_train, "n_query": args.n_query,
                "subsets": args.subsets, "alpha": args.alpha, "seed": args.seed, "wd": args.wd,
                "torch": torch.__version__.split("+")[0]}
    if task == "digits-mlp":
        settings.update(width=args.width, mlp_iters=args.mlp_iters)
    return settings


def cache_path(directory: Path, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return directory / f"{settings['task']}-{digest}.npz"


def retrained_targets(task: str, train: Data, query: Data, subsets: np.ndarray,
                      args: argparse.Namespace,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Targets of the models retrained on each subset, ``{"loss", "margin"}: [M, n_query]``,
    read from and written to the cache (after every model: a stopped run resumes)."""
    settings = cache_settings(task, args)
    path = cache_path(args.cache, settings)
    count, n_query = len(subsets), len(query[1])
    state = {"loss": np.full((count, n_query), np.nan), "margin": np.full((count, n_query), np.nan),
             "done": np.zeros(count, bool), "seconds": np.zeros(count)}
    if path.exists():
        with np.load(path) as saved:
            if json.loads(str(saved["settings"])) != settings or not np.array_equal(
                    saved["subsets"], subsets):
                raise ValueError(f"{path}: cached under other settings; remove it or change "
                                 "--cache")
            state = {key: saved[key].copy() for key in state}
    todo = np.flatnonzero(~state["done"])
    if todo.size:
        log(f"{task}: retraining {todo.size} of {count} models ({count - todo.size} cached)")
    for m in todo:
        start = time.perf_counter()
        rows = torch.from_numpy(subsets[m])
        model = train_model(task, (train[0][rows], train[1][rows]), 1000 + int(m), args)
        for key, values in query_targets(model, query).items():
            state[key][m] = values
        state["done"][m], state["seconds"][m] = True, time.perf_counter() - start
        args.cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(partial, settings=json.dumps(settings), subsets=subsets, **state)
        os.replace(partial, path)
    return {"loss": state["loss"], "margin": state["margin"],
            "seconds": float(state["seconds"].sum()), "cache": path.name, "retrained": todo.size}


# -- methods ------------------------------------------------------------------------------

def fastinfluence_scores(model: nn.Module, train: Data, query: Data, method: str,
                         damping: float) -> torch.Tensor:
    """``Influence.pairwise``: ``[n_train, n_query]``, positive harmful; over all parameters,
    or for ``"last"`` over the last Linear layer (its closed form, the library's defaults)."""
    options: dict[str, Any] = {"gn": dict(hessian="gauss-newton", solver="direct"),
                               "exact": dict(hessian="exact", solver="direct"),
                               "kfac": dict(hessian="kfac"),
                               "ekfac": dict(hessian="ekfac"),
                               "last": {}}[method]
    influence = fastinfluence.Influence(model, train, query,
                                        params="last" if method == "last" else "all",
                                        damping=damping, **options)
    return influence.pairwise(query)


def kronfluence_scores(model: nn.Module, train: Data, query: Data, strategy: str,
                       damping: float) -> torch.Tensor:
    """Kronfluence's pairwise scores in fastinfluence's sign: its score is
    ``+∇l_qᵀ F_λ^{-1} ∇l_i`` (mean-loss factors, additive damping), so ``I = −score``."""
    from bench_peers import kronfluence_classification_task
    from kronfluence.analyzer import Analyzer, prepare_model

    torch.manual_seed(0)  # the sampled labels of its Fisher: the same on every run
    single = copy.deepcopy(model).float()
    if isinstance(single, nn.Linear):  # Kronfluence tracks modules inside a model
        single = nn.Sequential(single)
    task = kronfluence_classification_task()
    prepared = prepare_model(single, task)
    with tempfile.TemporaryDirectory() as workdir:  # Kronfluence writes factors and scores
        analyzer = Analyzer(analysis_name="lds", model=prepared, task=task, cpu=True,
                            disable_tqdm=True, disable_model_save=True, output_dir=workdir)
        return _kronfluence_pairwise(analyzer, train, query, strategy, damping)


def _kronfluence_pairwise(analyzer: Any, train: Data, query: Data, strategy: str,
                          damping: float) -> torch.Tensor:
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    train_set = TensorDataset(train[0].float(), train[1])
    query_set = TensorDataset(query[0].float(), query[1])
    analyzer.fit_all_factors(factors_name=strategy, dataset=train_set, per_device_batch_size=256,
                             factor_args=FactorArguments(strategy=strategy),
                             overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        scores_name=strategy, factors_name=strategy, query_dataset=query_set,
        train_dataset=train_set, per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=256, score_args=ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True)
    raw = analyzer.load_pairwise_scores(strategy)["all_modules"]  # [n_query, n_train]
    return -raw.T.double()


def trak_scores(models: list[nn.Module], train: Data, query: Data, proj_dim: int,
                lambda_reg: float, seconds: dict[str, float] | None = None) -> torch.Tensor:
    """TRAK's scores over its own ensemble ``models`` (one ``load_checkpoint`` each, CPU
    Gaussian projector to ``proj_dim``, float32, ``lambda_reg`` added to its ``ΦᵀΦ``), in
    fastinfluence's sign:
    TRAK's target is the query's margin and its score is positive for a sample that raises it,
    so ``I = −score`` predicts the query loss. ``seconds`` (when given) receives the wall time
    of its two stages, ``features`` (featurize, finalize) and ``scoring``."""
    from trak import TRAKer

    copies = [copy.deepcopy(model).float().eval() for model in models]
    train_x, query_x = train[0].float(), query[0].float()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        traker = TRAKer(model=copies[0], task="image_classification",
                        train_set_size=len(train[1]), save_dir=workdir, device="cpu",
                        proj_dim=proj_dim, use_half_precision=False, projector_seed=0,
                        lambda_reg=lambda_reg, logging_level=logging.ERROR)
        for k, model in enumerate(copies):
            traker.load_checkpoint(model.state_dict(), model_id=k)
            for rows in torch.arange(len(train[1])).split(256):
                traker.featurize(batch=(train_x[rows], train[1][rows]), num_samples=len(rows))
        traker.finalize_features()
        middle = time.perf_counter()
        for k, model in enumerate(copies):
            traker.start_scoring_checkpoint(exp_name="lds", checkpoint=model.state_dict(),
                                            model_id=k, num_targets=len(query[1]))
            traker.score(batch=(query_x, query[1]), num_samples=len(query[1]))
        scores = traker.finalize_scores(exp_name="lds")  # [n_train, n_query]
        if seconds is not None:
            seconds.update(features=middle - start, scoring=time.perf_counter() - middle)
    return -torch.as_tensor(np.asarray(scores), dtype=torch.float64)


def method_names(task: str, args: argparse.Namespace) -> list[tuple[str, str, float, int]]:
    """``(name, method, damping, K)`` for every method run on ``task`` (TRAK's "damping" is
    its ``lambda_reg``, from ``--trak-lambdas``; it runs with its own ensembles, every
    ``--ensembles`` size, on the MLP)."""
    runs = []
    ensembles = [1] if task == "digits-logreg" else args.ensembles  # convex: one optimum
    for method in args.methods:
        if method == "last" and task == "digits-logreg":
            continue  # the logistic regression is one Linear layer: "last" is "all"
        for damping in args.trak_lambdas if method == "trak" else args.dampings:
            for k in ensembles:
                if k > 1 and method not in (*args.ensemble_methods, "trak"):
                    continue
                suffix = f"-ens{k}" if k > 1 else ""
                runs.append((f"{method}{suffix}@{damping:g}", method, damping, k))
    return runs


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    """Whether ``module`` imports (a peer that does not is reported as not installed)."""
    try:
        __import__(module)
    except Exception:  # any import failure: the peer is reported as not installed
        return False
    return True


# -- leave-one-out (convex task) --------------------------------------------------------------

def leave_one_out(task: str, model: nn.Module, train: Data, query: Data,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Actual change of every query loss when each of ``--loo`` random training samples is
    removed and the model retrained from the full optimum: ``{"removed", "delta": [k, q]}``."""
    removed = np.sort(np.random.default_rng(args.seed + 1).choice(len(train[1]), args.loo,
                                                                    replace=False))
    base = query_targets(model, query)["loss"]
    delta, start = [], time.perf_counter()
    for i in removed:
        keep = torch.from_numpy(np.delete(np.arange(len(train[1])), i))
        retrained = train_model(task, (train[0][keep], train[1][keep]), 0, args, start=model)
        delta.append(query_targets(retrained, query)["loss"] - base)
    return {"removed": removed, "delta": np.stack(delta),
            "seconds": time.perf_counter() - start}


def loo_correlation(scores: torch.Tensor, loo: dict[str, Any], n: int) -> dict[str, float]:
    """Pearson, per query over the removed samples, between the actual loss change and the
    prediction ``−I_iq / n``; mean over queries, and over all (sample, query) pairs."""
    predicted = -scores.detach().double().numpy()[loo["removed"]] / n
    actual = loo["delta"]
    a, b = predicted - predicted.mean(0), actual - actual.mean(0)
    per_query = (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return {"pearson_mean_over_queries": float(np.nanmean(per_query)),
            "pearson_all_pairs": float(np.corrcoef(predicted.ravel(), actual.ravel())[0, 1])}


# -- the run ----------------------------------------------------------------------------------

def bench_task(task: str, args: argparse.Namespace, log: Callable[[str], None],
               save: Callable[[], None], result: dict[str, Any]) -> None:
    train, query = digits_data(args.n_train, args.n_query, args.seed)
    subsets = random_subsets(args.n_train, args.subsets, args.alpha, args.seed)
    targets = retrained_targets(task, train, query, subsets, args, log)
    sign = 1.0 if args.target == "loss" else -1.0
    start = time.perf_counter()
    members = [train_model(task, train, seed, args)
               for seed in range(max(args.ensembles) if task == "digits-mlp" else 1)]
    entry: dict[str, Any] = {
        "n_train": args.n_train, "n_query": args.n_query, "subsets": args.subsets,
        "parameters": sum(p.numel() for p in members[0].parameters()),
        "retrain_seconds": targets["seconds"], "cache": targets["cache"],
        "retrained_now": int(targets["retrained"]),
        "train_seconds": time.perf_counter() - start, "methods": {}}
    result[task] = entry
    loo = (leave_one_out(task, members[0], train, query, args)
           if task == "digits-logreg" and args.loo else None)
    if loo is not None:
        entry["loo"] = {"removed": len(loo["removed"]), "seconds": loo["seconds"]}
    for name, method, damping, k in method_names(task, args):
        if method in PEER_MODULES and not importable(PEER_MODULES[method]):
            entry["methods"][name] = {"error": f"{PEER_MODULES[method]} is not installed"}
            continue
        try:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if method == "trak":
                    scores = trak_scores(members[:k], train, query, args.trak_proj_dim, damping)
                else:
                    scores = torch.stack([
                        kronfluence_scores(model, train, query, method.split("-")[1], damping)
                        if method in PEER_MODULES else
                        fastinfluence_scores(model, train, query, method, damping)
                        for model in members[:k]]).mean(0)
            seconds = time.perf_counter() - start
        except Exception as error:  # reported, never dropped (e.g. an indefinite H + λI)
            entry["methods"][name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            log(f"{task} {name}: {entry['methods'][name]['error']}")
            continue
        summary = bootstrap_mean(lds_per_query(sign * scores, subsets, targets[args.target]),
                                 seed=args.seed)
        summary.update(method=method, damping=damping, ensemble=k, seconds=seconds,
                       warnings=sorted({f"{w.category.__name__}: {w.message}"[:200]
                                        for w in caught}))
        if loo is not None:
            summary["loo"] = loo_correlation(scores, loo, args.n_train)
        entry["methods"][name] = summary
        log(f"{task} {name}: LDS {summary['lds']:.3f} [{summary['ci'][0]:.3f}, "
            f"{summary['ci'][1]:.3f}], {seconds:.2f} s")
        save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=100, help="M, retrained models")
    parser.add_argument("--alpha", type=float, default=0.5, help="subset fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wd", type=float, default=1e-3, help="L2 weight in training")
    parser.add_argument("--width", type=int, default=32, help="MLP hidden width")
    parser.add_argument("--mlp-iters", type=int, default=200, help="L-BFGS iterations, MLP")
    parser.add_argument("--target", choices=["loss", "margin"], default="loss")
    parser.add_argument("--methods", nargs="+", choices=BASE_METHODS + PEER_METHODS,
                        default=list(BASE_METHODS + PEER_METHODS))
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--ensembles", type=int, nargs="+", default=[1, 5],
                        help="K models averaged (MLP)")
    parser.add_argument("--ensemble-methods", nargs="+", default=["gn", "ekfac"])
    parser.add_argument("--trak-proj-dim", type=int, default=512,
                        help="TRAK's projection dimension (below n_train)")
    parser.add_argument("--trak-lambdas", type=float, nargs="+", default=[0, 1, 10, 100, 1000],
                        help="TRAK's lambda_reg sweep (its own scale: added to the Gram "
                             "matrix of its summed, 1/sqrt(p)-scaled features)")
    parser.add_argument("--loo", type=int, default=50,
                        help="removed samples for leave-one-out (logistic regression; 0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "lds_cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lds_cpu.json")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "lds_cpu.png")
    parser.add_argument("--summary", type=Path, default=None, metavar="JSON",
                        help="run nothing: print the markdown table of a saved report (the "
                             "docs page's table) and redraw its plot (the JSON's name, .png)")
    args = parser.parse_args(argv)
    for name in ("n_train", "n_query", "subsets", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.alpha < 1:
        parser.error("--alpha must be in (0, 1)")
    if args.trak_proj_dim <= TRAK_BLOCK:
        parser.error(f"--trak-proj-dim must be above {TRAK_BLOCK}: traker 0.3.2's CPU projector "
                     "frees its matrix after featurizing when it is one block, and scoring "
                     "then fails")
    if any(k < 1 for k in args.ensembles):
        parser.error("--ensembles must be >= 1")
    return args


def table(report: dict[str, Any]) -> str:
    """The markdown table of a report: one row per task and method, best LDS first."""
    lines = ["| task | method | damping | K | LDS | 95 % interval | seconds | LOO Pearson |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for task, entry in report["tasks"].items():
        rows = sorted(entry["methods"].items(),
                      key=lambda item: -(item[1].get("lds") if item[1].get("lds") is not None
                                         else -math.inf))
        for name, row in rows:
            method = name.split("@")[0]
            if "error" in row:
                reason = row["error"].splitlines()[0].split(" (")[0]  # details: in the JSON
                lines.append(f"| {task} | {method} | {name.split('@')[1]} | | failed: {reason} "
                             "| | | |")
                continue
            loo = row.get("loo", {}).get("pearson_mean_over_queries")
            lines.append(f"| {task} | {row['method']} | {row['damping']:g} | {row['ensemble']} "
                         f"| {row['lds']:.3f} | [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] "
                         f"| {row['seconds']:.2f} | {'' if loo is None else f'{loo:.3f}'} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """LDS against seconds (log-x), one panel per task: one colour per method (and ensemble
    size), its dampings joined by a line and labelled, 95 % intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        families: dict[str, list[dict[str, Any]]] = {}
        for name, row in report["tasks"][task]["methods"].items():
            if row.get("lds") is not None:
                families.setdefault(name.split("@")[0], []).append(row)
        for family, rows in families.items():
            rows.sort(key=lambda row: row["damping"])
            seconds = [row["seconds"] for row in rows]
            lds = [row["lds"] for row in rows]
            errors = [[row["lds"] - row["ci"][0] for row in rows],
                      [row["ci"][1] - row["lds"] for row in rows]]
            axis.errorbar(seconds, lds, yerr=errors, capsize=2, label=family, alpha=0.8,
                          marker="o" if family.split("-")[0] in BASE_METHODS else "s")
            for row in rows:
                axis.annotate(f"{row['damping']:g}", (row["seconds"], row["lds"]), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
        axis.set(xscale="log", xlabel="seconds (1 thread)", ylabel="LDS (Spearman, mean)",
                 title=f"{task} (labels: damping)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.summary is not None:
        saved = json.loads(args.summary.read_text())
        print(table(saved))
        plot(saved, args.summary.with_suffix(".png"))
        return saved
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "config": {"argv": list(argv) if argv is not None else sys.argv[1:],
                   "date": datetime.date.today().isoformat(), "target": args.target,
                   "threads": args.threads, "torch": torch.__version__,
                   "python": platform.python_version(), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "complete": False,
                   "peers": {name: installed_version(name)
                             for name in ("kronfluence", "traker", "dattri")}},
        "tasks": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    for task in args.tasks:
        bench_task(task, args, lambda line: print(line, flush=True), save, report["tasks"])
    report["config"]["complete"] = True
    save()
    plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
