"""Reproduce Table 1 and Figure 3 of the skin noisy-label paper on the embedded dermoscopy data,
and measure how well influence finds the flipped labels.

The paper's four methods (:mod:`fastinfluence.robust`: plain cross-entropy "ResNet",
Patrini's forward correction, OUSM, and OUSM + LoOP re-weighting, the paper's method) and two
influence rows beyond the paper (ISR's influence re-weighting, and removal of the 10 % most
harmful training images, both after the OUSM warm-up, influence over the last layer against
the clean validation loss) train a ResNet-18 from scratch on labels corrupted as the paper
did: a reference network trained on a held-out part of the training set (the paper: 1,000 of
3,582 images, here the same fraction) scores the rest, and in each class the top-γ
highest-loss images of that part are flipped, γ ∈ {0, 5, 10, 20, 40} % (``--noise
symmetric`` flips random ones instead). The validation and test sets keep their true labels.
Within a trial every method starts from the same initial weights and batch order. Reported:
mean ± std over trials of the final-epoch test accuracy (threshold 0.5, i.e. the argmax of
two classes) and of the test accuracy at the best-validation epoch (the test set chooses
nothing); and, per γ, the precision at the true noise count and the ROC-AUC of every
mislabel ranking (the plain ResNet's loss, LoOP, self-influence and validation influence,
before the first mining epoch and at the end; OUSM's drop counts; LoOP's last weights).

Outputs in ``--out``: ``runs.json`` (settings, the reference network's accuracy, and every
run with its per-epoch history and detection numbers, rewritten after each run: an
interrupted run resumes where it stopped), ``table.md`` and ``figure3_learning_curves.png``
(training error on the noisy labels and test error per epoch for each γ, plain
cross-entropy, as the paper's Fig. 3).

    python examples/ousm_table1.py --threads 1    # CPU default
    python examples/ousm_table1.py --full         # the paper's sizes (for a GPU)

The CPU default is trimmed from the paper where 2 cores demand it (all flags): 1,500
generated images of 48² split 70/10/20 by patient instead of 4,332 photographs at 224²
(3,582 / 150 / 600, the split ``--full`` uses), a ResNet-18 of width 16 (channels 16–128)
from scratch instead of an ImageNet-initialised ResNet-101 (``--full`` builds torchvision's
ResNet-101, from random initialisation unless ``--weights PATH`` names a local ImageNet
checkpoint: none can be downloaded here), 10 epochs (so LoOP's weights,
drawn before epoch 6 and every 5 after, are drawn once), BatchNorm statistics re-estimated
on the training images after every epoch. The optimiser is the paper's SGD (lr 1e-3,
weight decay 1e-4; momentum 0.9, which the paper does not name); ``--optimizer adam`` is
the ISR/ISP recipe.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinfluence.datasets import (
    flip_labels_by_loss,
    flip_labels_symmetric,
    make_dermoscopy,
    split_by_patient,
)
from fastinfluence.experiments import (
    ExperimentCLI,
    Session,
    format_markdown_table,
    percent_cell,
    save_figure,
    setting,
)
from fastinfluence.models import resnet18, resnet101
from fastinfluence.robust import (
    DETECTORS,
    ForwardConfig,
    ForwardTrainer,
    InfluenceRemovalConfig,
    InfluenceRemovalTrainer,
    ISRConfig,
    ISRTrainer,
    NaiveTrainer,
    OUSMConfig,
    OUSMLoOPConfig,
    OUSMLoOPTrainer,
    OUSMTrainer,
    TrainConfig,
    detection_metrics,
    mislabel_scores,
    reference_losses,
)

PAPER_METHODS = ("resnet", "forward", "ousm", "ousm_loop")
INFLUENCE_METHODS = ("influence_reweight", "influence_removal")
METHODS = PAPER_METHODS + INFLUENCE_METHODS
METHOD_NAMES = {"resnet": "ResNet", "forward": "Patrini (forward)", "ousm": "ResNet+OUSM",
                "ousm_loop": "OUSM + LoOP (the paper's)",
                "influence_reweight": "Influence re-weighting (ISR, ours)",
                "influence_removal": "Influence removal (ours)"}
DETECTOR_NAMES = {"loss": "loss (OUSM's uncertainty)", "loop": "LoOP within label class",
                  "self_influence": "self-influence", "val_influence": "influence on clean val"}
GAMMAS = (0.0, 0.05, 0.1, 0.2, 0.4)
# Table 1 of the paper (accuracy %, one number per cell), by γ.
PAPER_TABLE = {
    "resnet": {0.0: 86.3, 0.05: 82.6, 0.1: 79.1, 0.2: 75.2, 0.4: 65.3},
    "forward": {0.05: 83.2, 0.1: 81.3, 0.2: 79.7, 0.4: 68.4},
    "ousm": {0.05: 82.5, 0.1: 81.2, 0.2: 77.6, 0.4: 73.6},
    "ousm_loop": {0.05: 84.5, 0.1: 83.6, 0.2: 80.7, 0.4: 75.7},
}
PAPER_REFERENCE_FRACTION = 1000 / 3582
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
PAPER_SPLIT_FRACTIONS = (3582 / 4332, 150 / 4332, 600 / 4332)  # the paper's train/val/test


ARCHITECTURES = {"resnet18": resnet18, "resnet101": resnet101}
"""``--arch``: the CPU default's ResNet-18 or the paper's ResNet-101 (torchvision's layout)."""


def check(settings: Settings) -> str | None:
    """What is wrong with ``settings``, if anything."""
    if settings.trials < 1:
        return "--trials must be >= 1"
    if settings.weights is not None and not Path(settings.weights).is_file():
        return f"--weights {settings.weights}: no such file"
    if any(not 0 <= g < 1 for g in settings.gammas):
        return "--gammas must lie in [0, 1)"
    return None


@dataclass
class Settings:
    """Everything that determines the runs (saved in ``runs.json``; resuming needs equality)."""

    methods: list[str] = setting(list(METHODS), nargs="+", choices=METHODS)
    gammas: list[float] = setting(list(GAMMAS), nargs="+", type=float,
                                  normalise=lambda gammas: sorted(set(gammas)),
                                  help="noise rates; only the plain ResNet runs at 0, as in the "
                                       "paper")
    noise: str = setting("loss", choices=["loss", "symmetric"],
                         help="'loss': the paper's top-γ reference-loss flips; 'symmetric': "
                              "random flips")
    trials: int = setting(3, type=int)
    n_images: int | None = setting(None, type=int,
                                   help="None: the data set's 1,500 (--full: 4,332)")
    image_size: int | None = setting(48, 224, type=int)
    paper_size: bool = setting(lambda s: s.full, flag=None)
    split: list[float] = setting(list(SPLIT_FRACTIONS), list(PAPER_SPLIT_FRACTIONS), flag=None,
                                 normalise=list)
    data_seed: int = setting(0, type=int, help="seeds the data set, split and reference")
    width: int = setting(16, 64, type=int, help="the ResNet's first-stage width")
    epochs: int = setting(10, 30, type=int)
    optimizer: str = setting("sgd", choices=["adam", "sgd"],
                             help="the paper's SGD or the ISR/ISP loop's Adam")
    lr: float = setting(1e-3, type=float)
    momentum: float = setting(lambda s: 0.9 if s.optimizer == "sgd" else 0.0, type=float,
                              help="SGD momentum (default 0.9; the paper names none; 0 with "
                                   "Adam)")
    weight_decay: float = setting(1e-4, type=float, help="the paper's 1e-4")
    batch_size: int = setting(32, type=int)
    recalibrate_bn: bool = setting(
        True, flag="--no-recalibrate-bn",
        help="keep BatchNorm's running averages (by default they are re-estimated on the "
             "training images after every epoch)")
    drop: int = setting(2, type=int, help="OUSM K per batch")
    warmup_epochs: int = setting(5, type=int, help="epochs before OUSM drops samples")
    reweight_start: int = setting(5, type=int, help="epochs with all LoOP weights 1")
    reweight_every: int = setting(5, type=int)
    alpha: float = setting(0.5, type=float)
    beta: float = setting(0.5, type=float)
    extent: float = setting(3.0, type=float, help="LoOP extent")
    n_neighbors: int = setting(10, type=int, help="LoOP k")
    estimation_epochs: int = setting(5, type=int, help="forward: epochs before T is estimated")
    percentile: float = setting(97.0, type=float)
    reference_epochs: int = setting(lambda s: s.epochs, type=int,
                                    help="reference network (default: --epochs)")
    damping: float = setting(0.01, type=float, help="influence rows and detection: λ")
    max_weight: float = setting(2.0, type=float, help="influence re-weighting: ISR's m")
    removal_ratio: float = setting(0.1, type=float, help="influence removal: fraction of the "
                                                         "training set removed after warm-up")
    arch: str = setting("resnet18", "resnet101", choices=list(ARCHITECTURES), absent="resnet18",
                        help="the network (--full: the paper's resnet101)")
    weights: str | None = setting(None, absent=None, metavar="PATH",
                                  help="a local state-dict file the network starts from, e.g. "
                                       "torchvision's ImageNet checkpoint of --arch (the paper "
                                       "fine-tunes ImageNet weights; default: random "
                                       "initialisation)")


def initialisation_note(settings: Settings) -> str | None:
    """What a ResNet-101 run without ``--weights`` means (``None`` for other runs)."""
    if settings.arch != "resnet101" or settings.weights is not None:
        return None
    return ("note: ResNet-101 from random initialisation (no --weights): the paper fine-tunes "
            "ImageNet weights, which cannot be downloaded here; torchvision's resnet101 "
            "checkpoint saved with torch.save(model.state_dict(), PATH) loads with --weights "
            "PATH. Without it the runs are not the paper's setting.")


def build_network(settings: Settings) -> torch.nn.Module:
    """A fresh two-class ``--arch`` network, from ``--weights`` when given (its ``fc`` stays
    freshly initialised: the file's head has 1,000 classes)."""
    return ARCHITECTURES[settings.arch](2, width=settings.width, weights=settings.weights)


CLI = ExperimentCLI(Settings, __doc__, "examples/ousm_table1.py",
                    Path("examples/results/ousm_table1"), check=check)
parse_args = CLI.parse_args
settings_from = CLI.settings_from


def jobs_of(settings: Settings) -> list[tuple[int, float, str]]:
    """(trial, γ, method) in run order; at γ = 0 only the plain ResNet (Table 1's "–")."""
    return [(trial, gamma, method) for trial in range(settings.trials)
            for gamma in settings.gammas for method in settings.methods
            if gamma > 0 or method == "resnet"]


@dataclass
class Data:
    """The clean splits and, per γ, the noisy training labels and which were flipped."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    noisy: dict[float, tuple[torch.Tensor, torch.Tensor]]
    reference_accuracy: float | None


def load_data(settings: Settings, device: str, progress: bool) -> Data:
    data = make_dermoscopy(settings.n_images, image_size=settings.image_size,
                           seed=settings.data_seed, paper_size=settings.paper_size,
                           progress=progress)
    split = split_by_patient(data.patient_ids, data.labels, settings.split,
                             seed=settings.data_seed)
    train, val, test = (data.subset(index) for index in (split.train, split.val, split.test))
    x, y = train.images, train.labels
    noisy: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    accuracy = None
    if settings.noise == "loss":
        torch.manual_seed(settings.data_seed)
        reference = reference_losses(
            build_network(settings), (x, y),
            max(1, round(PAPER_REFERENCE_FRACTION * len(y))),
            TrainConfig(**train_settings(settings, settings.data_seed, device),
                        epochs=settings.reference_epochs),
            seed=settings.data_seed,
        )
        accuracy = reference.accuracy
        for gamma in settings.gammas:
            noisy[gamma] = flip_labels_by_loss(y, reference.losses, gamma, 2,
                                               candidates=reference.candidates)
    else:
        for gamma in settings.gammas:
            noisy[gamma] = flip_labels_symmetric(y, gamma, 2, seed=settings.data_seed)
    return Data(train=(x, y), val=(val.images, val.labels), test=(test.images, test.labels),
                noisy=noisy, reference_accuracy=accuracy)


def train_settings(settings: Settings, seed: int, device: str) -> dict[str, Any]:
    """The TrainConfig fields every network of the run shares (epochs not included)."""
    return dict(optimizer=settings.optimizer, lr=settings.lr, momentum=settings.momentum,
                weight_decay=settings.weight_decay, batch_size=settings.batch_size, seed=seed,
                recalibrate_bn=settings.recalibrate_bn, device=device)


class ScoringNaiveTrainer(NaiveTrainer):
    """The plain ResNet row, which also ranks its training samples as mislabelled
    (:func:`fastinfluence.robust.mislabel_scores`) before epoch ``at`` — when OUSM starts
    mining and LoOP's first weights are drawn — leaving the training untouched."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, at: int,
                 options: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.at = at
        self.options = options
        self.scores_at_warmup: Any = None

    def before_epoch(self, epoch: int) -> None:
        if epoch == self.at:
            assert self.train_data is not None and self.val_data is not None
            self.scores_at_warmup = mislabel_scores(self.model, self.train_data,
                                                    self.val_data, **self.options)


def detection_options(settings: Settings, device: str) -> dict[str, Any]:
    """Keyword arguments of :func:`mislabel_scores` (LoOP's and the influence's)."""
    return dict(extent=settings.extent, n_neighbors=settings.n_neighbors,
                damping=settings.damping, device=device)


def make_trainer(method: str, settings: Settings, model: torch.nn.Module, trial: int,
                 device: str) -> Any:
    common = dict(epochs=settings.epochs, **train_settings(settings, trial, device))
    ousm = dict(drop=settings.drop, warmup_epochs=settings.warmup_epochs)
    influence = dict(pretrain_epochs=settings.warmup_epochs, damping=settings.damping)
    if method == "resnet":
        return ScoringNaiveTrainer(model, TrainConfig(**common), settings.warmup_epochs,
                                   detection_options(settings, device))
    if method == "influence_reweight":
        return ISRTrainer(model, ISRConfig(**common, **influence,
                                           max_weight=settings.max_weight))
    if method == "influence_removal":
        return InfluenceRemovalTrainer(model, InfluenceRemovalConfig(
            **common, **influence, ratio=settings.removal_ratio))
    if method == "forward":
        return ForwardTrainer(model, ForwardConfig(
            **common, estimation_epochs=settings.estimation_epochs,
            percentile=settings.percentile))
    if method == "ousm":
        return OUSMTrainer(model, OUSMConfig(**common, **ousm))
    return OUSMLoOPTrainer(model, OUSMLoOPConfig(
        **common, **ousm, alpha=settings.alpha, beta=settings.beta,
        reweight_start=settings.reweight_start, reweight_every=settings.reweight_every,
        extent=settings.extent, n_neighbors=settings.n_neighbors))


def method_summary(trainer: Any, flipped: torch.Tensor,
                   options: dict[str, Any]) -> dict[str, Any]:
    """What each method did, in numbers: its transition matrix, how its mislabel signal
    (OUSM's drop counts, LoOP's weights, influence) sits on the flipped samples, and in
    ``detection`` the precision at the noise count and ROC-AUC of every ranking it has
    (:data:`DETECTION_ROWS`; the plain ResNet's four rankings at warm-up and at the end)."""
    summary: dict[str, Any] = {}
    detection: dict[str, dict[str, float]] = {}
    noisy = bool(flipped.any())

    def rank(key: str, suspicion: torch.Tensor) -> None:
        if noisy:
            detection[key] = detection_metrics(suspicion.double(), flipped)

    if isinstance(trainer, ScoringNaiveTrainer):
        assert trainer.train_data is not None and trainer.val_data is not None
        final = mislabel_scores(trainer.model, trainer.train_data, trainer.val_data, **options)
        summary["scoring"] = final.scoring
        for when, found in (("warm-up", trainer.scores_at_warmup), ("final", final)):
            for name, suspicion in ({} if found is None else found.scores).items():
                rank(f"{name}@{when}", suspicion)
    if isinstance(trainer, ForwardTrainer) and trainer.transition is not None:
        summary["transition"] = trainer.transition.tolist()
    if isinstance(trainer, OUSMTrainer) and trainer.drop_counts is not None:
        counts = trainer.drop_counts.double()
        summary["drops_per_flipped"] = float(counts[flipped].mean()) if noisy else None
        summary["drops_per_clean"] = float(counts[~flipped].mean())
        rank("ousm_drops", counts)
    if isinstance(trainer, OUSMLoOPTrainer) and trainer.weights is not None:
        weights = trainer.weights.double()
        summary["weight_flipped"] = float(weights[flipped].mean()) if noisy else None
        summary["weight_clean"] = float(weights[~flipped].mean())
        rank("loop_weights", 1 - weights)
    if isinstance(trainer, ISRTrainer | InfluenceRemovalTrainer):
        # Its influence ranking is the plain ResNet's "val_influence@warm-up": the same
        # initial weights, batch order and warm-up epochs give the same model.
        summary["scoring"] = trainer.scoring
    if isinstance(trainer, InfluenceRemovalTrainer) and trainer.removed is not None:
        summary["removed_flipped_fraction"] = float(flipped[trainer.removed].double().mean())
        summary["flipped_removed_fraction"] = (
            float(flipped[trainer.removed].sum() / flipped.sum()) if noisy else None)
    if detection:
        summary["detection"] = detection
    return summary


DETECTION_ROWS = (
    *((f"{name}@{when}", f"{DETECTOR_NAMES[name]}, plain ResNet at {when}")
      for when in ("warm-up", "final") for name in DETECTORS),
    ("ousm_drops", "OUSM: times dropped"),
    ("loop_weights", "OUSM + LoOP: 1 − λ (last weights)"),
)
"""The rankings of the detection table: key in ``method_summary["detection"]``, label."""


def run_record(method: str, gamma: float, trial: int, result: Any,
               summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method, "gamma": gamma, "trial": trial, "seconds": result.seconds,
        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
        "final": result.final_test_accuracy, "at_best_val": result.test_accuracy_at_best_val,
        "history": [asdict(record) for record in result.history], "method_summary": summary,
    }






# -- the table -------------------------------------------------------------------------------




def chance_precision(meta: dict[str, Any], settings: Settings) -> str:
    """The flipped fraction of the training set per noisy γ, in percent."""
    return " / ".join(f"{100 * meta['flipped_fraction'][str(g)]:.1f} %"
                      for g in settings.gammas if g > 0)


def scorings(runs: list[dict]) -> set[str]:
    """Which influence scoring passes ran (``report.scoring``), over all runs."""
    return {r["method_summary"]["scoring"] for r in runs if r["method_summary"].get("scoring")}


def gamma_header(first: str, gammas: list[float]) -> list[str]:
    """A table header: ``first``, then one column per noise rate."""
    return [first, *(f"{100 * g:g} %" for g in gammas)]


def table_cell(values: list[float]) -> str:
    """One decimal, as the paper's table."""
    return percent_cell(values, digits=1)


def markdown_table(runs: list[dict], settings: Settings, which: str) -> str:
    lines = []
    values = {(m, g): [r[which] for r in runs if r["method"] == m and r["gamma"] == g]
              for m in settings.methods for g in settings.gammas}
    best = {g: max((np.mean(values[m, g]) for m in settings.methods if values[m, g]),
                   default=None) for g in settings.gammas}
    for method in settings.methods:
        cells = []
        for gamma in settings.gammas:
            found = values[method, gamma]
            text = table_cell(found)
            bold = found and np.mean(found) == best[gamma] and gamma > 0
            cells.append(f"**{text}**" if bold else text)
        lines.append([METHOD_NAMES[method], *cells])
    return format_markdown_table(gamma_header("Noise ratio", settings.gammas), lines)


def paper_table(settings: Settings) -> str:
    return format_markdown_table(
        gamma_header("Noise ratio", settings.gammas),
        [[METHOD_NAMES[method], *(f"{PAPER_TABLE[method][g]:.1f}" if g in PAPER_TABLE[method]
                                  else "–" for g in settings.gammas)]
         for method in PAPER_METHODS])


def paired_table(runs: list[dict], settings: Settings, which: str) -> str:
    """Each method minus the plain ResNet of the same trial and γ (points), and in how many
    trials it is better."""
    gammas = [g for g in settings.gammas if g > 0]
    lines = []
    plain = {(r["trial"], r["gamma"]): r[which] for r in runs if r["method"] == "resnet"}
    for method in settings.methods:
        if method == "resnet":
            continue
        cells = []
        for gamma in gammas:
            differences = [r[which] - plain[r["trial"], gamma] for r in runs
                           if r["method"] == method and r["gamma"] == gamma
                           and (r["trial"], gamma) in plain]
            better = sum(d > 0 for d in differences)
            cells.append("–" if not differences else
                         f"{100 * np.mean(differences):+.1f} ({better}/{len(differences)})")
        lines.append([METHOD_NAMES[method], *cells])
    return format_markdown_table(gamma_header("Method − ResNet", gammas), lines)


def detection_table(runs: list[dict], settings: Settings) -> str:
    """Precision at the noise count / ROC-AUC (%, mean over trials) of each ranking, by γ."""
    gammas = [g for g in settings.gammas if g > 0]
    lines = []
    for key, label in DETECTION_ROWS:
        cells, found_any = [], False
        for gamma in gammas:
            found = [r["method_summary"]["detection"][key] for r in runs
                     if r["gamma"] == gamma and key in r["method_summary"].get("detection", {})]
            found_any |= bool(found)
            cells.append("–" if not found else
                         f"{100 * np.mean([f['precision'] for f in found]):.0f} / "
                         f"{100 * np.mean([f['auc'] for f in found]):.0f}")
        if found_any:
            lines.append([label, *cells])
    return format_markdown_table(gamma_header("Ranking (higher = more suspect)", gammas), lines)


def render_table(settings: Settings, runs: list[dict], meta: dict[str, Any]) -> str:
    """``table.md``, from what ``runs.json`` holds."""
    minutes = sum(r["seconds"] for r in runs) / 60
    summaries = []
    for method in settings.methods:
        for gamma in settings.gammas:
            numbers = [r["method_summary"] for r in runs
                       if r["method"] == method and r["gamma"] == gamma and r["method_summary"]]
            scalar = [k for k in (numbers[0] if numbers else {})
                      if all(isinstance(n[k], float) for n in numbers)]
            if scalar:
                summaries.append(f"- {METHOD_NAMES[method]}, γ = {gamma:g}: " + ", ".join(
                    f"{k} {np.mean([n[k] for n in numbers]):.3g}" for k in scalar))
    return f"""# Skin noisy-label Table 1 on the embedded dermoscopy data

Command: `{meta['command']}`
({len(runs)} runs, trials {sorted({r['trial'] for r in runs})}, {minutes:.1f} min on
{meta['machine']}; reference network accuracy on the scored part:
{meta.get('reference_accuracy')}; test majority-class rate {meta.get('majority_rate')}.)
Settings: {json.dumps(asdict(settings))}

Test accuracy (%, clean test labels), mean ± std (population std) over trials; best of each
noisy column in bold.

## Final epoch

{markdown_table(runs, settings, "final")}

## At the best-validation epoch (clean validation labels; the test set chooses nothing)

{markdown_table(runs, settings, "at_best_val")}

## Against the plain ResNet of the same trial (points; trials better in brackets)

Final epoch:

{paired_table(runs, settings, "final")}

At the best-validation epoch:

{paired_table(runs, settings, "at_best_val")}

## The paper's Table 1 (ISIC 2017 + archive, 224², ImageNet ResNet-101; for comparison)

{paper_table(settings)}

## Finding the flipped labels: precision at the noise count / ROC-AUC (%)

Every training image is ranked by how likely its label is flipped; precision counts the
flipped images among the top k (k = the number flipped, so it equals recall there; ties at
the cut shared), ROC-AUC is the chance that a flipped image outranks a clean one; mean over
trials. Chance: AUC 50, precision = the flipped fraction of the training set
({chance_precision(meta, settings)}). The plain ResNet's rankings are taken before epoch
{settings.warmup_epochs + 1} (when OUSM starts and LoOP's first weights are drawn; the
influence rows remove or re-weight by exactly that "influence on clean val" ranking: same
initial weights, same batches) and after the last epoch. Influence over the last layer
(scoring pass: {"; ".join(sorted(scorings(runs))) or "–"}).

{detection_table(runs, settings)}

## What the methods did (mean over trials)

{chr(10).join(summaries)}
"""


def save_learning_curves(path: Path, runs: list[dict], settings: Settings) -> Path | None:
    """Fig. 3: training error (noisy labels) and test error per epoch of the plain ResNet."""
    from matplotlib.figure import Figure

    curves = {g: [r for r in runs if r["method"] == "resnet" and r["gamma"] == g]
              for g in settings.gammas}
    curves = {g: rs for g, rs in curves.items() if rs}
    if not curves:
        return None
    figure = Figure(figsize=(9, 3.4))
    train_axis, test_axis = figure.subplots(1, 2)
    for gamma, group in curves.items():
        train = np.mean([[1 - e["test_accuracies"]["train (noisy labels)"]
                          for e in r["history"]] for r in group], 0)
        test = np.mean([[1 - e["test_accuracies"]["test"] for e in r["history"]]
                        for r in group], 0)
        epochs = np.arange(1, len(train) + 1)
        train_axis.plot(epochs, 100 * train, label=f"{100 * gamma:g} %")
        test_axis.plot(epochs, 100 * test, label=f"{100 * gamma:g} %")
    for axis, title in ((train_axis, "training error (noisy labels)"),
                        (test_axis, "test error (true labels)")):
        axis.set_xlabel("epoch")
        axis.set_ylabel("error (%)")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7, title="noise", title_fontsize=7)
    flips = "loss-ranked" if settings.noise == "loss" else "random"
    trials = len({r["trial"] for group in curves.values() for r in group})
    figure.suptitle(f"Fig. 3: the plain ResNet under {flips} label flips, by noise rate "
                    f"(mean of {trials} trials)", fontsize=10)
    return save_figure(figure, path, dpi=110)


# -- main ------------------------------------------------------------------------------------


def run_id(record: dict[str, Any]) -> tuple[int, float, str]:
    """A run's identity: its trial, noise rate and method."""
    return record["trial"], record["gamma"], record["method"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every missing (trial, γ, method), then write the table and the figure.

    Returns the runs and the figure's path. Ctrl-C keeps every finished run and exits with
    code 130 after one line.
    """
    session = Session(CLI, argv, run_id, render_table)
    settings, meta, device = session.settings, session.meta, session.device
    figure = None
    note = initialisation_note(settings)
    if note is not None and not session.args.no_train:
        print(note)
    with session:
        if not session.args.no_train:  # the data (and its reference network) are for training
            start = time.perf_counter()
            data = load_data(settings, device, session.args.progress)
            meta["reference_accuracy"] = (None if data.reference_accuracy is None
                                          else round(data.reference_accuracy, 4))
            melanoma = float(data.test[1].double().mean())
            meta["majority_rate"] = round(max(melanoma, 1 - melanoma), 4)
            meta["images"] = {name: len(split[1]) for name, split in
                              (("train", data.train), ("val", data.val), ("test", data.test))}
            meta["flipped"] = {str(g): int(flipped.sum())
                               for g, (_, flipped) in data.noisy.items()}
            meta["flipped_fraction"] = {str(g): round(float(flipped.double().mean()), 4)
                                        for g, (_, flipped) in data.noisy.items()}
            print(f"data: {meta['images']} images at {data.train[0].shape[-1]}², flipped "
                  f"{meta['flipped']} ({time.perf_counter() - start:.0f} s)")

        def work(job: tuple[int, float, str]) -> None:
            trial, gamma, method = job
            if session.done(job):
                return
            noisy_labels, flipped = data.noisy[gamma]
            train = (data.train[0], noisy_labels)
            tests = {"test": data.test}
            if method == "resnet":  # Fig. 3's training error: only the plain ResNet's is drawn
                tests["train (noisy labels)"] = train
            torch.manual_seed(trial)  # the same initial weights for every method of a trial
            model = build_network(settings)
            trainer = make_trainer(method, settings, model, trial, device)
            result = trainer.fit(train, data.val, tests)
            summary = method_summary(trainer, flipped, detection_options(settings, device))
            session.save(run_record(method, gamma, trial, result, summary))

        session.run(jobs_of(settings), work,
                    lambda job: f"trial {job[0]}, γ {job[1]:g}, {METHOD_NAMES[job[2]]}",
                    desc="Table 1")
        figure = save_learning_curves(session.out / "figure3_learning_curves.png", session.runs,
                                      settings)
        session.finish([figure] if figure is not None else [])
    return {"runs": session.runs, "figure": figure}


if __name__ == "__main__":
    main()
