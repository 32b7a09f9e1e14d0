"""The training images most harmful and most helpful to a compact Vision Transformer's
validation loss, on the embedded brain-tumour MRI.

The data is :func:`fastinfluence.datasets.make_brain_tumour` (``--n-slices`` axial slices of
``--n-patients`` synthetic patients at ``--image-size``², three tumour classes), split by
patient (:func:`~fastinfluence.datasets.split_by_patient`, 75 % train, 25 % validation; no
patient is in both). :func:`fastinfluence.models.vit_tiny` (seeded) is trained with Adam on
the shared loop (:class:`~fastinfluence.robust.NaiveTrainer`, random horizontal flips).

Then ``fi.Influence`` scores every training image against the whole validation set:
``I(z) = −∇l(z)ᵀ (G + λI)^{-1} ∇L_val``, ``L_val`` the mean validation cross-entropy and ``G``
the Gauss-Newton matrix of the mean training loss over ``--params`` (``all``: every parameter,
by CG; ``last``: the head, in closed form). Positive scores harm the validation loss
(up-weighting the image raises it), negative ones help it.

Outputs in ``--out``: ``runs.json`` (the settings, the training summary, every score and the
top images), ``table.md`` (validation accuracy against always answering the most common
training class, and the ``--top`` most harmful and helpful images) and ``influence.png`` (the
images themselves, each titled with its label and score).

    python examples/vit_brain_tumour.py --threads 1        # CPU default (about 2 minutes)
    python examples/vit_brain_tumour.py --full             # 64², more slices and epochs
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import fastinfluence as fi
from fastinfluence._optional import require
from fastinfluence.datasets import BrainTumourData, make_brain_tumour, split_by_patient
from fastinfluence.experiments import (
    ExperimentCLI,
    Session,
    format_markdown_table,
    save_figure,
    setting,
)
from fastinfluence.models import vit_tiny
from fastinfluence.robust import NaiveTrainer, TrainConfig

ROOT = Path(__file__).resolve().parent
SPLIT_FRACTIONS = (0.75, 0.25, 0.0)
"""Train/validation/test fractions of the patients (no test split: the validation patients
are never trained on)."""
ROW_TITLES = {"harmful": "most harmful to the validation loss",
              "helpful": "most helpful to the validation loss"}


@dataclass(frozen=True)
class Settings:
    n_slices: int = setting(960, 2400, help="slices generated", type=int)
    n_patients: int = setting(96, 233, help="synthetic patients", type=int)
    image_size: int = setting(32, 64, help="image side (a multiple of the 8-pixel patches)",
                              type=int)
    epochs: int = setting(20, 30, help="training epochs", type=int)
    lr: float = setting(1e-3, help="Adam learning rate", type=float)
    batch_size: int = setting(32, help="training batch size", type=int)
    params: str = setting("all", choices=["all", "last"],
                          help="the parameters influence is taken over: every parameter "
                               "(Gauss-Newton CG), or the head (closed form)")
    damping: float = setting(0.1, help="λ in G + λI", type=float)
    cg_iterations: int = setting(1000, help="CG iteration cap", type=int)
    top: int = setting(6, help="harmful and helpful images shown", type=int)
    seed: int = setting(0, help="the seed of the data, the split, the initialisation and "
                                "training", type=int)


def check(settings: Settings) -> str | None:
    for name in ("n_slices", "n_patients", "epochs", "batch_size", "cg_iterations", "top"):
        if getattr(settings, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}"
    if settings.image_size % 8 or settings.image_size < 16:
        return ("--image-size must be a multiple of 8 (the patches) and at least 16 (the "
                f"generator's smallest), got {settings.image_size}")
    if settings.damping <= 0:
        return f"--damping must be positive, got {settings.damping}"
    return None


CLI = ExperimentCLI(Settings, __doc__, "examples/vit_brain_tumour.py",
                    ROOT / "results" / "vit_brain_tumour", check=check)


def make_splits(settings: Settings) -> tuple[BrainTumourData, BrainTumourData]:
    """``(train, val)``: the generated slices split by patient."""
    data = make_brain_tumour(settings.n_slices, settings.n_patients, settings.image_size,
                             seed=settings.seed, progress=False)
    split = split_by_patient(data.patient_ids, data.labels, SPLIT_FRACTIONS, seed=settings.seed)
    return data.subset(split.train), data.subset(split.val)


def run(settings: Settings, train: BrainTumourData, val: BrainTumourData,
        device: str, progress: bool) -> dict[str, Any]:
    """Train the ViT and score every training image: the run record."""
    torch.manual_seed(settings.seed)
    model = vit_tiny(len(train.class_names), image_size=settings.image_size)
    config = TrainConfig(epochs=settings.epochs, lr=settings.lr,
                         batch_size=settings.batch_size, seed=settings.seed, flip=True,
                         progress=progress, device=device)
    trainer = NaiveTrainer(model, config)
    result = trainer.fit((train.images, train.labels), (val.images, val.labels),
                         (val.images, val.labels))
    majority_class = int(torch.bincount(train.labels).argmax())
    start = time.perf_counter()
    inf = fi.Influence(model, (train.images, train.labels), (val.images, val.labels),
                       params=settings.params, hessian="gauss-newton", solver="cg",
                       damping=settings.damping, max_iter=settings.cg_iterations)
    scores = inf.scores().cpu()
    influence_seconds = time.perf_counter() - start
    predicted = trainer.predict(train.images)
    order = scores.argsort(descending=True).tolist()

    def listed(indices: list[int]) -> list[dict[str, Any]]:
        return [{"index": i, "label": int(train.labels[i]), "predicted": int(predicted[i]),
                 "patient": str(train.patient_ids[i]), "score": float(scores[i])}
                for i in indices]

    report = inf.report
    record = {
        "seed": settings.seed,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "class_names": list(train.class_names),
        "n_train": len(train), "n_val": len(val),
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_accuracy": result.history[-1].val_accuracy,
        "val_accuracy_per_epoch": [r.val_accuracy for r in result.history],
        "majority": {"class": majority_class,
                     "class_name": train.class_names[majority_class],
                     "val_accuracy": float((val.labels == majority_class).double().mean())},
        "train_seconds": result.seconds, "influence_seconds": influence_seconds,
        "solve": {"hessian": report.hessian, "solver": report.solver,
                  "scoring": report.scoring, "num_params": report.num_params,
                  "iterations": report.solve.iterations,
                  "relative_residual": report.solve.relative_residual,
                  "converged": report.solve.converged},
        "harmful": listed(order[: settings.top]),
        "helpful": listed(order[::-1][: settings.top]),
        "scores": scores.tolist(),
    }
    return record


def save_influence_figure(path: Path, record: dict[str, Any], images: torch.Tensor) -> Path:
    """Two rows of training images, the most harmful then the most helpful, each titled with
    its label, the prediction and its score."""
    Figure = require("matplotlib.figure", "matplotlib", "examples", "the influence figure").Figure
    columns = max(len(record["harmful"]), len(record["helpful"]))
    figure = Figure(figsize=(1.7 * columns, 4.4))
    axes = figure.subplots(2, columns, squeeze=False)
    names = record["class_names"]
    for row, kind in enumerate(("harmful", "helpful")):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(record[kind]):
                axis.set_axis_off()
                continue
            entry = record[kind][column]
            axis.imshow(images[entry["index"], 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_title(f"#{entry['index']} {names[entry['label']]}\n"
                           f"pred {names[entry['predicted']]}\nI = {entry['score']:+.3g}",
                           fontsize=7)
        axes[row, 0].set_ylabel(ROW_TITLES[kind].replace(" to the", "\nto the"), fontsize=7)
    figure.suptitle(f"ViT on the brain-tumour MRI: validation accuracy "
                    f"{record['val_accuracy']:.2f} (majority class "
                    f"{record['majority']['val_accuracy']:.2f})", fontsize=8)
    return save_figure(figure, path, dpi=110)


def render_table(settings: Settings, runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    dates = ", ".join(sorted({record["date"] for record in runs})) or "undated"
    lines = ["# Training images most influential on the validation loss: ViT, brain-tumour "
             "MRI", "", f"Command: `{meta['command']}` ({dates}; {meta['machine']}).", ""]
    for record in sorted(runs, key=lambda r: r["seed"]):
        majority, solve, names = record["majority"], record["solve"], record["class_names"]
        lines += [
            f"`vit_tiny` ({record['parameters']} parameters) at {settings.image_size}², "
            f"{record['n_train']} training / {record['n_val']} validation slices of "
            f"{settings.n_patients} patients split by patient; Adam, {settings.epochs} epochs "
            f"in {record['train_seconds']:.0f} s. Validation accuracy "
            f"**{record['val_accuracy']:.3f}**; always answering {majority['class_name']} (the "
            f"most common training class): {majority['val_accuracy']:.3f}.", "",
            f"Influence over `params={settings.params!r}` ({solve['num_params']} parameters), "
            f"Gauss-Newton {solve['solver']}, λ = {settings.damping:g}: "
            f"{solve['iterations']} iterations, relative residual "
            f"{solve['relative_residual']:.1e}"
            f"{'' if solve['converged'] else ' (not converged)'}, scoring {solve['scoring']}, "
            f"{record['influence_seconds']:.0f} s. Positive scores harm the validation loss, "
            "negative ones help it.", ""]
        rows = [[str(rank + 1), f"#{harmful['index']} {names[harmful['label']]}",
                 f"{harmful['score']:+.3g}", f"#{helpful['index']} {names[helpful['label']]}",
                 f"{helpful['score']:+.3g}"]
                for rank, (harmful, helpful) in enumerate(zip(record["harmful"],
                                                              record["helpful"], strict=True))]
        lines += [format_markdown_table(["rank", "most harmful", "score", "most helpful",
                                         "score"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    session = Session(CLI, argv, lambda run: run["seed"], render_table)
    settings = session.settings
    figures: list[Path] = []
    with session:
        def work(seed: int) -> None:
            if session.done(seed):
                return
            train, val = make_splits(settings)
            record = run(settings, train, val, session.device, session.args.progress)
            figures.append(save_influence_figure(session.out / "influence.png", record,
                                                 train.images))
            session.save(record)

        session.run([settings.seed], work, lambda seed: f"seed {seed}", desc="runs")
        session.finish(figures)
    return {"runs": session.runs, "out": session.out}


if __name__ == "__main__":
    main(sys.argv[1:])
