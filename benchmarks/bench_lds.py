"""Linear datamodeling score (LDS) of fastinfluence's attributions, and of its peers'
(Kronfluence, TRAK, captum, dattri).

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
* ``brain-cnn``: ``fastinfluence.models.PaperCNN`` at 32² (283k parameters, float32) on
  ``fastinfluence.datasets.make_brain_tumour`` (1200 slices of 240 patients, split by patient
  80/20): ``--cnn-n-train`` training slices, ``--n-query`` queries from the held-out patients;
  ``--cnn-epochs`` of Adam (``--cnn-lr``, batches of 32, no weight decay) from a seeded
  initialisation in a seeded order (model ``m``: seed ``1000 + m`` for both).

**Methods** (fastinfluence, every one at each ``--dampings`` value): ``gn`` (exact
Gauss-Newton, direct solve), ``exact`` (exact Hessian, direct solve; where ``H + λI`` is not
positive definite the method is reported as failed; both over at most 20k parameters),
``woodbury`` (exact Gauss-Newton through the Jacobian rows), ``cg`` (Gauss-Newton, CG),
``kfac``, ``ekfac``, ``store`` (``GradientStore`` at each ``--store-k``), all over every
parameter (K-FAC, EK-FAC and the store over the Conv2d/Linear layers where the model has
BatchNorm); ``last`` (``params="last"``: the output layer in closed form). ``ensK`` rows
average a method's scores over the first ``K`` of ``max(--ensembles)`` models trained with
seeds ``0 … K−1`` (MLP, CNN); each model is scored once and its seconds count in every ``K``
that uses it. Peers: ``kronfluence-ekfac`` and ``kronfluence-kfac`` (float32 copy of the
model, its sign converted as in ``bench_peers.py``); ``trak`` (CPU Gaussian projector to each
``--trak-proj-dims`` below the training set size, its ``lambda_reg`` swept over
``--trak-lambdas``, its own ensembles over the same models at the first dimension; its
score, positive for a sample that raises the query's margin, negated); captum's
``ArnoldiInfluenceFunction`` (``hessian_reg`` = damping) and ``TracInCP`` (the CNN's
checkpoints every 5 epochs, the digits models' final one; no damping); dattri's explicit,
CG, DataInf and EK-FAC influence attributors and TracIn (``dattri_scores``). Seconds are the
method's wall time (fit + pairwise scores, training of ensemble members excluded), 1 thread.
``--stop-at`` reports the runs not started by then as not run.

**Cache.** Retrained targets go to ``--cache`` (one ``.npz`` per task, named by a hash of the
settings that determine them, rewritten after every model): a stopped run resumes where it
stopped, and methods are added later without retraining. Writes JSON to ``--out`` and a plot
(LDS against seconds) to ``--plot``::

    python benchmarks/bench_lds.py --tasks digits-logreg digits-mlp   # 100 subsets each
    python benchmarks/bench_lds.py --summary benchmarks/results/lds_cpu.json \
        benchmarks/results/lds_cnn_cpu.json       # the docs page's tables and plot (JSONs
                                                  # of several runs together)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

import fastinfluence

HERE = Path(__file__).resolve().parent
TASKS = ("digits-logreg", "digits-mlp", "brain-cnn")
BASE_METHODS = ("gn", "exact", "woodbury", "cg", "kfac", "ekfac", "store", "last")
DATTRI_METHODS = ("dattri-explicit", "dattri-cg", "dattri-datainf", "dattri-ekfac",
                  "dattri-tracin")
PEER_METHODS = ("kronfluence-ekfac", "kronfluence-kfac", "trak", "captum-arnoldi",
                "captum-tracincp", *DATTRI_METHODS)
PEER_MODULES = {"kronfluence-ekfac": "kronfluence", "kronfluence-kfac": "kronfluence",
                "trak": "trak", "captum-arnoldi": "captum", "captum-tracincp": "captum",
                **{method: "dattri" for method in DATTRI_METHODS}}
UNDAMPED = ("captum-tracincp", "dattri-tracin")
"""Methods without a damping: run once, at "damping" 0."""
DENSE_LIMIT = 20_000
"""Most parameters for the dense direct solves (``gn``, ``exact``): a ``p × p`` matrix."""
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


def brain_data(n_train: int, n_query: int, seed: int) -> tuple[Data, Data]:
    """``fastinfluence.datasets.make_brain_tumour`` at 32² (1200 slices of 240 patients,
    seed 0), split by patient 80/20 (``split_by_patient``, seed 0): ``n_train`` slices of the
    training patients and ``n_query`` of the held-out patients, drawn with ``seed``; float32
    images ``[N, 1, 32, 32]``."""
    from fastinfluence.datasets import make_brain_tumour, split_by_patient

    data = make_brain_tumour(1200, 240, 32, seed=0, progress=False)
    split = split_by_patient(data.patient_ids, data.labels, (0.8, 0.0, 0.2), seed=0)
    if n_train > len(split.train) or n_query > len(split.test):
        raise ValueError(f"brain-cnn has {len(split.train)} training and {len(split.test)} "
                         f"held-out slices, asked for {n_train} and {n_query}")
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(split.train, n_train, replace=False))
    query = np.sort(rng.choice(split.test, n_query, replace=False))
    return ((data.images[train], data.labels[train]), (data.images[query], data.labels[query]))


def task_data(task: str, args: argparse.Namespace) -> tuple[Data, Data]:
    """The task's training and query data."""
    if task == "brain-cnn":
        return brain_data(args.cnn_n_train, args.n_query, args.seed)
    return digits_data(args.n_train, args.n_query, args.seed)


def task_n_train(task: str, args: argparse.Namespace) -> int:
    return args.cnn_n_train if task == "brain-cnn" else args.n_train


def make_model(task: str, seed: int, width: int) -> nn.Module:
    """The task's model, seeded: the logistic regression starts at zero (convex: its optimum
    does not depend on the start), the MLP (float64) and the PaperCNN (float32) at a seeded
    random initialisation."""
    torch.manual_seed(seed)
    if task == "brain-cnn":
        from fastinfluence.models import PaperCNN

        return PaperCNN(image_size=32)
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


def fit_adam(model: nn.Module, data: Data, seed: int, epochs: int, lr: float,
             checkpoints: list[dict[str, torch.Tensor]] | None = None,
             every: int = 5) -> nn.Module:
    """``epochs`` of Adam (``lr``, batches of 32, BatchNorm in training mode) over ``data`` in
    an order drawn from ``seed``; deterministic on one thread. With ``checkpoints``, a copy of
    the state after every ``every``-th epoch and the last is appended (TracInCP's
    checkpoints)."""
    X, y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for rows in torch.randperm(len(y), generator=order).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(X[rows]), y[rows]).backward()
            optimizer.step()
        if checkpoints is not None and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            checkpoints.append(copy.deepcopy(model.state_dict()))
    return model.eval()


def train_model(task: str, data: Data, seed: int, args: argparse.Namespace,
                start: nn.Module | None = None,
                checkpoints: list[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """The task's model trained on ``data`` from ``make_model(task, seed)`` (or a copy of
    ``start``): the logistic regression to convergence, the MLP for ``--mlp-iters``, the CNN
    for ``--cnn-epochs`` of Adam (the data order seeded by ``seed`` too)."""
    model = copy.deepcopy(start) if start is not None else make_model(task, seed, args.width)
    if task == "brain-cnn":
        return fit_adam(model, data, seed, args.cnn_epochs, args.cnn_lr, checkpoints)
    if task == "digits-logreg":
        return fit(model, data, args.wd, max_iter=1000, tolerance=1e-10)
    return fit(model, data, args.wd, max_iter=args.mlp_iters, tolerance=1e-12)


def query_targets(model: nn.Module, query: Data) -> dict[str, np.ndarray]:
    """Per query: the cross-entropy loss ``−log p_y`` and the margin ``log p_y − log(1−p_y)``."""
    with torch.no_grad():
        logits = model(query[0]).double()  # float64 targets for the float32 CNN too
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
    if task == "brain-cnn":
        del settings["wd"]
        settings.update(n_train=args.cnn_n_train, epochs=args.cnn_epochs, lr=args.cnn_lr)
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

def kronecker_params(model: nn.Module) -> str | list[str]:
    """``"all"``, or where the model holds BatchNorm (the CNN) the names of its Conv2d and
    Linear modules: K-FAC, EK-FAC and the gradient store factor those layers only and refuse
    other parameters (as Kronfluence tracks only those layers)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "all"
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def fastinfluence_scores(model: nn.Module, train: Data, query: Data, method: str,
                         damping: float, option: int | None = None,
                         store_dir: Path | None = None) -> torch.Tensor:
    """``Influence.pairwise`` (``GradientStore.pairwise`` for ``"store"``, ``k = option``,
    built in ``store_dir``): ``[n_train,
    n_query]``, positive harmful; over all parameters (the Kronecker layers for ``kfac``,
    ``ekfac`` and ``store``, :func:`kronecker_params`), or for ``"last"`` over the last
    Linear layer (its closed form, the library's defaults)."""
    if method == "store":
        assert option is not None and store_dir is not None
        store = fastinfluence.GradientStore(model, train, k=option, out=store_dir,
                                            params=kronecker_params(model), damping=damping)
        return store.build().pairwise(query)
    options: dict[str, Any] = {"gn": dict(hessian="gauss-newton", solver="direct"),
                               "exact": dict(hessian="exact", solver="direct"),
                               "woodbury": dict(hessian="gauss-newton", solver="woodbury"),
                               "cg": dict(hessian="gauss-newton", solver="cg"),
                               "kfac": dict(hessian="kfac", params=kronecker_params(model)),
                               "ekfac": dict(hessian="ekfac", params=kronecker_params(model)),
                               "last": dict(params="last")}[method]
    options.setdefault("params", "all")
    influence = fastinfluence.Influence(model, train, query, damping=damping, **options)
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


def captum_scores(model: nn.Module, checkpoints: list[dict[str, torch.Tensor]], train: Data,
                  query: Data, method: str, damping: float) -> torch.Tensor:
    """captum's scores on a float32 copy of ``model``, in fastinfluence's sign:
    ``ArnoldiInfluenceFunction`` (its defaults: 200 Arnoldi iterations, the top 50
    eigenvectors, ``hessian_reg = damping``) scores ``+∇l_qᵀ H_λ^{-1} ∇l_i``, TracInCP the sum
    over ``checkpoints`` of ``∇l_qᵀ∇l_i`` (equal weights): both positive for a sample that
    lowers the query loss, so ``I = −score``."""
    from captum.influence import TracInCP
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    from torch.utils.data import TensorDataset

    single = copy.deepcopy(model).float().eval()
    train_set = TensorDataset(train[0].float(), train[1])
    loss = nn.CrossEntropyLoss(reduction="none")
    with tempfile.TemporaryDirectory() as workdir:
        paths = []
        for index, state in enumerate(checkpoints):
            paths.append(str(Path(workdir) / f"checkpoint{index}.pt"))
            torch.save({key: value.float() if value.is_floating_point() else value
                        for key, value in state.items()}, paths[-1])
        if method == "captum-tracincp":
            tracin = TracInCP(single, train_set, paths, loss_fn=loss, batch_size=256)
            raw = tracin.influence((query[0].float(), query[1]))
        else:
            arnoldi = ArnoldiInfluenceFunction(single, train_set, paths[-1], loss_fn=loss,
                                               batch_size=256, hessian_reg=damping)
            raw = arnoldi.influence((query[0].float(), query[1]))
    return -raw.T.double()  # [n_query, n_train] -> [n_train, n_query]


def dattri_scores(model: nn.Module, train: Data, query: Data, method: str,
                  damping: float) -> torch.Tensor:
    """dattri's attributors on a float32 copy of ``model`` (its mean cross-entropy through
    ``torch.func.functional_call``, the whole training set as one batch), in fastinfluence's
    sign: ``IFAttributorExplicit`` (the exact Hessian), ``IFAttributorCG``,
    ``IFAttributorDataInf``, ``IFAttributorEKFAC`` (``regularization``/``damping`` =
    ``damping``) score ``+∇l_qᵀ H_λ^{-1} ∇l_i``, ``TracInAttributor`` (the trained model as
    its one checkpoint, weight 1) ``∇l_qᵀ∇l_i``: positive for a sample that lowers the query
    loss, so ``I = −score``."""
    from dattri.algorithm import (
        IFAttributorCG,
        IFAttributorDataInf,
        IFAttributorEKFAC,
        IFAttributorExplicit,
        TracInAttributor,
    )
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    single = copy.deepcopy(model).float().eval()
    if isinstance(single, nn.Linear):  # EK-FAC looks for Linear modules inside the model
        single = nn.Sequential(single)

    def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(single, params, data[0]), data[1])

    task = AttributionTask(loss_func=loss, model=single, checkpoints=single.state_dict())
    attributor = {
        "dattri-explicit": lambda: IFAttributorExplicit(task, regularization=damping),
        "dattri-cg": lambda: IFAttributorCG(task, regularization=damping),
        "dattri-datainf": lambda: IFAttributorDataInf(task, regularization=damping),
        "dattri-ekfac": lambda: IFAttributorEKFAC(task, damping=damping),
        "dattri-tracin": lambda: TracInAttributor(task, weight_list=torch.ones(1),
                                                  normalized_grad=False),
    }[method]()
    train_loader = DataLoader(TensorDataset(train[0].float(), train[1]),
                              batch_size=len(train[1]))
    query_loader = DataLoader(TensorDataset(query[0].float(), query[1]),
                              batch_size=len(query[1]))
    if method != "dattri-tracin":  # TracIn has nothing to cache
        attributor.cache(train_loader)
    return -torch.as_tensor(attributor.attribute(train_loader, query_loader)).detach().double()


class Run(NamedTuple):
    """One row: ``name`` is ``family[-ensK]@damping``; ``option`` is TRAK's projection
    dimension or the gradient store's ``k`` (``None`` otherwise)."""

    name: str
    family: str
    method: str
    damping: float
    ensemble: int
    option: int | None


def method_names(task: str, args: argparse.Namespace) -> list[Run]:
    """Every run on ``task``: each method at each damping (TRAK's "damping" is its
    ``lambda_reg``, from ``--trak-lambdas``; TracInCP has none), each ``--ensembles`` size for
    the ``--ensemble-methods`` and TRAK (at its first ``--trak-proj-dims``; the others with one
    model), TRAK's projection dimensions below the task's training set size, the store's
    ``--store-k``; single models first, in ``--methods`` order)."""
    runs = []
    ensembles = [1] if task == "digits-logreg" else args.ensembles  # convex: one optimum
    n_train = task_n_train(task, args)
    for method in args.methods:
        if method == "last" and task == "digits-logreg":
            continue  # the logistic regression is one Linear layer: "last" is "all"
        options: list[int | None] = [None]
        if method == "trak":
            options = [dim for dim in args.trak_proj_dims if dim < n_train]
        elif method == "store":
            options = list(args.store_k)
        dampings = ([0.0] if method in UNDAMPED else
                    args.trak_lambdas if method == "trak" else args.dampings)
        for option in options:
            family = {"trak": f"trak-p{option}", "store": f"store-k{option}"}.get(method, method)
            for damping in dampings:
                for k in ensembles:
                    if k > 1 and not (method in args.ensemble_methods or
                                      method == "trak" and option == options[0]):
                        continue
                    suffix = f"-ens{k}" if k > 1 else ""
                    runs.append(Run(f"{family}{suffix}@{damping:g}", family, method, damping,
                                    k, option))
    return sorted(runs, key=lambda run: run.ensemble)  # every single model first


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

def skip_reason(run: Run, parameters: int) -> str | None:
    """Why ``run`` is not attempted on a model with ``parameters`` parameters, or ``None``."""
    if run.method in ("gn", "exact", "dattri-explicit") and parameters > DENSE_LIMIT:
        return (f"not run: a dense {parameters} x {parameters} matrix "
                f"(woodbury is the exact Gauss-Newton solve here)")
    return None


def bench_task(task: str, args: argparse.Namespace, log: Callable[[str], None],
               save: Callable[[], None], result: dict[str, Any]) -> None:
    train, query = task_data(task, args)
    n_train = task_n_train(task, args)
    subsets = random_subsets(n_train, args.subsets, args.alpha, args.seed)
    targets = retrained_targets(task, train, query, subsets, args, log)
    sign = 1.0 if args.target == "loss" else -1.0
    start = time.perf_counter()
    checkpoints: list[dict[str, torch.Tensor]] = []
    members = [train_model(task, train, seed, args,
                           checkpoints=checkpoints if seed == 0 and task == "brain-cnn" else None)
               for seed in range(max(args.ensembles) if task != "digits-logreg" else 1)]
    if task != "brain-cnn":  # full-batch L-BFGS: the trained model is TracInCP's checkpoint
        checkpoints = [members[0].state_dict()]
    parameters = sum(p.numel() for p in members[0].parameters())
    entry: dict[str, Any] = {
        "n_train": n_train, "n_query": args.n_query, "subsets": args.subsets,
        "parameters": parameters,
        "retrain_seconds": targets["seconds"], "cache": targets["cache"],
        "retrained_now": int(targets["retrained"]),
        "train_seconds": time.perf_counter() - start, "methods": {}}
    result[task] = entry
    loo = (leave_one_out(task, members[0], train, query, args)
           if task == "digits-logreg" and args.loo else None)
    if loo is not None:
        entry["loo"] = {"removed": len(loo["removed"]), "seconds": loo["seconds"]}
    # fastinfluence's ensembles average the first K members' scores: each member is scored
    # once per (method, damping, option), its seconds counted in every K that uses it
    member_scores: dict[tuple[str, float, int | None], list[tuple[torch.Tensor, float]]] = {}
    with tempfile.TemporaryDirectory() as store_root:
        for run in method_names(task, args):
            reason = skip_reason(run, parameters)
            if reason is None and args.stop_at is not None and datetime.datetime.now(
                    datetime.timezone.utc) > args.stop_at:
                reason = f"not run: past --stop-at {args.stop_at.isoformat()}"
            if reason is None and run.method in PEER_MODULES and not importable(
                    PEER_MODULES[run.method]):
                reason = f"{PEER_MODULES[run.method]} is not installed"
            if reason is not None:
                entry["methods"][run.name] = {"error": reason}
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    scores, seconds = run_method(run, task, members, checkpoints, train, query,
                                                 args, member_scores, Path(store_root))
            except Exception as error:  # reported, never dropped (e.g. an indefinite H + λI)
                entry["methods"][run.name] = {"error": f"{type(error).__name__}: {error}"[:300]}
                log(f"{task} {run.name}: {entry['methods'][run.name]['error']}")
                continue
            summary = bootstrap_mean(lds_per_query(sign * scores, subsets,
                                                   targets[args.target]), seed=args.seed)
            summary.update(family=run.family, method=run.method, damping=run.damping,
                           ensemble=run.ensemble, option=run.option, seconds=seconds,
                           warnings=sorted({f"{w.category.__name__}: {w.message}"[:200]
                                            for w in caught}))
            if loo is not None:
                summary["loo"] = loo_correlation(scores, loo, n_train)
            entry["methods"][run.name] = summary
            log(f"{task} {run.name}: LDS {summary['lds']:.3f} [{summary['ci'][0]:.3f}, "
                f"{summary['ci'][1]:.3f}], {seconds:.2f} s")
            save()


def run_method(run: Run, task: str, members: list[nn.Module],
               checkpoints: list[dict[str, torch.Tensor]], train: Data, query: Data,
               args: argparse.Namespace,
               member_scores: dict[tuple[str, float, int | None], list[tuple[torch.Tensor, float]]],
               store_root: Path) -> tuple[torch.Tensor, float]:
    """``run``'s scores ``[n_train, n_query]`` (fastinfluence's sign) and its seconds: TRAK
    over its own ensemble; the other methods on each of the first ``K`` members, averaged."""
    if run.method == "trak":
        start = time.perf_counter()
        scores = trak_scores(members[:run.ensemble], train, query, run.option, run.damping)
        return scores, time.perf_counter() - start
    done = member_scores.setdefault((run.method, run.damping, run.option), [])
    for index in range(len(done), run.ensemble):
        model, start = members[index], time.perf_counter()
        if run.method.startswith("kronfluence"):
            scores = kronfluence_scores(model, train, query, run.method.split("-")[1],
                                        run.damping)
        elif run.method.startswith("dattri"):
            scores = dattri_scores(model, train, query, run.method, run.damping)
        elif run.method.startswith("captum"):
            scores = captum_scores(model, checkpoints, train, query, run.method, run.damping)
        else:
            # a fresh store per run: its seconds are a whole build and query
            store_dir = store_root / f"{run.option}-{run.damping:g}-{index}"
            scores = fastinfluence_scores(model, train, query, run.method, run.damping,
                                          run.option, store_dir)
        done.append((scores, time.perf_counter() - start))
    chosen = done[:run.ensemble]
    return (torch.stack([scores for scores, _ in chosen]).mean(0),
            sum(seconds for _, seconds in chosen))


def stop_time(text: str) -> datetime.datetime:
    """``--stop-at``'s ISO time, UTC unless it names its zone."""
    moment = datetime.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


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
    parser.add_argument("--cnn-n-train", type=int, default=500, help="training slices, CNN")
    parser.add_argument("--cnn-epochs", type=int, default=20, help="Adam epochs, CNN")
    parser.add_argument("--cnn-lr", type=float, default=1e-3, help="Adam learning rate, CNN")
    parser.add_argument("--target", choices=["loss", "margin"], default="loss")
    parser.add_argument("--methods", nargs="+", choices=BASE_METHODS + PEER_METHODS,
                        default=list(BASE_METHODS + PEER_METHODS))
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--ensembles", type=int, nargs="+", default=[1, 5, 10],
                        help="K models averaged (MLP, CNN)")
    parser.add_argument("--ensemble-methods", nargs="+", default=["gn", "woodbury", "ekfac"])
    parser.add_argument("--trak-proj-dims", type=int, nargs="+", default=[256, 128, 512],
                        help="TRAK's projection dimensions (those below the training set "
                             "size; its ensembles at the first)")
    parser.add_argument("--store-k", type=int, nargs="+", default=[8, 32],
                        help="the gradient store's rows per Kronecker factor")
    parser.add_argument("--trak-lambdas", type=float, nargs="+", default=[0, 1, 10, 100, 1000],
                        help="TRAK's lambda_reg sweep (its own scale: added to the Gram "
                             "matrix of its summed, 1/sqrt(p)-scaled features)")
    parser.add_argument("--loo", type=int, default=50,
                        help="removed samples for leave-one-out (logistic regression; 0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-at", type=stop_time, default=None, metavar="UTC",
                        help="ISO time (UTC unless it names a zone): runs not started by then "
                             "are reported as not run")
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "lds_cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lds_cpu.json")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "lds_cpu.png")
    parser.add_argument("--summary", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: print the docs page's goal lines and tables of the "
                             "saved reports (their tasks together) and draw their plot to "
                             "--plot")
    args = parser.parse_args(argv)
    for name in ("n_train", "n_query", "subsets", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.alpha < 1:
        parser.error("--alpha must be in (0, 1)")
    if min(args.trak_proj_dims) <= TRAK_BLOCK:
        parser.error(f"--trak-proj-dims must be above {TRAK_BLOCK}: traker 0.3.2's CPU projector "
                     "frees its matrix after featurizing when it is one block, and scoring "
                     "then fails")
    if any(k < 1 for k in args.ensembles):
        parser.error("--ensembles must be >= 1")
    if any(k < 1 for k in args.store_k):
        parser.error("--store-k must be >= 1")
    return args


PEER_FAMILIES = ("kronfluence", "trak", "captum", "dattri")


def is_peer(row: dict[str, Any]) -> bool:
    return row["method"].startswith(PEER_FAMILIES)


def family_label(row: dict[str, Any]) -> str:
    """``family`` (``trak-p256``, ``store-k32``, …) with ``×K`` for an ensemble."""
    family = row.get("family", row["method"])
    return family if row["ensemble"] == 1 else f"{family} ×{row['ensemble']}"


def measured(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in entry["methods"].values() if row.get("lds") is not None]


def best_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method family and ensemble size at its best damping, best LDS first."""
    best: dict[str, dict[str, Any]] = {}
    for row in measured(entry):
        label = family_label(row)
        if label not in best or row["lds"] > best[label]["lds"]:
            best[label] = row
    return sorted(best.values(), key=lambda row: -row["lds"])


def _cells(row: dict[str, Any]) -> str:
    return (f"{row['lds']:.3f} | [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] "
            f"| {row['seconds']:.2f}")


def table(report: dict[str, Any]) -> str:
    """The markdown table of a report: per task, each method family and ensemble size at its
    best damping, best LDS first; then the methods that failed or were not run."""
    lines = ["| task | method | K | best damping | LDS | 95 % interval | seconds | LOO Pearson |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for task, entry in report["tasks"].items():
        for row in best_rows(entry):
            loo = row.get("loo", {}).get("pearson_mean_over_queries")
            lines.append(f"| {task} | {row.get('family', row['method'])} | {row['ensemble']} "
                         f"| {row['damping']:g} | {_cells(row)} "
                         f"| {'' if loo is None else f'{loo:.3f}'} |")
        failures: dict[str, list[str]] = {}
        for name, row in entry["methods"].items():
            if "error" in row:
                reason = row["error"].splitlines()[0].split(" (")[0]  # details: in the JSON
                failures.setdefault(f"{name.split('@')[0]}: {reason}", []).append(
                    name.split("@")[1])
        for what, dampings in failures.items():
            method, reason = what.split(": ", 1)
            lines.append(f"| {task} | {method} | | {', '.join(dampings)} | {reason} | | | |")
    return "\n".join(lines)


def sweep_table(report: dict[str, Any]) -> str:
    """The damping sweep: per task, method family and ensemble size, the LDS at every
    damping (TRAK's: its ``lambda_reg``), the best in bold."""
    lines = ["| task | method | LDS by damping |", "|---|---|---|"]
    for task, entry in report["tasks"].items():
        families: dict[str, list[dict[str, Any]]] = {}
        for row in measured(entry):
            families.setdefault(family_label(row), []).append(row)
        for label, rows in families.items():
            if len(rows) < 2:
                continue
            best = max(row["lds"] for row in rows)
            cells = [f"{row['damping']:g}: " + (f"**{row['lds']:.3f}**" if row["lds"] == best
                                                 else f"{row['lds']:.3f}")
                     for row in sorted(rows, key=lambda row: row["damping"])]
            lines.append(f"| {task} | {label} | {' · '.join(cells)} |")
    return "\n".join(lines)


def goal_lines(report: dict[str, Any]) -> str:
    """Per task: the best peer row; fastinfluence's best row, and its best among the rows that
    took no more seconds than that peer row; whether that one has the higher LDS (a tie where
    both round to the same three decimals), and whether the 95 % intervals overlap."""
    lines = []
    for task, entry in report["tasks"].items():
        rows = measured(entry)
        ours = [row for row in rows if not is_peer(row)]
        peers = [row for row in rows if is_peer(row)]
        if not ours or not peers:
            continue
        peer = max(peers, key=lambda row: row["lds"])
        best = max(ours, key=lambda row: row["lds"])
        cheap = [row for row in ours if row["seconds"] <= peer["seconds"]]
        text = (f"* **{task}**: best peer {family_label(peer)} at {peer['damping']:g}, "
                f"{peer['lds']:.3f} [{peer['ci'][0]:.3f}, {peer['ci'][1]:.3f}] in "
                f"{peer['seconds']:.2f} s; best fastinfluence {family_label(best)} at "
                f"{best['damping']:g}, {best['lds']:.3f} [{best['ci'][0]:.3f}, "
                f"{best['ci'][1]:.3f}] in {best['seconds']:.2f} s")
        if cheap:
            match = max(cheap, key=lambda row: row["lds"])
            overlap = match["ci"][0] <= peer["ci"][1] and peer["ci"][0] <= match["ci"][1]
            verdict = ("**tie**" if round(match["lds"], 3) == round(peer["lds"], 3) else
                       "**yes**" if match["lds"] > peer["lds"] else "**no**") + (
                ", the intervals overlap" if overlap else ", the intervals do not overlap")
            text += (f"; within the peer's seconds: {family_label(match)} at "
                     f"{match['damping']:g}, {match['lds']:.3f} in {match['seconds']:.2f} s: "
                     f"{verdict}.")
        else:
            text += "; no fastinfluence row is as fast as that peer row: **no**."
        lines.append(text)
    return "\n".join(lines)


def merged(paths: list[Path]) -> dict[str, Any]:
    """The reports in ``paths`` as one, their configs by file name: their tasks together, and
    a task's methods from several runs together (a row in several: the first run's)."""
    report: dict[str, Any] = {"config": {}, "tasks": {}}
    for path in paths:
        saved = json.loads(path.read_text())
        report["config"][path.name] = saved["config"]
        for task, entry in saved["tasks"].items():
            if task in report["tasks"]:
                for name, row in entry["methods"].items():
                    report["tasks"][task]["methods"].setdefault(name, row)
            else:
                report["tasks"][task] = copy.deepcopy(entry)
    return report


def summary(report: dict[str, Any]) -> str:
    """What the docs page quotes, in its order: the goal lines, the best-per-method table,
    the damping sweep."""
    return "\n\n".join([goal_lines(report), table(report), sweep_table(report)])


def plot(report: dict[str, Any], path: Path) -> None:
    """LDS against seconds (log-x), one panel per task: each method family and ensemble size
    at its best damping, with its 95 % interval; fastinfluence circles, peers squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for row in best_rows(report["tasks"][task]):
            peer = is_peer(row)
            axis.errorbar([row["seconds"]], [row["lds"]],
                          yerr=[[row["lds"] - row["ci"][0]], [row["ci"][1] - row["lds"]]],
                          fmt="s" if peer else "o", color="tab:orange" if peer else "tab:blue",
                          capsize=2, alpha=0.8, markersize=4)
            axis.annotate(family_label(row), (row["seconds"], row["lds"]), fontsize=6,
                          xytext=(3, 2), textcoords="offset points")
        axis.set(xscale="log", xlabel="seconds (1 thread)", ylabel="LDS (Spearman, mean)",
                 title=f"{task}: each method at its best damping")
        axis.grid(alpha=0.3)
        axis.legend(handles=[
            plt.Line2D([], [], marker="o", color="tab:blue", ls="", label="fastinfluence"),
            plt.Line2D([], [], marker="s", color="tab:orange", ls="", label="peers")],
            fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.summary is not None:
        saved = merged(args.summary)
        print(summary(saved))
        plot(saved, args.plot)
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
