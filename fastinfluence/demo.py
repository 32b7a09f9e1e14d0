"""The project's main job, end to end: ``python -m fastinfluence demo``.

1. Generate the embedded brain-tumour set (:func:`fastinfluence.datasets.make_brain_tumour`),
   split it by patient (:data:`SPLIT_FRACTIONS`), add Gaussian noise (σ = 32 on 0–255) to
   every image, then flip a fraction of the training labels
   (:func:`~fastinfluence.datasets.flip_labels_symmetric`). The validation labels stay true:
   that set is the trusted one. Its images carry the training images' noise, because a
   network trained on σ = 32 noise does not carry over to clean images at this size
   (``examples/calibrate_brain_tumour.py``: one class, 33 % on clean 64² images), so a
   clean validation set would measure that gap instead.
2. Train :class:`fastinfluence.models.PaperCNN` with Adam on the shared loop
   (:class:`~fastinfluence.robust.NaiveTrainer`, no flips), re-estimating BatchNorm's
   running averages on the training images after every epoch (``recalibrate_bn``): after a
   few epochs the lagging averages can make every eval-mode prediction one class.
3. Rank every training sample by :func:`fastinfluence.robust.mislabel_scores` (over the last
   layer, ``params="last"``): self-influence ``∇l(z)ᵀH_λ⁻¹∇l(z)``, influence ``I(z)`` on the
   validation loss (positive = harmful), loss and LoOP.
4. Say in plain words whether the model learned (validation accuracy against guessing and
   against always answering the most common training class) and how many planted flips
   each ranking puts in its top ``k`` and in its top ``n_flipped``, against chance; save a
   PNG of the ``k`` highest self-influences and the ``k`` most harmful samples (flipped
   labels framed in red) and a JSON summary.

The defaults (64², 480 slices of 96 patients, 10 % flips, 2 epochs of Adam at batch 16) take
about 35 s on one CPU thread (data 12 s, training 10 s, influence 4 s). On seeds 0/1/2 the
validation accuracy is 0.65/0.45/0.76 (always the most common class: 0.40/0.27/0.44), and
6/7/8 of the 8 highest self-influences are planted flips (chance: 0.8).
Self-influence is the headline ranking because it finds the flips on every seed tried, while
``I(z)`` on the validation loss puts flipped samples at both ends of its range (ROC-AUC
0.44–0.56 on those seeds): it measures what a sample does to these validation images' loss,
not whether its label is right.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastinfluence._optional import require
from fastinfluence.datasets import (
    add_noise,
    flip_labels_symmetric,
    make_brain_tumour,
    split_by_patient,
)
from fastinfluence.models import PaperCNN
from fastinfluence.robust import NaiveTrainer, TrainConfig, detection_metrics, mislabel_scores

SPLIT_FRACTIONS = (0.75, 0.25, 0.0)
"""Train/val/test fractions of the patients. The paper's 75/5/20 leaves ~25 validation
images from ~6 patients: their accuracy ranged from 0.29 to 0.75 over the seeds and settings
tried, and their loss, the influence target, is a handful of images. No test split: the
validation patients are never trained on and their images are drawn like the training
images, so their accuracy is the held-out accuracy; a test split would only cost generation
and a forward pass."""

HEADLINE = "self_influence"
"""The ranking the plain-words result and the figure's first row use (see the module
docstring for why)."""

RANKING_NAMES = {
    "self_influence": "self-influence",
    "val_influence": "influence on the validation loss",
    "loss": "training loss",
    "loop": "LoOP outlier probability",
}
"""Plain names of the rankings of :func:`fastinfluence.robust.mislabel_scores`."""

LOOP_NEIGHBOURS = 10
"""Neighbours per LoOP estimate (the skin paper's value): every training class needs more
samples than this."""


class DemoSizeError(ValueError):
    """The generated data are too small for the demo's rankings (raised before training)."""


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the ``demo`` subcommand's options).

    Attributes:
        seed: seeds the data, the noise, the label flips and the training.
        epochs: training epochs.
        image_size: side of the square images (a multiple of 32).
        label_noise: fraction of each training class whose label is flipped.
        n_slices: slices to generate (``None``: the generator's default).
        n_patients: patients to generate (``None``: the generator's default).
        lr: Adam learning rate.
        batch_size: training batch size.
        top_k: how many samples of each ranking to list and draw.
        out: the PNG's path; ``summary.json`` goes in the same folder.
        progress: show progress bars.
        device: where to train and score (``None``: CUDA when available, else CPU).
    """

    seed: int = 0
    epochs: int = 2
    image_size: int = 64
    label_noise: float = 0.1
    n_slices: int | None = 480
    n_patients: int | None = 96
    lr: float = 1e-3
    batch_size: int = 16
    top_k: int = 8
    out: Path = Path("runs/demo/influence_demo.png")
    progress: bool = True
    device: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range (before any work)."""
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        for name in ("epochs", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("n_slices", "n_patients"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer or None, "
                                 f"got {getattr(self, name)}")
        # PaperCNN owns the size rule (one 2x2 pool per block); an invalid size fails before
        # it allocates anything.
        PaperCNN(image_size=self.image_size)


@dataclass
class _Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor  # the labels trained on (some flipped)
    y_train_true: torch.Tensor
    flipped: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    class_names: tuple[str, ...]


def _make_data(config: DemoConfig, log: Any) -> _Splits:
    start = time.perf_counter()
    data = make_brain_tumour(
        config.n_slices, config.n_patients, config.image_size, seed=config.seed,
        progress=config.progress,
    )
    split = split_by_patient(data.patient_ids, data.labels, SPLIT_FRACTIONS, seed=config.seed)
    train, val = data.subset(split.train), data.subset(split.val)
    num_classes = len(data.class_names)
    y_train, flipped = flip_labels_symmetric(
        train.labels, config.label_noise, num_classes, seed=config.seed
    )
    log(
        f"data: {len(data)} slices of {config.image_size}² from "
        f"{len(set(data.patient_ids))} patients in {time.perf_counter() - start:.1f} s; "
        f"train/val {len(train)}/{len(val)} by patient; gaussian noise (sigma 32) on every "
        f"image; {int(flipped.sum())} training labels flipped ({config.label_noise:.0%} per "
        f"class), the val labels true"
    )
    return _Splits(
        x_train=add_noise(train.images, "gaussian", seed=config.seed),
        y_train=y_train,
        y_train_true=train.labels,
        flipped=flipped,
        x_val=add_noise(val.images, "gaussian", seed=config.seed + 1),
        y_val=val.labels,
        class_names=data.class_names,
    )


def _train(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
           val: tuple[torch.Tensor, torch.Tensor], config: DemoConfig,
           device: torch.device) -> None:
    """Adam on the shared loop (:class:`~fastinfluence.robust.NaiveTrainer`): seeded
    batches, no flips, BatchNorm recalibrated over the training images in batches of
    ``batch_size`` after every epoch; the model is left in eval mode. ``val`` is only
    evaluated (the loop's report; the demo has no test split, so it stands in for one)."""
    settings = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                           seed=config.seed, flip=False, recalibrate_bn=True,
                           eval_batch_size=config.batch_size, progress=config.progress,
                           device=str(device))
    NaiveTrainer(model, settings).fit(train, val, val)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([model(part.to(device)).argmax(1).cpu() for part in x.split(256)])


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).double().mean())


def _rows(order: torch.Tensor, splits: _Splits, scores: dict[str, torch.Tensor],
          predicted: dict[int, int]) -> list[dict[str, Any]]:
    return [
        {
            "index": int(i),
            "label": int(splits.y_train[i]),
            "true_label": int(splits.y_train_true[i]),
            "predicted": predicted[int(i)],
            "self_influence": float(scores["self_influence"][i]),
            "val_influence": float(scores["val_influence"][i]),
            "flipped": bool(splits.flipped[i]),
        }
        for i in order
    ]


def _precision_at(k: int, order: torch.Tensor, flipped: torch.Tensor) -> dict[str, Any]:
    """precision@k: the fraction of the first ``k`` samples of ``order`` whose label was
    flipped.

    Its chance level is the flipped fraction of the training set, the expected precision of a
    ranking in random order.
    """
    found = int(flipped[order[:k]].sum())
    return {
        "k": k,
        "flipped_found": found,
        "precision": found / k,
        "chance_precision": float(flipped.double().mean()),
    }


def _result(val_accuracy: float, num_classes: int, majority: dict[str, Any],
            orders: dict[str, torch.Tensor], k: int, scores: dict[str, torch.Tensor],
            flipped: torch.Tensor) -> dict[str, Any]:
    """The plain-words result, computed from the run's numbers only.

    ``uniform_guess`` is ``1 / num_classes``; ``majority`` is the constant guess (the most
    common given training label) and its validation accuracy; ``top_k`` holds, for each
    ranking in ``orders`` (sample indices, most suspect first), :func:`_precision_at` ``k``
    and the flips a random pick of ``k`` would hold; ``detection`` holds, per ranking of
    ``scores``, :func:`fastinfluence.robust.detection_metrics` (precision at the flip count,
    ties at the cut by their share, and ROC-AUC), or is ``None`` when no label, or every
    label, was flipped.
    """
    n_flipped, n_train = int(flipped.sum()), len(flipped)
    detection = (
        {name: detection_metrics(values, flipped) for name, values in scores.items()}
        if 0 < n_flipped < n_train else None
    )
    return {
        "val_accuracy": val_accuracy,
        "uniform_guess": 1 / num_classes,
        "majority": majority,
        "top_k": {name: {**_precision_at(k, order, flipped),
                         "expected_by_chance": k * n_flipped / n_train}
                  for name, order in orders.items()},
        "n_flipped": n_flipped,
        "n_train": n_train,
        "detection": detection,
    }


def _result_lines(result: dict[str, Any], figure: Path) -> list[str]:
    majority, n_flipped = result["majority"], result["n_flipped"]
    lines = [
        f"result: validation accuracy {result['val_accuracy']:.2f}, where guessing scores "
        f"{result['uniform_guess']:.2f} and always answering {majority['class_name']} (the "
        f"most common training label) {majority['val_accuracy']:.2f}."
    ]
    if result["detection"] is None:
        lines.append(f"  {n_flipped} of {result['n_train']} training labels were flipped: "
                     "there is no mix of flipped and true labels to rank.")
    else:
        for name, entry in result["top_k"].items():
            k, found, expected = entry["k"], entry["flipped_found"], entry["expected_by_chance"]
            lines.append(
                f"  {found} of the {k} training samples with the highest "
                f"{RANKING_NAMES[name]} carry a planted flipped label; a random pick of {k} "
                f"would hold {expected:.1f} ({found / expected:.1f}x chance)."
            )
        lines.append(f"  each ranking's {n_flipped} highest (as many as labels were flipped; "
                     f"chance {n_flipped / result['n_train']:.0%}):")
        for name, metrics in result["detection"].items():
            lines.append(f"    {RANKING_NAMES[name]}: {metrics['precision']:.0%} flipped, "
                         f"ROC-AUC {metrics['auc']:.2f}")
    lines.append(f"  figure: {figure} (first row: highest {RANKING_NAMES[HEADLINE]}; "
                 "second: most harmful to the validation loss; flipped labels framed in red)")
    return lines


_SCORE_LABELS = {"self_influence": "SI", "val_influence": "I"}


def _save_figure(figure_class: type, path: Path, splits: _Splits,
                 rows: list[tuple[str, str, list[dict[str, Any]]]], title: str) -> None:
    columns = max(len(entries) for _, _, entries in rows)
    figure = figure_class(figsize=(1.9 * columns, 0.6 + 2.6 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    names = splits.class_names
    for row, (row_title, score_key, entries) in enumerate(rows):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(entries):
                axis.set_axis_off()
                continue
            entry = entries[column]
            axis.imshow(splits.x_train[entry["index"], 0].numpy(), cmap="gray", vmin=0, vmax=1)
            text = (f"#{entry['index']} y={names[entry['label']][:4]}\n"
                    f"pred={names[entry['predicted']][:4]} "
                    f"{_SCORE_LABELS[score_key]}={entry[score_key]:.3g}")
            colour = "black"
            if entry["flipped"]:
                text += f"\nFLIPPED (true {names[entry['true_label']][:4]})"
                colour = "red"
                for spine in axis.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2.5)
            axis.set_title(text, fontsize=7, color=colour)
        axes[row, 0].set_ylabel(row_title, fontsize=8)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def _table(title: str, rows: list[dict[str, Any]], names: tuple[str, ...]) -> list[str]:
    lines = [title, f"  {'index':>6} {'label':<11} {'predicted':<11} {'self-infl.':>11} "
                    f"{'val infl.':>11}  flipped"]
    for r in rows:
        flipped = f"YES (true {names[r['true_label']]})" if r["flipped"] else ""
        lines.append(f"  {r['index']:>6} {names[r['label']]:<11} {names[r['predicted']]:<11} "
                     f"{r['self_influence']:>11.4g} {r['val_influence']:>11.4g}  {flipped}")
    return lines


def run_demo(config: DemoConfig, log: Any = print) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return its summary.

    Args:
        config: the settings.
        log: called with each line of the printed report (``print`` by default).

    Returns:
        The summary also written to ``summary.json`` next to ``config.out``: the settings,
        accuracies, the influence report (path, solver, residual, seconds per stage), the
        ``k`` highest self-influences and most harmful samples,
        ``result`` (the plain-words result: see :func:`_result`), every ranking's score per
        training sample, which training labels were flipped, the given training labels, the
        validation labels and predictions, and the output paths.

    Raises:
        ValueError: a setting out of range (:meth:`DemoConfig.validate`).
        DemoSizeError: a training class with too few samples for LoOP, before training.
        ImportError: matplotlib is missing; raised before any data is generated.
    """
    config.validate()
    # The figure is drawn last: fail now, not after the training, when matplotlib is missing.
    figure_class = require(
        "matplotlib.figure", "matplotlib", "examples", "the demo's figure"
    ).Figure
    total_start = time.perf_counter()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    splits = _make_data(config, log)
    counts = torch.bincount(splits.y_train, minlength=len(splits.class_names))
    if int(counts.min()) <= LOOP_NEIGHBOURS:
        smallest = int(counts.argmin())
        raise DemoSizeError(
            f"the training set ({len(splits.y_train)} samples) has only "
            f"{int(counts.min())} of class {splits.class_names[smallest]!r}; the LoOP "
            f"ranking needs more than {LOOP_NEIGHBOURS} per class: generate more slices "
            "(--slices)"
        )

    model = PaperCNN(image_size=config.image_size, num_classes=len(splits.class_names))
    model.to(device)
    start = time.perf_counter()
    _train(model, (splits.x_train, splits.y_train), (splits.x_val, splits.y_val), config,
           device)
    train_seconds = time.perf_counter() - start
    val_predicted = _predict(model, splits.x_val, device)
    val_accuracy = _accuracy(val_predicted, splits.y_val)
    log(f"training: {config.epochs} epoch(s) in {train_seconds:.1f} s on {device}; "
        f"validation accuracy {val_accuracy:.3f}")

    start = time.perf_counter()
    ranked = mislabel_scores(model, (splits.x_train, splits.y_train),
                             (splits.x_val, splits.y_val), n_neighbors=LOOP_NEIGHBOURS,
                             device=device)
    influence_seconds = time.perf_counter() - start
    scores = {name: values.cpu() for name, values in ranked.scores.items()}
    report = ranked.report
    n_train = len(splits.y_train)
    seconds = dict(report.seconds)
    log(f"influence: path {report.path}, solver {report.solver}, {report.num_params} "
        f"parameters, relative residual {report.solve.relative_residual:.2e} "
        f"(converged: {report.solve.converged})")
    log("  seconds: " + ", ".join(f"{stage} {value:.4f}" for stage, value in seconds.items())
        + f"; {influence_seconds:.3f} s for the four rankings (loss, LoOP, influence, "
        "self-influence)")

    k = min(config.top_k, n_train)
    # The figure's rows: the headline ranking and the classic "most harmful" one.
    orders = {name: torch.argsort(scores[name], descending=True)
              for name in (HEADLINE, "val_influence")}
    # Predictions only for the listed samples: at 64² a forward pass over the training set
    # costs as much as a third of an epoch.
    listed = torch.cat([order[:k] for order in orders.values()])
    predicted = dict(zip(listed.tolist(), _predict(model, splits.x_train[listed], device)
                         .tolist(), strict=True))
    suspects = _rows(orders[HEADLINE][:k], splits, scores, predicted)
    harmful = _rows(orders["val_influence"][:k], splits, scores, predicted)
    for line in (_table(f"{k} highest self-influence (the most suspect labels):", suspects,
                        splits.class_names)
                 + _table(f"{k} most harmful to the validation loss (largest influence "
                          "I(z)):", harmful, splits.class_names)):
        log(line)

    out = Path(config.out)
    summary_path = out.with_name("summary.json")
    majority_class = int(torch.bincount(splits.y_train).argmax())
    majority = {"class": majority_class, "class_name": splits.class_names[majority_class],
                "val_accuracy": _accuracy(torch.full_like(splits.y_val, majority_class),
                                          splits.y_val)}
    result = _result(val_accuracy, len(splits.class_names), majority, orders, k, scores,
                     splits.flipped)
    n_flipped = result["n_flipped"]
    headline = (f"{result['top_k'][HEADLINE]['flipped_found']} of the {k} highest "
                f"{RANKING_NAMES[HEADLINE]} are planted flips ({n_flipped} of {n_train})")
    _save_figure(
        figure_class, out, splits,
        [("highest self-influence SI\n(most suspect labels)", "self_influence", suspects),
         ("most harmful to the\nvalidation loss (I(z))", "val_influence", harmful)],
        f"training samples ranked by influence; red frame: label flipped on purpose; "
        f"{headline}",
    )
    summary = {
        "config": {**asdict(config), "out": str(out), "device": str(device)},
        "sizes": {"train": n_train, "val": len(splits.y_val), "flipped": n_flipped},
        "influence": {
            "path": report.path,
            "path_reason": report.path_reason,
            "solver": report.solver,
            "hessian": report.hessian,
            "num_params": report.num_params,
            "solve": report.solve.as_dict(),
            "seconds": seconds,
            "total_seconds": influence_seconds,
        },
        "training_seconds": train_seconds,
        "most_suspect": suspects,
        "most_harmful": harmful,
        "result": result,
        "scores": {name: values.tolist() for name, values in scores.items()},
        "flipped": splits.flipped.tolist(),
        "labels": {"train_given": splits.y_train.tolist(), "val": splits.y_val.tolist(),
                   "val_predicted": val_predicted.tolist()},
        "total_seconds": time.perf_counter() - total_start,
        "paths": {"figure": str(out), "summary": str(summary_path)},
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    for line in _result_lines(result, out):
        log(line)
    log(f"saved {out} and {summary_path} ({summary['total_seconds']:.1f} s in all)")
    return summary
