"""The project's main job, end to end: ``python -m fastinfluence demo``.

1. Generate the embedded brain-tumour set (:func:`fastinfluence.datasets.make_brain_tumour`),
   split it by patient (75/5/20), add Gaussian noise (σ = 32 on 0–255) to the training and
   test images and keep the validation images clean (the ISR/ISP paper's setting), then flip
   a fraction of the training labels (:func:`~fastinfluence.datasets.flip_labels_symmetric`).
2. Train :class:`fastinfluence.models.PaperCNN` with Adam.
3. Score every training sample with ``Influence(model, train, val, params="last")``
   (positive = harmful) and check how many flipped labels rank among the most harmful.
4. Save a PNG of the most harmful and most helpful training images and a JSON summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fastinfluence._optional import require
from fastinfluence.datasets import (
    add_noise,
    flip_labels_symmetric,
    make_brain_tumour,
    split_by_patient,
)
from fastinfluence.models import PaperCNN
from fastinfluence.scoring import Influence


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
        top_k: how many most harmful / most helpful samples to list and draw.
        out: the PNG's path; ``summary.json`` goes in the same folder.
        progress: show progress bars.
        device: where to train and score (``None``: CUDA when available, else CPU).
    """

    seed: int = 0
    epochs: int = 6
    image_size: int = 32
    label_noise: float = 0.1
    n_slices: int | None = None
    n_patients: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
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
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]


def _make_data(config: DemoConfig, log: Any) -> _Splits:
    start = time.perf_counter()
    data = make_brain_tumour(
        config.n_slices, config.n_patients, config.image_size, seed=config.seed,
        progress=config.progress,
    )
    split = split_by_patient(data.patient_ids, data.labels, seed=config.seed)
    train, val, test = (data.subset(indices) for indices in (split.train, split.val, split.test))
    num_classes = len(data.class_names)
    y_train, flipped = flip_labels_symmetric(
        train.labels, config.label_noise, num_classes, seed=config.seed
    )
    log(
        f"data: {len(data)} slices of {config.image_size}² from "
        f"{len(set(data.patient_ids))} patients in {time.perf_counter() - start:.1f} s; "
        f"train/val/test {len(train)}/{len(val)}/{len(test)} by patient; gaussian noise "
        f"(sigma 32) on train and test, val clean; {int(flipped.sum())} training labels "
        f"flipped ({config.label_noise:.0%} per class)"
    )
    return _Splits(
        x_train=add_noise(train.images, "gaussian", seed=config.seed),
        y_train=y_train,
        y_train_true=train.labels,
        flipped=flipped,
        x_val=val.images,
        y_val=val.labels,
        x_test=add_noise(test.images, "gaussian", seed=config.seed + 1),
        y_test=test.labels,
        class_names=data.class_names,
    )


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: DemoConfig,
           device: torch.device) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = -(-len(x) // config.batch_size)
    model.train()
    with tqdm(total=config.epochs * steps_per_epoch, desc="training", unit="batch",
              disable=not config.progress, leave=False) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(len(x), generator=generator)
            for batch in order.split(config.batch_size):
                optimizer.zero_grad()
                loss = loss_fn(model(x[batch].to(device)), y[batch].to(device))
                loss.backward()
                optimizer.step()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([model(part.to(device)).argmax(1).cpu() for part in x.split(256)])


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).double().mean())


def _rows(order: torch.Tensor, splits: _Splits, scores: torch.Tensor,
          predicted: torch.Tensor) -> list[dict[str, Any]]:
    return [
        {
            "index": int(i),
            "label": int(splits.y_train[i]),
            "true_label": int(splits.y_train_true[i]),
            "predicted": int(predicted[i]),
            "score": float(scores[i]),
            "flipped": bool(splits.flipped[i]),
        }
        for i in order
    ]


def _precision_at(k: int, harmful_order: torch.Tensor, flipped: torch.Tensor) -> dict[str, Any]:
    """precision@k: the fraction of the ``k`` most harmful samples whose label was flipped.

    Its chance level is the flipped fraction of the training set, the expected precision of a
    ranking in random order.
    """
    found = int(flipped[harmful_order[:k]].sum())
    return {
        "k": k,
        "flipped_found": found,
        "precision": found / k,
        "chance_precision": float(flipped.double().mean()),
    }


def _precision_line(entry: dict[str, Any]) -> str:
    k, chance = entry["k"], entry["chance_precision"]
    line = (f"precision@{k} (flipped labels among the {k} most harmful): "
            f"{entry['precision']:.2f} ({entry['flipped_found']} of {k}); chance level "
            f"{chance:.2f} (the flipped fraction of the training set)")
    return line + (f", {entry['precision'] / chance:.1f}x chance" if chance else "")


def _save_figure(figure_class: type, path: Path, splits: _Splits,
                 harmful: list[dict[str, Any]], helpful: list[dict[str, Any]]) -> None:
    columns = max(len(harmful), len(helpful))
    figure = figure_class(figsize=(1.9 * columns, 5.8), layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    names = splits.class_names
    for row, (title, entries) in enumerate(
        (("most harmful (largest influence)", harmful),
         ("most helpful (most negative influence)", helpful))
    ):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(entries):
                axis.set_axis_off()
                continue
            entry = entries[column]
            axis.imshow(splits.x_train[entry["index"], 0].numpy(), cmap="gray", vmin=0, vmax=1)
            text = (f"#{entry['index']} y={names[entry['label']][:4]}\n"
                    f"pred={names[entry['predicted']][:4]} I={entry['score']:.3g}")
            colour = "black"
            if entry["flipped"]:
                text += f"\nFLIPPED (true {names[entry['true_label']][:4]})"
                colour = "red"
                for spine in axis.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2.5)
            axis.set_title(text, fontsize=7, color=colour)
        axes[row, 0].set_ylabel(title, fontsize=8)
    figure.suptitle("training samples by influence on the clean validation loss "
                    "(red: label flipped)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def _table(title: str, rows: list[dict[str, Any]], names: tuple[str, ...]) -> list[str]:
    lines = [title, f"  {'index':>6} {'label':<11} {'predicted':<11} {'score':>11}  flipped"]
    for r in rows:
        flipped = f"YES (true {names[r['true_label']]})" if r["flipped"] else ""
        lines.append(f"  {r['index']:>6} {names[r['label']]:<11} {names[r['predicted']]:<11} "
                     f"{r['score']:>11.4g}  {flipped}")
    return lines


def run_demo(config: DemoConfig, log: Any = print) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return its summary.

    Args:
        config: the settings.
        log: called with each line of the printed report (``print`` by default).

    Returns:
        The summary also written to ``summary.json`` next to ``config.out``: the settings,
        accuracies and why val and test differ, the influence report (path, solver,
        residual, seconds per stage), the most harmful / helpful samples, precision@k of
        flipped labels with its chance level, one score per training sample and which
        training labels were flipped, and the output paths.

    Raises:
        ValueError: a setting out of range (:meth:`DemoConfig.validate`).
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

    model = PaperCNN(image_size=config.image_size, num_classes=len(splits.class_names))
    model.to(device)
    start = time.perf_counter()
    _train(model, splits.x_train, splits.y_train, config, device)
    train_seconds = time.perf_counter() - start
    predicted = _predict(model, splits.x_train, device)
    accuracy = {
        "train_given_labels": _accuracy(predicted, splits.y_train),
        "train_true_labels": _accuracy(predicted, splits.y_train_true),
        "val": _accuracy(_predict(model, splits.x_val, device), splits.y_val),
        "test": _accuracy(_predict(model, splits.x_test, device), splits.y_test),
    }
    log(f"training: {config.epochs} epoch(s) in {train_seconds:.1f} s on {device}; accuracy "
        f"train {accuracy['train_given_labels']:.3f} (given labels) / "
        f"{accuracy['train_true_labels']:.3f} (true labels), val {accuracy['val']:.3f}, "
        f"test {accuracy['test']:.3f}")
    accuracy_note = (
        f"val and test accuracy are not comparable: the {len(splits.y_val)} val images (the 5% "
        f"split by patient) are clean, as the influence target, while the training and the "
        f"{len(splits.y_test)} test images carry Gaussian noise (sigma 32)"
    )
    log(f"  {accuracy_note}")

    start = time.perf_counter()
    influence = Influence(model, (splits.x_train, splits.y_train), (splits.x_val, splits.y_val),
                          params="last", device=device, progress=config.progress)
    scores = influence.scores().cpu()
    influence_seconds = time.perf_counter() - start
    report = influence.report
    n_train = len(scores)
    seconds = dict(report.seconds)
    log(f"influence: path {report.path}, solver {report.solver}, {report.num_params} "
        f"parameters, relative residual {report.solve.relative_residual:.2e} "
        f"(converged: {report.solve.converged})")
    log("  seconds: " + ", ".join(f"{stage} {value:.4f}" for stage, value in seconds.items())
        + f"; total {influence_seconds:.3f} s")
    log(f"  scoring: {n_train / seconds['scores']:,.0f} samples/s (scores stage), "
        f"{n_train / influence_seconds:,.0f} samples/s end to end (features, solve, scores)")

    harmful_order = torch.argsort(scores, descending=True)
    k = min(config.top_k, n_train)
    harmful = _rows(harmful_order[:k], splits, scores, predicted)
    helpful = _rows(torch.argsort(scores)[:k], splits, scores, predicted)
    for line in (_table(f"{k} most harmful training samples (largest influence):", harmful,
                        splits.class_names)
                 + _table(f"{k} most helpful training samples (most negative influence):",
                          helpful, splits.class_names)):
        log(line)

    n_flipped = int(splits.flipped.sum())
    precision = [_precision_at(k, harmful_order, splits.flipped)]
    if n_flipped and n_flipped != k:
        precision.append(_precision_at(n_flipped, harmful_order, splits.flipped))
    for entry in precision:
        log(_precision_line(entry))

    out = Path(config.out)
    summary_path = out.with_name("summary.json")
    _save_figure(figure_class, out, splits, harmful, helpful)
    summary = {
        "config": {**asdict(config), "out": str(out), "device": str(device)},
        "sizes": {"train": n_train, "val": len(splits.y_val), "test": len(splits.y_test),
                  "flipped": n_flipped},
        "accuracy": accuracy,
        "accuracy_note": accuracy_note,
        "influence": {
            "path": report.path,
            "path_reason": report.path_reason,
            "solver": report.solver,
            "hessian": report.hessian,
            "num_params": report.num_params,
            "solve": report.solve.as_dict(),
            "seconds": seconds,
            "total_seconds": influence_seconds,
            "samples_per_second_scores": n_train / seconds["scores"],
            "samples_per_second_total": n_train / influence_seconds,
        },
        "training_seconds": train_seconds,
        "most_harmful": harmful,
        "most_helpful": helpful,
        "precision_at_k": precision,
        "scores": scores.tolist(),
        "flipped": splits.flipped.tolist(),
        "total_seconds": time.perf_counter() - total_start,
        "paths": {"figure": str(out), "summary": str(summary_path)},
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    log(f"saved {out} and {summary_path} ({summary['total_seconds']:.1f} s in all)")
    return summary
