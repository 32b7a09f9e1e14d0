"""Reproduce Table 2 and Figures 4-7 and 9 of the MRS paper on the embedded spectra simulator.

Lu et al., "Human-expert-level brain tumor detection using deep learning with data
distillation and augmentation", with the
decisions of ``fastinfluence/robust/distillation.py``. Leave-subjects-out cross validation:
the patients are dealt into ``--folds`` folds (``patient_folds``); for each run seed and each
fold in ``--run-folds`` the fold is the test set, a tenth of the other patients is held out
(the loop's validation set and the "confidently labelled" set of influence-based
distillation, labelled by the simulator's tissue truth, as an expert-reviewed set would be)
and the rest trains. Per (seed, fold):

- SVM (``SVC()`` defaults) and random forest (500 trees, entropy) on the standardised spectra;
- the plain ResCNN, which is also Algorithm 1's distillation network: it collects the certain
  samples (max softmax >= theta) at the end of each of its first epochs (``C_E``); the
  paper's theta = 0.99 collects only tumour spectra on this simulator (a calibrated network's
  confidence in "healthy" stays below ~0.95 when a third of the tumour labels are healthy
  tissue), so the CPU default's theta is 0.9, "set empirically" as the paper set its own,
  and theta = 0.99 gets a row of its own;
- the noise-augmentation baseline;
- the proposed model: a fresh ResCNN trained on the mixing augmentation ``A`` of ``C``
  (``--strategies``, factor 5, alpha 0.5, E = 5 by default), and the sweeps of Figs. 5-7 over
  alpha, the source epoch E and the augmentation factor (``--sweep-folds`` only);
- beyond the paper, influence-based distillation: the same number of samples as the softmax
  set, chosen by influence on the held-out set (``helpful``) or by self-influence (``self``),
  mixed the same way; how many mislabelled spectra each selection keeps.

Metrics (test fold, final epoch, nothing selected on the test set): spectrum-wise AUC,
sensitivity, specificity and accuracy against the data set's (noisy) labels, patient-wise
accuracy, and the AUC against the tissue truth the simulator knows.

Outputs in ``--out``: ``runs.json`` (settings and every run, rewritten after each: after
Ctrl-C the same command resumes; more ``--run-folds`` or ``--sweep-folds`` or a larger
``--seeds`` extend a finished ``--out``, reusing its runs, when every other setting is the
same), ``table.md``,
``class_means.png``, ``figure4_distillation.png`` (t-SNE with the distilled samples, distance
histograms), ``figure5_alpha.png``, ``figure6_source_epoch.png``, ``figure7_factor.png`` and
``figure9_cams.png``; the figures are drawn from ``runs.json`` and ``figure_inputs/`` (saved
by the first seed's first fold).

    python examples/mrs_table2.py              # CPU default (about an hour on 2 free cores)
    python examples/mrs_table2.py --run-folds 0 1 2 3 4 5 6 7 8 9   # extends it to 10 folds
    python examples/mrs_table2.py --full       # the paper's settings (a GPU)

Two processes (or machines) share a long run with ``--shard``, each on its own copy of
``--out``, and ``--merge`` gathers them (then ``--no-train`` only writes the table and figures):

    python examples/mrs_table2.py --seeds 2 --shard 0/2 --out shard0   # and 1/2 on shard1
    python examples/mrs_table2.py --seeds 2 --no-train --merge shard0 shard1

The CPU default differs from the paper where 2 cores demand it (all flags): 1,500 spectra of
100 patients instead of 7,442 of 435; the ResCNN at half width (filters 8-64, ``--width 16``
is Table 1's); 3 of the 10 folds and one seed instead of 10 folds and 2 seeds; 8 epochs for
the plain/distillation network and 6 for the final networks (the paper does not give its
epochs); the sweeps on the first fold only, with fewer values (always with the first seed).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinfluence.datasets import make_mrs, patient_folds, save_mrs_class_means, standardise
from fastinfluence.datasets.mrs import BASES
from fastinfluence.datasets.plotting import METABOLITE_MARKS
from fastinfluence.experiments import (
    ExperimentCLI,
    Session,
    format_markdown_table,
    save_figure,
    save_tensors,
    setting,
)
from fastinfluence.models import ResCNN1d, class_activation_maps
from fastinfluence.models.rescnn import SHORTCUTS
from fastinfluence.robust.distillation import (
    BALANCING,
    INFLUENCE_PARAMS,
    BalancedTrainer,
    DistillationConfig,
    DistillationTrainer,
    MRSConfig,
    baseline_scores,
    classification_metrics,
    influence_certain,
    mix_certain,
    noise_augment,
)

METRICS = ("sensitivity", "specificity", "auc", "patient_accuracy")
METRIC_NAMES = {"sensitivity": "SEN", "specificity": "SPE", "auc": "AUC",
                "patient_accuracy": "Patient-wise accuracy", "accuracy": "ACC",
                "tissue_auc": "AUC vs tissue"}
# Table 2 of the paper, "whole" rows (mean ± std over 10 folds and 2 runs).
PAPER_TABLE = {
    "SVM": ((0.69, 0.08), (0.61, 0.17), (0.63, 0.05), (0.67, 0.07)),
    "RF": ((0.70, 0.08), (0.60, 0.15), (0.64, 0.05), (0.70, 0.09)),
    "Plain ResCNN": ((0.70, 0.03), (0.60, 0.03), (0.69, 0.04), (0.67, 0.50)),
    "Proposed model": ((0.71, 0.05), (0.69, 0.07), (0.73, 0.07), (0.73, 0.30)),
}
FIGURE_INPUTS = "figure_inputs"
KINDS = ("svm", "rf", "plain", "noise", "mixing")
"""The kinds of run (``--only``)."""
# settings that a later command may extend on a finished --out (the others must be equal)
EXTENDABLE = ("run_folds", "seeds", "sweep_folds")


def check(settings: Settings) -> str | None:
    """What is wrong with ``settings``, if anything."""
    if max([settings.source_epoch, *settings.sweep_epochs]) > settings.epochs:
        return ("--source-epoch and --sweep-epochs must be <= --epochs (the distillation "
                "network collects during its own training)")
    if not set(settings.run_folds) | set(settings.sweep_folds) <= set(range(settings.folds)):
        return f"folds must lie in 0..{settings.folds - 1}"
    return None


@dataclass
class Settings:
    """Everything that determines the runs (saved in ``runs.json``). Resuming needs equality
    except in ``EXTENDABLE``: an ``--out`` holds the union of the folds and the most seeds that
    the commands run on it asked for."""

    n_spectra: int | None = setting(1500, None, type=int, help="None: the paper's 7,442")
    n_patients: int | None = setting(100, None, type=int, help="None: the paper's 435")
    paper_size: bool = setting(lambda s: s.full, flag=None)
    data_seed: int = setting(0, type=int)
    healthy_fraction: float = setting(
        0.3, type=float, help="mean share of healthy tissue among the tumour-labelled spectra")
    tumour_contrast: float = setting(1.0, type=float)
    width: int = setting(8, 16, type=int,
                         help="ResCNN filters of the first blocks (Table 1's is 16)")
    folds: int = setting(10, type=int)
    run_folds: list[int] = setting(
        [0, 1, 2], lambda s: list(range(s.folds)), type=int, nargs="+",
        help="which folds to test on (default 0 1 2; --full all); folds not yet in --out's "
             "runs.json are added to it")
    seeds: int = setting(1, 2, type=int, help="runs with different seeds; a larger value than "
                                              "--out's adds seeds")
    epochs: int = setting(8, 30, type=int, help="plain/distillation epochs")
    final_epochs: int = setting(6, 30, type=int,
                                help="epochs of the networks trained on augmented sets")
    lr: float = setting(1e-3, type=float, help="Adam learning rate (Adam's default)")
    batch_size: int = setting(32, type=int)
    thresholds: list[float] = setting(
        [0.9, 0.99], [0.99, 0.9], type=float, nargs="+",
        help="distillation theta: the first for every run, the others for one more "
             "aug-with-both row each")
    source_epoch: int = setting(5, type=int, help="E: certain samples of epochs 1..E")
    factor: int = setting(5, type=int, help="augmentation factor")
    alpha: float = setting(0.5, type=float, help="mixing weight")
    strategies: list[str] = setting(["same", "other", "both"], nargs="+",
                                    choices=["same", "other", "both"])
    noise_factor: int = setting(1, type=int, help="noisy copies of the training set")
    noise_sigma: float = setting(0.1, type=float,
                                 help="noise std, in units of each standardised spectrum's std")
    held_out: float = setting(0.1, type=float,
                              help="share of the training patients held out as the clean set")
    influence: list[str] = setting(
        ["helpful", "self"], nargs="*", choices=["helpful", "self"],
        help="influence-based selections to compare with the softmax one")
    damping: float = setting(0.01, type=float)
    sweep_folds: list[int] = setting(
        [0], lambda s: list(range(s.folds)), type=int, nargs="*",
        help="folds the sweeps of Figs. 5-7 run on (default 0; --full all; none: no sweeps)")
    sweep_alphas: list[float] = setting([0.05, 0.25, 0.75, 0.95],
                                        [round(0.05 + 0.1 * k, 2) for k in range(10)],
                                        type=float, nargs="*", help="mixing weights")
    sweep_epochs: list[int] = setting([1, 3, 8], list(range(1, 11)), type=int, nargs="*",
                                      help="source epochs E")
    sweep_factors: list[int] = setting([1, 3, 8], [1, 2, 3, 5, 7, 10], type=int, nargs="*",
                                       help="augmentation factors")
    basis: str = setting(
        "multiplet", choices=BASES, absent="multiplet",
        help="metabolite lines of the simulator: first-order multiplets (every committed run) "
             "or the density-matrix PRESS simulation (about 6x slower to make)")
    balancing: str = setting(
        "random", "smote", choices=BALANCING, absent="random",
        help="class balancing of every network's training set: random oversampling "
             "(duplicates; the committed 10-fold table) or SMOTE (the paper's reference [29])")
    shortcut: str = setting(
        "projection", "pool", choices=SHORTCUTS, absent="projection",
        help="the residual blocks' shortcut where the shape changes: 1x1 convolution + "
             "BatchNorm (the committed 10-fold table) or max-pooling + zero channels (the "
             "paper's)")


def only_option(add: Any) -> None:
    """``--only``: the kinds of run to train now."""
    add("--only", nargs="+", choices=KINDS, default=list(KINDS),
        help="train only these kinds of run now (mixing needs the plain network, which it "
             "trains); the table shows what --out holds")


CLI = ExperimentCLI(Settings, __doc__, "examples/mrs_table2.py",
                    Path("examples/results/mrs_table2"), extendable=EXTENDABLE, check=check,
                    options=only_option, scratch=(FIGURE_INPUTS,))
parse_args = CLI.parse_args
settings_from = CLI.settings_from


# -- the data and one fold ---------------------------------------------------------------------


@dataclass
class Fold:
    """One fold's standardised splits, with the simulator's truth for counting."""

    train: tuple[torch.Tensor, torch.Tensor]
    clean: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_mislabelled: torch.Tensor
    test_tissue: torch.Tensor
    test_patients: np.ndarray


def make_fold(data: Any, folds: list[np.ndarray], fold: int, settings: Settings,
              seed: int) -> Fold:
    test = folds[fold]
    rest = np.sort(np.concatenate([f for k, f in enumerate(folds) if k != fold]))
    patients = np.unique(data.patient_ids[rest])
    rng = np.random.default_rng([settings.data_seed, seed, fold])
    held = set(rng.choice(patients, max(2, round(settings.held_out * len(patients))),
                          replace=False))
    is_held = np.array([p in held for p in data.patient_ids[rest]])
    train, clean = rest[~is_held], rest[is_held]
    x = standardise(data.spectra)
    return Fold(
        train=(x[train], data.labels[train]),
        clean=(x[clean], data.tissue_labels[clean]),
        test=(x[test], data.labels[test]),
        train_mislabelled=data.mislabelled[train],
        test_tissue=data.tissue_labels[test],
        test_patients=data.patient_ids[test],
    )


def evaluate(fold: Fold, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """A run's metrics on the test fold, and its scores there (``test_scores``, for the ROC
    curves of Fig. 8; runs saved before kept only the metrics)."""
    from sklearn.metrics import roc_auc_score

    metrics = classification_metrics(fold.test[1].numpy(), scores, fold.test_patients, threshold)
    metrics["tissue_auc"] = float(roc_auc_score(fold.test_tissue.numpy(), scores))
    return {"metrics": metrics, "test_scores": [float(v) for v in scores]}


def network_config(settings: Settings, seed: int, epochs: int, device: str) -> dict[str, Any]:
    return dict(epochs=epochs, lr=settings.lr, batch_size=settings.batch_size, seed=seed,
                device=device, balancing=settings.balancing)


def new_model(settings: Settings, seed: int, fold: int) -> ResCNN1d:
    torch.manual_seed(1000 * seed + fold)
    return ResCNN1d(width=settings.width, shortcut=settings.shortcut)


def tumour_probability(trainer: BalancedTrainer, x: torch.Tensor) -> np.ndarray:
    return trainer.probabilities(x)[:, 1].numpy()


def selection_summary(indices: torch.Tensor, fold: Fold) -> dict[str, Any]:
    labels = fold.train[1][indices]
    return {"size": int(len(indices)), "per_class": torch.bincount(labels, minlength=2).tolist(),
            "mislabelled": int(fold.train_mislabelled[indices].sum()),
            "mislabelled_fraction": float(fold.train_mislabelled[indices].float().mean())
            if len(indices) else float("nan")}


class SnapshotDistillation(DistillationTrainer):
    """Keeps a copy of the model at the end of epoch E (for influence-based distillation)."""

    def __init__(self, model: torch.nn.Module, config: DistillationConfig, at_epoch: int) -> None:
        super().__init__(model, config)
        self.at_epoch = at_epoch
        self.snapshot: torch.nn.Module | None = None

    def after_epoch(self, epoch: int) -> None:
        super().after_epoch(epoch)
        if epoch + 1 == self.at_epoch:
            self.snapshot = copy.deepcopy(self.model).eval()


# -- the runs ----------------------------------------------------------------------------------


def first_certain_epochs(probabilities_by_epoch: list[torch.Tensor],
                         threshold: float) -> torch.Tensor:
    """Per training sample, the first epoch (1-based) at whose end its largest softmax output
    reached ``threshold``; 0 where none did. From the softmax outputs of every epoch (or their
    maxima, ``[n, 1]``)."""
    reached = torch.stack([p.max(1).values >= threshold for p in probabilities_by_epoch])
    return torch.where(reached.any(0), reached.int().argmax(0) + 1, 0)


def certain_from(first_epochs: torch.Tensor, epochs: int) -> torch.Tensor:
    """Algorithm 1's ``C`` over the first ``epochs`` epochs (sorted indices): the samples whose
    :func:`first_certain_epochs` lies in ``1..epochs``."""
    return torch.nonzero((first_epochs >= 1) & (first_epochs <= epochs))[:, 0]


def saved_first_epochs(plain: dict[str, Any], threshold: float) -> torch.Tensor:
    """:func:`first_certain_epochs` of a saved plain run (``runs.json`` written before they
    were saved held every epoch's softmax maxima instead)."""
    if "max_probability_by_epoch" in plain:
        return first_certain_epochs([torch.tensor(p)[:, None]
                                     for p in plain["max_probability_by_epoch"]], threshold)
    return torch.tensor(plain["certain_epoch"][str(threshold)])


def mixing_jobs(settings: Settings, fold: int, sweeps: bool) -> list[dict[str, Any]]:
    """The final-network runs of one fold: Table 2's default per strategy, the influence
    selections, and with ``sweeps`` (on sweep folds) the sweeps, value by value with every
    strategy, so that an interrupted sweep covers each value it reached; each as its
    options."""
    default = {"alpha": settings.alpha, "factor": settings.factor,
               "source_epoch": settings.source_epoch, "selection": "softmax",
               "threshold": settings.thresholds[0]}
    jobs = [{**default, "strategy": s} for s in settings.strategies]
    jobs += [{**default, "strategy": "both", "threshold": t} for t in settings.thresholds[1:]]
    jobs += [{**default, "strategy": "both", "selection": f"influence-{k}"}
             for k in settings.influence]
    if sweeps and fold in settings.sweep_folds:
        for option, values in (("alpha", settings.sweep_alphas),
                               ("source_epoch", settings.sweep_epochs),
                               ("factor", settings.sweep_factors)):
            jobs += [{**default, "strategy": strategy, option: value}
                     for value in values for strategy in settings.strategies]
    unique = {json.dumps(job, sort_keys=True): job for job in jobs}
    return list(unique.values())


def run_key(kind: str, seed: int, fold: int, options: dict[str, Any] | None = None) -> str:
    return json.dumps([kind, seed, fold, options or {}], sort_keys=True)


def fold_runs(session: Session, data: Any, folds: list[np.ndarray], seed: int, fold: int,
              sweeps: bool, kinds: tuple[str, ...] = KINDS) -> None:
    """Every missing run of (seed, fold) (Table 2's, and with ``sweeps`` the sweeps') of the
    ``kinds`` (mixing trains the plain network too, as its distillation network), each saved
    (``session.save(record)``) as it finishes."""
    settings, device, out, save = session.settings, session.device, session.out, session.save
    f = make_fold(data, folds, fold, settings, seed)
    flat_train, flat_test = f.train[0][:, 0].numpy(), f.test[0][:, 0].numpy()
    for kind in ("svm", "rf"):
        if kind in kinds and not session.done(run_key(kind, seed, fold)):
            start = time.perf_counter()
            scores, threshold = baseline_scores(kind, flat_train, f.train[1].numpy(), flat_test,
                                                seed=seed)
            save({"key": run_key(kind, seed, fold), "kind": kind, "seed": seed, "fold": fold,
                  **evaluate(f, scores, threshold),
                  "seconds": time.perf_counter() - start})
    jobs = mixing_jobs(settings, fold, sweeps) if "mixing" in kinds else []
    if ("plain" in kinds or jobs) and not session.done(run_key("plain", seed, fold)):
        config = DistillationConfig(**network_config(settings, seed, settings.epochs, device),
                                    threshold=settings.thresholds[0], distill_epochs=max(
                                        [settings.source_epoch, *settings.sweep_epochs]))
        trainer = SnapshotDistillation(new_model(settings, seed, fold), config,
                                       settings.source_epoch)
        start = time.perf_counter()
        result = trainer.fit(f.train, f.clean, f.test)
        record = {"key": run_key("plain", seed, fold), "kind": "plain", "seed": seed,
                  "fold": fold, **evaluate(f, tumour_probability(trainer, f.test[0]), 0.5),
                  "seconds": time.perf_counter() - start,
                  "history": [asdict(r) for r in result.history],
                  "certain_epoch": {}, "certain_summary": {}}
        for theta in settings.thresholds:
            first = first_certain_epochs(trainer.probabilities_by_epoch, theta)
            record["certain_epoch"][str(theta)] = first.tolist()
            record["certain_summary"][str(theta)] = {
                str(e): selection_summary(certain_from(first, e), f)
                for e in range(1, len(trainer.probabilities_by_epoch) + 1)}
        record["train_summary"] = selection_summary(torch.arange(len(f.train[1])), f)
        softmax_set = trainer.certain(settings.source_epoch)
        for kind in settings.influence:
            if len(softmax_set) == 0:
                record[f"influence-{kind}"] = {"error": "the softmax set is empty"}
                continue
            chosen = influence_certain(
                trainer.snapshot, f.train, f.clean, len(softmax_set), selection=kind,
                params=INFLUENCE_PARAMS if kind == "helpful" else "last",
                damping=settings.damping, device=device)
            record[f"influence-{kind}"] = {
                "certain": chosen.certain.tolist(), "scoring": chosen.scoring,
                "solver": chosen.solver, "seconds": chosen.seconds,
                "summary": selection_summary(chosen.certain, f)}
        if seed == 0 and fold == settings.run_folds[0]:
            save_figure4_inputs(out, f, softmax_set)
        save(record)
    if "noise" in kinds and not session.done(run_key("noise", seed, fold)):
        x, y = noise_augment(*f.train, factor=settings.noise_factor, sigma=settings.noise_sigma,
                             generator=torch.Generator().manual_seed(seed))
        trainer = BalancedTrainer(new_model(settings, seed, fold), MRSConfig(
            **network_config(settings, seed, settings.final_epochs, device)))
        start = time.perf_counter()
        trainer.fit((x, y), f.clean, f.test)
        save({"key": run_key("noise", seed, fold), "kind": "noise", "seed": seed, "fold": fold,
              **evaluate(f, tumour_probability(trainer, f.test[0]), 0.5),
              "seconds": time.perf_counter() - start})
    plain = session.record(run_key("plain", seed, fold))
    for job in jobs:
        key = run_key("mixing", seed, fold, job)
        if session.done(key):
            continue
        record = {"key": key, "kind": "mixing", "seed": seed, "fold": fold, "options": job}
        if job["selection"] == "softmax":
            certain = certain_from(saved_first_epochs(plain, job["threshold"]),
                                   job["source_epoch"])
        else:
            chosen = plain.get(job["selection"], {})
            if "certain" not in chosen:
                record["error"] = chosen.get("error", "no influence selection saved")
                save(record)
                continue
            certain = torch.tensor(chosen["certain"], dtype=torch.int64)
        record["certain_summary"] = selection_summary(certain, f)
        try:
            mixed = mix_certain(*f.train, certain, strategy=job["strategy"],
                                factor=job["factor"], alpha=job["alpha"],
                                generator=torch.Generator().manual_seed(seed))
        except ValueError as error:  # e.g. "other" with a one-class C: reported, not hidden
            record["error"] = str(error)
            save(record)
            continue
        trainer = BalancedTrainer(new_model(settings, seed, fold), MRSConfig(
            **network_config(settings, seed, settings.final_epochs, device)))
        start = time.perf_counter()
        trainer.fit((mixed.x, mixed.y), f.clean, f.test)
        record.update(evaluate(f, tumour_probability(trainer, f.test[0]), 0.5))
        record["seconds"] = time.perf_counter() - start
        if (seed == 0 and fold == settings.run_folds[0] and job["selection"] == "softmax"
                and job["strategy"] == "both" and is_default(job, settings)):
            save_cam_inputs(out, trainer.model, f)
        save(record)


def is_default(options: dict[str, Any], settings: Settings) -> bool:
    return (options["alpha"] == settings.alpha and options["factor"] == settings.factor
            and options["source_epoch"] == settings.source_epoch
            and options["threshold"] == settings.thresholds[0])


# -- figure inputs (saved by the first fold, so that a resumed run draws the same figures) -------


def save_figure4_inputs(out: Path, fold: Fold, certain: torch.Tensor) -> None:
    """Figure 4's data: a 2-D t-SNE of the training set and the distances of every sample to
    the centre of the other class (original space), with the distilled samples marked."""
    from sklearn.manifold import TSNE

    x, y = fold.train[0][:, 0].numpy(), fold.train[1].numpy()
    embedding = TSNE(2, random_state=0, init="pca", perplexity=30).fit_transform(x)
    centres = np.stack([x[y == c].mean(0) for c in (0, 1)])
    distance = np.linalg.norm(x - centres[1 - y], axis=1)
    marked = np.zeros(len(y), dtype=bool)
    marked[certain.numpy()] = True
    save_tensors(out / FIGURE_INPUTS / "figure4.pt", {
        "embedding": torch.from_numpy(embedding), "labels": torch.from_numpy(y),
        "distance": torch.from_numpy(distance), "distilled": torch.from_numpy(marked)})


def save_cam_inputs(out: Path, model: ResCNN1d, fold: Fold, per_class: int = 3) -> None:
    """Figure 9's data: CAMs of the proposed model over test spectra of each label."""
    x, y = fold.test
    picks = [int(i) for c in (0, 1) for i in torch.nonzero(y == c)[:per_class, 0]]
    cams = class_activation_maps(model.cpu(), x[picks])
    save_tensors(out / FIGURE_INPUTS / "figure9.pt", {
        "spectra": x[picks, 0], "labels": y[picks], "cams": cams,
        "tissue": fold.test_tissue[picks]})


# -- table and figures -------------------------------------------------------------------------


def cell(values: list[float]) -> str:
    values = [v for v in values if v == v]
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else "–"


def table_rows(runs: list[dict], settings: Settings) -> list[tuple[str, list[dict]]]:
    """(name, runs) for every row of Table 2 (default options; errors left out)."""
    done = [r for r in runs if "metrics" in r]
    rows = [("SVM", [r for r in done if r["kind"] == "svm"]),
            ("RF", [r for r in done if r["kind"] == "rf"]),
            ("Plain ResCNN", [r for r in done if r["kind"] == "plain"]),
            ("Noise augmentation", [r for r in done if r["kind"] == "noise"])]
    mixing = [r for r in done if r["kind"] == "mixing" and is_default(r["options"], settings)]
    for strategy in settings.strategies:
        name = "Proposed model (aug-with-both)" if strategy == "both" else f"aug-with-{strategy}"
        rows.append((name, [r for r in mixing if r["options"]["strategy"] == strategy
                            and r["options"]["selection"] == "softmax"]))
    for theta in settings.thresholds[1:]:
        rows.append((f"Proposed model, θ = {theta}", [
            r for r in done if r["kind"] == "mixing" and r["options"]["threshold"] == theta
            and is_default({**r["options"], "threshold": settings.thresholds[0]}, settings)
            and r["options"]["selection"] == "softmax"]))
    for kind in settings.influence:
        rows.append((f"Influence distillation ({kind}) + both",
                     [r for r in mixing if r["options"]["selection"] == f"influence-{kind}"]))
    return rows


def averaged_over(rows: list[tuple[str, list[dict]]], folds: int) -> str:
    """Which test folds and seeds the rows of Table 2 average (from the runs themselves)."""
    pairs = {(r["seed"], r["fold"]) for _, members in rows for r in members}
    fold_ids = sorted({fold for _, fold in pairs})
    seed_ids = sorted({seed for seed, _ in pairs})
    return (f"{len(fold_ids)} of {folds} test folds ({', '.join(map(str, fold_ids)) or 'none'}) "
            f"× {len(seed_ids)} seed{'s' if len(seed_ids) != 1 else ''} "
            f"({', '.join(map(str, seed_ids)) or 'none'}): {len(pairs)} (seed, fold) pairs")


def paired_table(rows: list[tuple[str, list[dict]]], baseline: str = "Plain ResCNN") -> str:
    """Each row's AUC minus the ``baseline`` row's on the same (seed, fold): mean ± std and on
    how many pairs it is higher, lower or equal (to 0.005), for the (seed, fold) pairs both
    have."""
    base = {(r["seed"], r["fold"]): r["metrics"]["auc"] for r in dict(rows)[baseline]}
    lines = []
    for name, members in rows:
        if name == baseline:
            continue
        differences = [r["metrics"]["auc"] - base[(r["seed"], r["fold"])] for r in members
                       if (r["seed"], r["fold"]) in base and not np.isnan(r["metrics"]["auc"])]
        counts = (sum(d > 0.005 for d in differences), sum(d < -0.005 for d in differences),
                  sum(abs(d) <= 0.005 for d in differences))
        signed = (f"{np.mean(differences):+.3f} ± {np.std(differences):.3f}" if differences
                  else "–")
        lines.append([name, str(len(differences)), signed, " / ".join(map(str, counts))])
    return format_markdown_table(
        ["Method", "pairs", f"AUC − {baseline} AUC", "higher / lower / within 0.005"], lines)


BALANCING_NAMES = {
    "random": "random oversampling (minority-class spectra drawn again with replacement)",
    "smote": "SMOTE (imbalanced-learn, k = 5 same-class neighbours)",
    "none": "none"}
SHORTCUT_NAMES = {
    "projection": "1×1 convolution + BatchNorm where a block changes the shape",
    "pool": "max-pooling + zero channels where a block changes the shape (the paper's)"}


def theta_sweep(runs: list[dict], settings: Settings) -> dict[float, dict[tuple[int, int], dict]]:
    """Per θ of ``settings.thresholds`` and (seed, fold) with a plain run: the share of the
    training set in the softmax ``C`` (E = the source epoch), its healthy share and, where the
    proposed model (aug-with-both, the other options at their defaults) trained on it, that
    model's test AUC."""
    plains = {(r["seed"], r["fold"]): r for r in runs if r["kind"] == "plain"}
    out: dict[float, dict[tuple[int, int], dict]] = {}
    for theta in settings.thresholds:
        per_pair = {}
        for pair, plain in sorted(plains.items()):
            chosen = plain["certain_summary"][str(theta)][str(settings.source_epoch)]
            auc = [r["metrics"]["auc"] for r in runs if r["kind"] == "mixing"
                   and (r["seed"], r["fold"]) == pair and "metrics" in r
                   and r["options"]["selection"] == "softmax"
                   and r["options"]["strategy"] == "both"
                   and r["options"]["threshold"] == theta
                   and is_default({**r["options"], "threshold": settings.thresholds[0]},
                                  settings)]
            per_pair[pair] = {
                "fraction": chosen["size"] / plain["train_summary"]["size"],
                "healthy": chosen["per_class"][0] / chosen["size"] if chosen["size"] else None,
                "auc": auc[0] if auc else None}
        out[theta] = per_pair
    return out


def theta_table(runs: list[dict], settings: Settings) -> str:
    """:func:`theta_sweep` as a table: one line per θ (over the pairs), then per pair."""
    sweep = theta_sweep(runs, settings)
    lines = []
    for theta, per_pair in sweep.items():
        fractions = [v["fraction"] for v in per_pair.values()]
        healthy = [v["healthy"] for v in per_pair.values() if v["healthy"] is not None]
        aucs = [v["auc"] for v in per_pair.values() if v["auc"] is not None]
        lines.append([f"{theta:g}", str(len(fractions)),
                      f"{100 * np.mean(fractions):.0f} % ({100 * min(fractions):.0f}–"
                      f"{100 * max(fractions):.0f} %)" if fractions else "–",
                      f"{100 * min(healthy):.0f}–{100 * max(healthy):.0f} %" if healthy else "–",
                      f"{cell(aucs)} (n = {len(aucs)})"])
    summary = format_markdown_table(
        ["θ", "pairs", f"C (E = {settings.source_epoch}) / training set: mean (range)",
         "healthy share of C", "proposed model AUC"], lines)
    pairs = sorted({pair for per_pair in sweep.values() for pair in per_pair})
    detail = format_markdown_table(
        ["seed, fold", *(f"θ = {theta:g}: C share, AUC" for theta in sweep)],
        [[f"{seed}, {fold}", *(
            f"{100 * sweep[t][(seed, fold)]['fraction']:.0f} %, "
            + (f"{sweep[t][(seed, fold)]['auc']:.2f}" if sweep[t][(seed, fold)]["auc"]
               is not None else "–") for t in sweep)] for seed, fold in pairs])
    return f"{summary}\n\n{detail}"


def render_table(settings: Settings, runs: list[dict], meta: dict[str, Any]) -> str:
    """``table.md``, from what ``runs.json`` holds."""
    columns = [*METRICS, "accuracy", "tissue_auc"]
    rows = table_rows(runs, settings)
    table = format_markdown_table(
        ["Method", "n", *(METRIC_NAMES[c] for c in columns)],
        [[name, str(len(members)), *(cell([r["metrics"][c] for r in members]) for c in columns)]
         for name, members in rows])
    paper = format_markdown_table(
        ["Method", *(METRIC_NAMES[c] for c in METRICS)],
        [[name, *(f"{m:.2f} ± {s:.2f}" for m, s in values)]
         for name, values in PAPER_TABLE.items()])
    plains = sorted((r for r in runs if r["kind"] == "plain"), key=lambda r: (r["seed"], r["fold"]))
    selection = []
    for r in plains:
        t = r["train_summary"]
        cells = [f"{r['seed']}, {r['fold']}",
                 f"{t['size']} ({t['mislabelled']}, {100 * t['mislabelled_fraction']:.1f} %)"]
        for theta in settings.thresholds:
            c = r["certain_summary"][str(theta)][str(settings.source_epoch)]
            cells.append(f"{c['size']} {c['per_class']}, {c['mislabelled']}")
        for k in settings.influence:
            chosen = r.get(f"influence-{k}", {})
            cells.append(f"{chosen['summary']['mislabelled']} ({chosen['scoring']})"
                         if "summary" in chosen else chosen.get("error", "–"))
        selection.append(cells)
    selection_header = [
        "seed, fold", "training set (mislabelled)",
        *(f"softmax C, θ = {t}: size [healthy, tumour], mislabelled" for t in settings.thresholds),
        *(f"influence-{k}: mislabelled (scoring)" for k in settings.influence)]
    errors = sorted({f"{r['options']}: {r['error']}" for r in runs if "error" in r})
    minutes = sum(r.get("seconds", 0) for r in runs) / 60
    earlier = "".join(f", extending `{c}`" for c in meta.get("earlier_commands", []))
    return f"""# MRS Table 2 on the embedded spectra simulator

Command: `{meta['command']}`{earlier}
({len(runs)} runs, {minutes:.1f} min of training on {meta['machine']}.)
Settings: {json.dumps(asdict(settings))}

Every run of this table: class balancing **{BALANCING_NAMES[settings.balancing]}**;
residual shortcut **{SHORTCUT_NAMES[settings.shortcut]}**.

Averaged over {averaged_over(rows, settings.folds)}.
Test folds: mean ± std (population) over the (seed, fold) pairs run (`n`; a row with fewer
pairs misses runs that failed or did not finish). SEN/SPE/ACC at
probability 0.5 (SVM: decision value 0), against the data set's labels (tumour = the
hemisphere); "AUC vs tissue" against what the simulated voxel holds.

{table}

## Paired with the plain ResCNN (same seed and test fold)

{paired_table(rows)}

## The paper's Table 2 ("whole": 10 folds × 2 runs; real spectra)

{paper}

The neuroradiologist rows (SEN 0.54, SPE 0.88, AUC 0.68, patient-wise 0.69 on one fold)
cannot be reproduced: there are no readers here.

## The distillation threshold θ

{theta_table(runs, settings)}

## What the distillation collected

{format_markdown_table(selection_header, selection)}

## Runs that could not train

{chr(10).join(f'- {e}' for e in errors) if errors else 'none'}
"""


def sweep_values(runs: list[dict], settings: Settings, option: str,
                 values: list[Any]) -> dict[str, list[tuple[Any, list[float]]]]:
    """AUCs by strategy for each value of ``option`` (the others at their defaults)."""
    base = {"alpha": settings.alpha, "factor": settings.factor,
            "source_epoch": settings.source_epoch}
    out: dict[str, list[tuple[Any, list[float]]]] = {}
    for strategy in settings.strategies:
        series = []
        for value in sorted(set(values) | {base[option]}):
            wanted = {**base, option: value, "strategy": strategy, "selection": "softmax",
                      "threshold": settings.thresholds[0]}
            aucs = [r["metrics"]["auc"] for r in runs if r["kind"] == "mixing" and "metrics" in r
                    and r["options"] == wanted and r["fold"] in settings.sweep_folds]
            series.append((value, aucs))
        out[strategy] = series
    return out


def default_pairs(runs: list[dict], settings: Settings, kind: str,
                  strategy: str | None = None) -> list[float]:
    """The test AUCs of every (seed, fold) of one kind of run at the default options
    (mixing: of ``strategy`` with the softmax selection)."""
    return [r["metrics"]["auc"] for r in runs if r["kind"] == kind and "metrics" in r
            and (strategy is None or (
                r["options"]["strategy"] == strategy and r["options"]["selection"] == "softmax"
                and is_default(r["options"], settings)))]


def draw_sweeps(out: Path, runs: list[dict], settings: Settings) -> list[Path]:
    """Figs. 5–7: each sweep's AUC by strategy on the sweep folds (seed 0; error bars over
    those folds), the baselines of the same folds as lines, and the default point of each
    strategy and of the plain ResCNN over every (seed, fold) pair of ``runs`` (squares, one
    standard deviation). Fig. 6 adds the share of the training set in ``C`` for each E over
    every pair."""
    from matplotlib.figure import Figure

    # The sweeps ran with the first seed only; their baselines' lines use it too.
    sweep_runs = [r for r in runs if r.get("seed") == 0 and r.get("fold") in settings.sweep_folds
                  and "metrics" in r]
    lines = {name: [r["metrics"]["auc"] for r in sweep_runs if r["kind"] == kind]
             for name, kind in (("SVM", "svm"), ("RF", "rf"), ("plain ResCNN", "plain"),
                                ("noise augmentation", "noise"))}
    plains = [r for r in runs if r["kind"] == "plain"]
    paths = []
    for number, option, values, label in (
            (5, "alpha", settings.sweep_alphas, "mixing weight α"),
            (6, "source_epoch", settings.sweep_epochs, "source epoch E"),
            (7, "factor", settings.sweep_factors, "augmentation factor")):
        series = sweep_values(sweep_runs, settings, option, values)
        if not any(aucs for s in series.values() for _, aucs in s):
            continue
        default = {"alpha": settings.alpha, "factor": settings.factor,
                   "source_epoch": settings.source_epoch}[option]
        figure = Figure(figsize=(10, 3.8) if number == 6 else (6, 3.8))
        axes = figure.subplots(1, 2 if number == 6 else 1, squeeze=False)[0]
        axis = axes[0]
        span = max([*values, default]) - min([*values, default]) or 1
        for strategy, points in series.items():
            shown = [(v, a) for v, a in points if a]
            if not shown:
                continue
            drawn = axis.errorbar([v for v, _ in shown], [np.mean(a) for _, a in shown],
                                  yerr=[np.std(a) for _, a in shown], marker="o", capsize=3,
                                  label=f"aug-with-{strategy}")
            every = default_pairs(runs, settings, "mixing", strategy)
            if every:
                axis.errorbar([default + 0.02 * span], [np.mean(every)], yerr=[np.std(every)],
                              marker="s", mfc="none", capsize=3, color=drawn[0].get_color(),
                              label=f"aug-with-{strategy}, all {len(every)} pairs")
        every = default_pairs(runs, settings, "plain")
        if every:
            axis.errorbar([default - 0.02 * span], [np.mean(every)], yerr=[np.std(every)],
                          marker="s", mfc="none", capsize=3, color="black",
                          label=f"plain ResCNN, all {len(every)} pairs")
        for (name, aucs), style in zip(lines.items(), (":", "-.", "--", (0, (1, 3))),
                                       strict=True):
            if aucs:
                axis.axhline(np.mean(aucs), color="grey", ls=style, lw=1, label=name)
        axis.set_xlabel(label)
        axis.set_ylabel("test AUC")
        axis.legend(fontsize=6)
        axis.set_title(f"circles: seed 0, folds {settings.sweep_folds}; squares: the "
                       f"default over all pairs", fontsize=8)
        if number == 6 and plains:
            theta = str(settings.thresholds[0])
            epochs = sorted(int(e) for e in plains[0]["certain_summary"][theta])
            shares = np.array([[r["certain_summary"][theta][str(e)]["size"]
                                / r["train_summary"]["size"] for e in epochs] for r in plains])
            axes[1].errorbar(epochs, 100 * shares.mean(0), yerr=100 * shares.std(0), marker="o",
                             capsize=3, color="black")
            axes[1].set_xlabel("source epoch E")
            axes[1].set_ylabel("C as % of the training set")
            axes[1].set_title(f"size of C (θ = {theta}), mean ± std over all {len(plains)} "
                              "pairs", fontsize=8)
        figure.suptitle(f"Figure {number}: AUC vs {label}", fontsize=10)
        paths.append(save_figure(figure, out / f"figure{number}_{option}.png", dpi=100))
    return paths


def draw_kmeans(out: Path, data: Any, settings: Settings, clusters: int = 7) -> Path:
    """Fig. 3: k-means (Euclidean, ``clusters`` as the paper's B–H) of every standardised
    spectrum. A: the share of each label's spectra (and of the tumour tissue) in each cluster;
    then each cluster's mean ± std, clusters by decreasing healthy-labelled share."""
    from matplotlib.figure import Figure
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = standardise(data.spectra)[:, 0].numpy()
    labels = data.labels.numpy()
    with threadpool_limits(1):  # one thread: the same clusters, so the same figure, every time
        assigned = KMeans(clusters, n_init=10, random_state=settings.data_seed).fit_predict(x)
    groups = [("labelled healthy", labels == 0), ("labelled tumour", labels == 1)]
    if data.tissue_labels is not None:
        groups.append(("tumour tissue", data.tissue_labels.numpy() == 1))
    order = sorted(range(clusters), key=lambda c: -np.mean(assigned[labels == 0] == c))
    figure = Figure(figsize=(14, 6))
    axes = figure.subplots(2, 4).ravel()
    width = 0.8 / len(groups)
    for k, (name, member) in enumerate(groups):
        shares = [100 * np.mean(assigned[member] == c) for c in order]
        axes[0].bar(np.arange(clusters) + (k - (len(groups) - 1) / 2) * width, shares, width,
                    label=name)
    axes[0].set_xticks(np.arange(clusters), [str(i + 1) for i in range(clusters)])
    axes[0].set_xlabel("cluster")
    axes[0].set_ylabel("% of the group's spectra")
    axes[0].set_title("A: each group's spectra by cluster", fontsize=8)
    axes[0].legend(fontsize=6)
    for index, (axis, c) in enumerate(zip(axes[1:], order, strict=True)):
        member = assigned == c
        mean, std = x[member].mean(0), x[member].std(0)
        axis.fill_between(data.ppm, mean - std, mean + std, color="cyan", alpha=0.5)
        axis.plot(data.ppm, mean, color="darkblue", lw=1)
        axis.set_xlim(data.ppm.max(), data.ppm.min())
        axis.set_yticks([])
        axis.set_title(f"{'BCDEFGH'[index]}: cluster {index + 1}, n = {member.sum()} "
                       f"({100 * np.mean(labels[member] == 0):.0f} % labelled healthy)",
                       fontsize=7)
    figure.suptitle(f"Figure 3: k-means ({clusters} clusters) of all {len(x)} spectra", fontsize=10)
    return save_figure(figure, out / "figure3_kmeans.png", dpi=90)


def draw_roc(out: Path, runs: list[dict], settings: Settings, test_labels: dict[int, np.ndarray]
             ) -> Path | None:
    """Fig. 8's model curves: the mean ROC curve (true-positive rate averaged at each
    false-positive rate, ± one std) over the (seed, fold) pairs whose runs saved their test
    scores, for SVM, RF, the plain ResCNN and the proposed model; ``None`` when no run did."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    grid = np.linspace(0, 1, 201)
    curves = []
    for name, members in table_rows(runs, settings):
        if name not in ("SVM", "RF", "Plain ResCNN", "Proposed model (aug-with-both)"):
            continue
        rates = []
        for r in members:
            if "test_scores" in r:
                fpr, tpr, _ = roc_curve(test_labels[r["fold"]], r["test_scores"])
                rates.append(np.interp(grid, fpr, tpr))
        if rates:
            aucs = [r["metrics"]["auc"] for r in members if "test_scores" in r]
            curves.append((f"{name} (AUC {np.mean(aucs):.2f} ± {np.std(aucs):.2f}, "
                           f"n = {len(rates)})", np.array(rates)))
    if not curves:
        return None
    figure = Figure(figsize=(5, 4.6))
    axis = figure.subplots()
    for (name, rates), style in zip(curves, (":", "-.", "--", "-"), strict=False):
        drawn = axis.plot(grid, rates.mean(0), ls=style, label=name)
        axis.fill_between(grid, rates.mean(0) - rates.std(0), rates.mean(0) + rates.std(0),
                          color=drawn[0].get_color(), alpha=0.12)
    axis.plot([0, 1], [0, 1], color="grey", lw=0.5)
    axis.set_xlabel("false-positive rate (1 − specificity)")
    axis.set_ylabel("true-positive rate (sensitivity)")
    axis.legend(fontsize=6, loc="lower right")
    axis.set_title("Figure 8: mean ROC curves over the test folds (no readers here)", fontsize=9)
    return save_figure(figure, out / "figure8_roc.png", dpi=100)


def draw_theta(out: Path, runs: list[dict], settings: Settings) -> Path | None:
    """The θ sweep (:func:`theta_sweep`): share of the training set in ``C`` and the proposed
    model's AUC per θ, a line per (seed, fold) and their mean; ``None`` with one θ."""
    from matplotlib.figure import Figure

    sweep = theta_sweep(runs, settings)
    pairs = sorted({pair for per_pair in sweep.values() for pair in per_pair})
    if len(sweep) < 2 or not pairs:
        return None
    thetas = sorted(sweep)
    figure = Figure(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    for axis, key, scale, name in ((left, "fraction", 100, "C as % of the training set"),
                                   (right, "auc", 1, "proposed model: test AUC")):
        table = np.array([[np.nan if sweep[t][p][key] is None else scale * sweep[t][p][key]
                           for t in thetas] for p in pairs])
        for pair, row in zip(pairs, table, strict=True):
            axis.plot(thetas, row, color="grey", lw=0.6, marker=".",
                      label="one (seed, fold)" if pair == pairs[0] else None)
        means = [column[~np.isnan(column)].mean() if (~np.isnan(column)).any() else np.nan
                 for column in table.T]
        axis.plot(thetas, means, color="black", lw=2, marker="o", label="mean")
        axis.set_xlabel("θ")
        axis.set_ylabel(name)
        axis.legend(fontsize=7)
    left.axhline(30, color="tab:red", ls="--", lw=1)
    left.text(thetas[0], 31, "paper ≈ 30 %", color="tab:red", fontsize=7)
    left.set_title(f"share of the training set in C (E = {settings.source_epoch})", fontsize=8)
    right.set_title("aug-with-both trained on that C", fontsize=8)
    figure.suptitle(f"Distillation threshold θ over {len(pairs)} (seed, fold) pairs",
                    fontsize=10)
    return save_figure(figure, out / "figure_theta.png", dpi=100)


def save_figures(out: Path, runs: list[dict], settings: Settings, data: Any,
                 folds: list[np.ndarray]) -> list[Path]:
    """Every figure that ``runs`` and ``figure_inputs/`` hold the data of (see the module
    docstring); ``folds`` gives the test labels of the ROC curves."""
    from matplotlib.figure import Figure

    paths = [save_mrs_class_means(data, out / "class_means.png", dpi=90),
             draw_kmeans(out, data, settings), *draw_sweeps(out, runs, settings)]
    labels = {k: data.labels[fold].numpy() for k, fold in enumerate(folds)}
    paths += [path for path in (draw_roc(out, runs, settings, labels),
                                draw_theta(out, runs, settings)) if path is not None]
    inputs = out / FIGURE_INPUTS
    if (inputs / "figure4.pt").exists():
        f4 = torch.load(inputs / "figure4.pt")
        figure = Figure(figsize=(10, 4))
        left, right = figure.subplots(1, 2)
        y, marked = f4["labels"].numpy(), f4["distilled"].numpy()
        for c, (light, dark, name) in enumerate((("lightblue", "blue", "healthy"),
                                                 ("pink", "red", "tumour"))):
            points = f4["embedding"].numpy()
            left.scatter(*points[(y == c) & ~marked].T, s=4, c=light, label=f"{name}")
            left.scatter(*points[(y == c) & marked].T, s=6, c=dark, label=f"{name}, distilled")
            distance = f4["distance"].numpy()
            bins = np.linspace(distance.min(), distance.max(), 40)
            for members, colour, tag in (((y == c), light, "all"),
                                         ((y == c) & marked, dark, "distilled")):
                if members.any():
                    right.hist(distance[members], bins=bins, color=colour, alpha=0.6,
                               density=True, label=f"{name}, {tag}")
                    right.axvline(np.median(distance[members]), color=colour, ls="--")
        left.set_title("A: t-SNE of the training set", fontsize=9)
        left.legend(fontsize=7, markerscale=2)
        right.set_title("B: distance to the other class's centre (dashed: medians)", fontsize=9)
        right.legend(fontsize=7)
        figure.suptitle("Figure 4: the distilled set (θ, E of the table; first seed and fold)",
                        fontsize=10)
        paths.append(save_figure(figure, out / "figure4_distillation.png", dpi=100))
    if (inputs / "figure9.pt").exists():
        f9 = torch.load(inputs / "figure9.pt")
        n = len(f9["labels"])
        figure = Figure(figsize=(8, 1.7 * n + 0.4))
        axes = figure.subplots(n, 1, squeeze=False)[:, 0]
        for k, axis in enumerate(axes):
            label = int(f9["labels"][k])
            colour = ("tab:green", "tab:purple")[label]
            axis.plot(data.ppm, f9["spectra"][k].numpy(), color=colour, lw=1)
            cam = f9["cams"][k].numpy()
            scaled = (cam - cam.min()) / (np.ptp(cam) + 1e-12)
            axis.plot(data.ppm, scaled * 2 - 4, color=colour, ls="--", lw=1)
            for name, position in METABOLITE_MARKS:
                if data.ppm.min() <= position <= data.ppm.max():
                    axis.axvline(position, color="grey", lw=0.5, ls=":")
                    if k == 0:
                        axis.text(position, 1.02, name, fontsize=7, ha="center",
                                  va="bottom", transform=axis.get_xaxis_transform())
            axis.set_xlim(data.ppm.max(), data.ppm.min())
            axis.set_yticks([])
            axis.set_ylabel(f"{('healthy', 'tumour')[label]}\n(tissue "
                            f"{('healthy', 'tumour')[int(f9['tissue'][k])]})", fontsize=7)
        axes[-1].set_xlabel("chemical shift (ppm)")
        figure.suptitle("Figure 9: spectra (solid) and class activation maps (dashed), "
                        "metabolites marked", fontsize=9)
        paths.append(save_figure(figure, out / "figure9_cams.png", dpi=100))
    return paths


# -- main --------------------------------------------------------------------------------------


def run_id(record: dict[str, Any]) -> str:
    """A run's identity: its key (kind, seed, fold and options)."""
    return record["key"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every missing run, then write the table and the figures.

    On an ``--out`` with runs, the runs are those of every seed and fold it and this command
    ask for together (extendable settings); the finished ones are reused.

    Returns the runs and the written paths. Ctrl-C keeps every finished run and exits with
    code 130 after one line.
    """
    session = Session(CLI, argv, run_id, render_table)
    settings = session.settings
    # Table 2 on every fold first, then the sweeps (with the first seed, as the paper's figures)
    jobs = [(seed, fold, False) for seed in range(settings.seeds) for fold in settings.run_folds]
    jobs += [(0, fold, True) for fold in settings.sweep_folds]
    paths: list[Path] = []
    with session:
        data = make_mrs(settings.n_spectra, settings.n_patients, seed=settings.data_seed,
                        healthy_fraction=settings.healthy_fraction,
                        tumour_contrast=settings.tumour_contrast, basis=settings.basis,
                        paper_size=settings.paper_size, progress=session.args.progress)
        folds = patient_folds(data.patient_ids, data.labels, settings.folds,
                              seed=settings.data_seed)
        print(f"data: {len(data)} spectra of {len(np.unique(data.patient_ids))} patients, "
              f"{int(data.mislabelled.sum())} mislabelled")
        session.run(jobs, lambda job: fold_runs(session, data, folds, *job,
                                                tuple(session.args.only)),
                    lambda job: f"seed {job[0]}, fold {job[1]}{', sweeps' if job[2] else ''}",
                    desc="Table 2", unit="pass", one_run_per_job=False)
        paths = save_figures(session.out, session.runs, settings, data, folds)
        session.finish(paths)
    return {"runs": session.runs, "paths": paths}


if __name__ == "__main__":
    main()
