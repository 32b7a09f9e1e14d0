"""Reproduce Table 1 and Figures 1-2 of the ISR/ISP paper on the embedded brain-tumour data.

Five methods (Naive, AT, N2V-Training, ISR, ISP; :mod:`fastinfluence.robust`) are trained on
training images that are all noisy (Gaussian sigma = 32 or Rician sigma = 16 on 0-255), with
a clean validation set, and tested with rho_test = 0 (clean test images) and rho_test = 0.5
(half of them noisy, with the training noise). Every (method, noise, trial) trains once and
is evaluated on both test sets after every epoch, so the rho_test columns share their runs.
Within a trial every method starts from the same initial weights and sees the same noisy
training images. Reported: mean +- std over trials of the final-epoch test accuracy and of
the test accuracy at the best-validation epoch (chosen on the clean validation set only).

Outputs in ``--out``: ``runs.json`` (settings and every run with its per-epoch history,
rewritten after each run: after Ctrl-C the same command resumes where it stopped), ``table.md``,
``figure1_isp_perturbation.png`` (ISP perturbations beside the tumour masks) and
``figure2_training_images.png`` (clean / noisy / AT / ISP / N2V training images). The figures
are drawn from the data and from ``figure_inputs/<noise>_<method>.pt``, the few example images
that the first trial's AT, N2V and ISP runs save beside ``runs.json`` (never from trainers held
in memory), so a resumed run draws the same figures as an uninterrupted one.

    python examples/isr_isp_table1.py                # CPU default (~1 hour on 2 cores)
    python examples/isr_isp_table1.py --full         # the paper's settings (for a GPU)
    python examples/isr_isp_table1.py --isr-emphasis helpful harmful \\
        --isp-selection helpful harmful              # ablation: the prose's readings
    python examples/isr_isp_table1.py --methods isp --ratio 0.05 0.1 0.2 --gamma 0.01 0.1

The CPU default differs from the paper where 2 cores demand it (all flags): 600 slices of
120 patients at 64² instead of 3,064 slices of 233 patients at 512², 12 epochs with T_pre = 3
instead of 40 and 10, Adam lr 0.001 instead of 0.01 (unstable at 14 steps an epoch, see
docs/papers/data.md), BatchNorm statistics re-estimated on the training images
after every epoch (``--no-recalibrate-bn`` turns it off), a 10-epoch N2V denoiser.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from fastinfluence.datasets import (
    add_noise,
    add_noise_to_fraction,
    make_brain_tumour,
    split_by_patient,
)
from fastinfluence.datasets.brain_tumour import CLASS_NAMES
from fastinfluence.experiments import (
    ExperimentCLI,
    Session,
    format_markdown_table,
    percent_cell,
    save_figure,
    save_tensors,
    setting,
)
from fastinfluence.models import PaperCNN
from fastinfluence.robust import (
    ATConfig,
    ATTrainer,
    ISPConfig,
    ISPTrainer,
    ISRConfig,
    ISRTrainer,
    N2VConfig,
    N2VTrainer,
    NaiveTrainer,
    TrainConfig,
    fgsm_uniform,
)

METHODS = ("naive", "at", "n2v", "isr", "isp")
METHOD_NAMES = {"naive": "Naive", "at": "AT", "n2v": "N2V-Training", "isr": "ISR", "isp": "ISP"}
NOISE_NAMES = {"gaussian": "Gaussian", "rician": "Rician", "rician-additive": "Rician"}
TEST_SETS = ("rho=0", "rho=0.5")
PAPER_DEFAULTS = {"emphasis": "helpful", "max_weight": 2.0, "selection": "helpful",
                  "ratio": 0.1, "gamma": 0.01}
# Table 1 of the paper: mean and std (%) over five trials, by (rho_test, noise).
PAPER_TABLE = {
    "naive": {("rho=0", "gaussian"): (87.77, 0.84), ("rho=0", "rician"): (86.50, 3.38),
              ("rho=0.5", "gaussian"): (88.89, 0.88), ("rho=0.5", "rician"): (88.44, 2.43)},
    "at": {("rho=0", "gaussian"): (88.38, 1.47), ("rho=0", "rician"): (86.85, 1.62),
           ("rho=0.5", "gaussian"): (88.95, 0.94), ("rho=0.5", "rician"): (89.04, 0.54)},
    "n2v": {("rho=0", "gaussian"): (88.12, 1.69), ("rho=0", "rician"): (83.92, 2.52),
            ("rho=0.5", "gaussian"): (89.08, 1.70), ("rho=0.5", "rician"): (86.78, 1.79)},
    "isr": {("rho=0", "gaussian"): (88.79, 1.75), ("rho=0", "rician"): (88.12, 2.28),
            ("rho=0.5", "gaussian"): (89.17, 1.09), ("rho=0.5", "rician"): (89.49, 1.82)},
    "isp": {("rho=0", "gaussian"): (89.52, 2.61), ("rho=0", "rician"): (89.49, 1.45),
            ("rho=0.5", "gaussian"): (90.73, 1.58), ("rho=0.5", "rician"): (90.54, 1.19)},
}


def positive(name: str) -> Callable[[Any], str | None]:
    """A check that the setting ``name`` is at least 1."""
    return lambda settings: f"--{name} must be >= 1" if getattr(settings, name) < 1 else None


@dataclass
class Settings:
    """Everything that determines the runs (saved in ``runs.json``; resuming needs equality)."""

    methods: list[str] = setting(list(METHODS), nargs="+", choices=METHODS)
    noises: list[str] = setting(
        ["gaussian", "rician"], nargs="+", choices=list(NOISE_NAMES),
        help="training noise per column ('rician' is the magnitude model, 'rician-additive' "
             "the literal 16·Rice(1) draw)")
    trials: int = setting(5, type=int)
    n_slices: int | None = setting(None, type=int, help="the data set's default: 600")
    n_patients: int | None = setting(None, type=int, help="the data set's default: 120")
    image_size: int | None = setting(None, 256, type=int, help="None: 64")
    paper_size: bool = setting(lambda s: s.full, flag=None)
    data_seed: int = setting(0, type=int, help="seeds the data set and its patient split")
    epochs: int = setting(12, 40, type=int, help="T")
    pretrain_epochs: int = setting(3, 10, type=int, help="T_pre")
    lr: float = setting(1e-3, 1e-2, type=float, help="Adam lr")
    batch_size: int = setting(32, type=int)
    recalibrate_bn: bool = setting(True, flag="--no-recalibrate-bn",
                                   help="keep BatchNorm's running averages (the paper's loop)")
    epsilon: float = setting(0.1, type=float, help="AT radius")
    alpha: float = setting(0.03, type=float, help="AT step")
    emphasis: list[str] = setting(["helpful"], flag="--isr-emphasis", nargs="+",
                                  choices=["helpful", "harmful"],
                                  help="which samples ISR weights up (ablation: give both)")
    max_weight: list[float] = setting([2.0], nargs="+", type=float, help="ISR m (sweep: several)")
    selection: list[str] = setting(["helpful"], flag="--isp-selection", nargs="+",
                                   choices=["helpful", "harmful"],
                                   help="which samples ISP perturbs (ablation: give both)")
    ratio: list[float] = setting([0.1], nargs="+", type=float, help="ISP r (sweep: several)")
    gamma: list[float] = setting([0.01], nargs="+", type=float,
                                 help="ISP gamma (sweep: several)")
    damping: float = setting(0.01, type=float, help="influence damping lambda")
    denoiser_epochs: int = setting(10, 100, type=int, help="N2V epochs")
    patch_size: int = setting(lambda s: min(64, s.image_size or 64), type=int,
                              help="N2V patch side (default min(64, image))")


CLI = ExperimentCLI(Settings, __doc__, "examples/isr_isp_table1.py",
                    Path("examples/results/isr_isp_table1"), check=positive("trials"),
                    scratch=("figure_inputs",))
parse_args = CLI.parse_args
settings_from = CLI.settings_from


@dataclass
class Row:
    """One row of the table: a method with one choice of its options."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        shown = [f"{k}={v}" for k, v in self.options.items() if v != PAPER_DEFAULTS[k]]
        return METHOD_NAMES[self.method] + (f" ({', '.join(shown)})" if shown else "")

    @property
    def key(self) -> str:
        return json.dumps([self.method, self.options], sort_keys=True)


def table_rows(settings: Settings) -> list[Row]:
    """The methods in table order, ISR and ISP once per combination of their swept options."""
    rows = []
    for method in METHODS:
        if method not in settings.methods:
            continue
        if method == "isr":
            rows += [Row(method, {"emphasis": e, "max_weight": m})
                     for e, m in itertools.product(settings.emphasis, settings.max_weight)]
        elif method == "isp":
            rows += [Row(method, {"selection": s, "ratio": r, "gamma": g})
                     for s, r, g in itertools.product(settings.selection, settings.ratio,
                                                      settings.gamma)]
        else:
            rows.append(Row(method))
    return rows


@dataclass
class Data:
    """The clean splits (the same for every run), the training images' tumour masks and head
    masks (for Figure 1)."""

    train: tuple[torch.Tensor, torch.Tensor]
    train_masks: torch.Tensor
    train_heads: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_data(settings: Settings, progress: bool) -> Data:
    data = make_brain_tumour(settings.n_slices, settings.n_patients, settings.image_size,
                             seed=settings.data_seed, paper_size=settings.paper_size,
                             progress=progress)
    split = split_by_patient(data.patient_ids, data.labels, seed=settings.data_seed)
    train, val, test = (data.subset(index) for index in (split.train, split.val, split.test))
    return Data(train=(train.images, train.labels), train_masks=train.masks,
                train_heads=head_masks(train.images), val=(val.images, val.labels),
                test=(test.images, test.labels))


def noisy_splits(data: Data, noise: str, trial: int) -> tuple[tuple, dict[str, tuple]]:
    """The trial's noisy training set and its two test sets (fresh noise per trial)."""
    seed = 1000 * trial + list(NOISE_NAMES).index(noise)
    x_train = add_noise(data.train[0], noise, seed=seed)
    x_half, _ = add_noise_to_fraction(data.test[0], 0.5, noise, seed=seed + 500)
    tests = {"rho=0": data.test, "rho=0.5": (x_half, data.test[1])}
    return (x_train, data.train[1]), tests


def make_trainer(row: Row, settings: Settings, model: torch.nn.Module, trial: int,
                 device: str) -> Any:
    common = dict(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                  seed=trial, recalibrate_bn=settings.recalibrate_bn, device=device)
    influence = dict(pretrain_epochs=settings.pretrain_epochs, damping=settings.damping)
    if row.method == "naive":
        return NaiveTrainer(model, TrainConfig(**common))
    if row.method == "at":
        return ATTrainer(model, ATConfig(**common, epsilon=settings.epsilon, alpha=settings.alpha))
    if row.method == "n2v":
        return N2VTrainer(model, N2VConfig(**common, denoiser_epochs=settings.denoiser_epochs,
                                           patch_size=settings.patch_size))
    if row.method == "isr":
        return ISRTrainer(model, ISRConfig(**common, **influence, **row.options))
    return ISPTrainer(model, ISPConfig(**common, **influence, **row.options))


def head_masks(images: torch.Tensor) -> torch.Tensor:
    """The head in each clean image: its nonzero pixels with their holes filled (the generator
    leaves the air around the head exactly 0)."""
    filled = [ndimage.binary_fill_holes(image[0].numpy() > 0) for image in images]
    return torch.from_numpy(np.stack(filled)).unsqueeze(1)


def method_summary(trainer: Any, masks: torch.Tensor, heads: torch.Tensor) -> dict[str, Any]:
    """What each method did, in numbers (for runs.json)."""
    if isinstance(trainer, ISRTrainer):
        weights = trainer.weights
        return {"weight_min": float(weights.min()), "weight_max": float(weights.max()),
                "weight_mean": float(weights.mean())}
    if isinstance(trainer, ISPTrainer):
        delta, selected = trainer.delta.abs(), trainer.selected
        inside = masks[selected].to(delta.device)
        # Figure 1's claim, as a number: is |delta| larger on the tumour than elsewhere (every
        # other pixel; and the rest of the head, without the air around it)?
        rest_of_head = heads[selected].to(delta.device) & ~inside
        ratio, head_ratio = (float(delta[inside].mean() / delta[other].mean())
                             if inside.any() else math.nan for other in (~inside, rest_of_head))
        return {"perturbed": int(len(selected)), "delta_abs_mean": float(delta.mean()),
                "delta_abs_max": float(delta.max()), "delta_tumour_to_rest_ratio": ratio,
                "delta_tumour_to_head_ratio": head_ratio}
    if isinstance(trainer, N2VTrainer):
        return {"denoiser_final_loss": trainer.denoiser_losses[-1],
                "denoiser_seconds": trainer.denoiser_seconds}
    return {}


def run_record(row: Row, noise: str, trial: int, result: Any, summary: dict) -> dict[str, Any]:
    return {
        "key": row.key, "method": row.method, "label": row.label, "options": row.options,
        "noise": noise, "trial": trial, "seconds": result.seconds,
        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
        "final": result.final_test_accuracies, "at_best_val": result.test_accuracies_at_best_val,
        "history": [asdict(record) for record in result.history], "method_summary": summary,
    }






# -- the table -------------------------------------------------------------------------------




def table_head(noises: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (test set, noise) columns and the header cells of a Table 1 layout."""
    columns = [(rho, noise) for rho in TEST_SETS for noise in noises]
    return columns, ["Method", *(f"ρ_test = {rho[4:]}, {NOISE_NAMES[noise]}"
                                 for rho, noise in columns)]


def markdown_table(runs: list[dict], rows: list[Row], noises: list[str], which: str) -> str:
    columns, header = table_head(noises)
    lines = []
    values = {
        (row.key, column): [r[which][column[0]] for r in runs
                            if r["key"] == row.key and r["noise"] == column[1]]
        for row in rows for column in columns
    }
    best = {column: max((np.mean(values[row.key, column]) for row in rows
                         if values[row.key, column]), default=None) for column in columns}
    for row in rows:
        cells = []
        for column in columns:
            found = values[row.key, column]
            text = percent_cell(found)
            cells.append(f"**{text}**" if found and np.mean(found) == best[column] else text)
        lines.append([row.label, *cells])
    return format_markdown_table(header, lines)


def paper_table(noises: list[str]) -> str:
    columns, header = table_head(noises)
    lines = []
    for method in METHODS:
        cells = []
        for rho, noise in columns:
            mean, std = PAPER_TABLE[method][rho, "rician" if noise != "gaussian" else noise]
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append([METHOD_NAMES[method], *cells])
    return format_markdown_table(header, lines)


def render_table(settings: Settings, runs: list[dict], meta: dict[str, Any]) -> str:
    """``table.md``, from what ``runs.json`` holds (``meta["notes"]``: lines added after the
    runs, printed under the settings)."""
    rows = table_rows(settings)
    notes = "".join(f"\n{note}\n" for note in meta.get("notes", []))
    trials = sorted({r["trial"] for r in runs})
    minutes = sum(r["seconds"] for r in runs) / 60
    timing = format_markdown_table(["Method", "s"], [
        [row.label, f"{np.mean([r['seconds'] for r in runs if r['key'] == row.key]):.1f}"]
        for row in rows if any(r["key"] == row.key for r in runs)])
    summaries = []
    for row in rows:
        numbers = [r["method_summary"] for r in runs if r["key"] == row.key]
        if numbers and numbers[0]:
            averaged = {k: float(np.nanmean([n[k] for n in numbers])) for k in numbers[0]}
            summaries.append(f"- {row.label}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in averaged.items()))
    return f"""# ISR/ISP Table 1 on the embedded brain-tumour data

Command: `{meta['command']}`
({len(runs)} runs, trials {trials}, {minutes:.1f} min on {meta['machine']}.)
Settings: {json.dumps(asdict(settings))}
{notes}
Test accuracy (%), mean ± std (population std) over trials; best of each column in bold.

## Final epoch

{markdown_table(runs, rows, settings.noises, "final")}

## At the best-validation epoch (clean validation set; the test set chooses nothing)

{markdown_table(runs, rows, settings.noises, "at_best_val")}

## The paper's Table 1 (256² real MRI, 40 epochs; for comparison)

{paper_table(settings.noises)}

## Seconds per run (mean)

{timing}

## What the methods did (mean over runs)

{chr(10).join(summaries)}
"""


# -- the figures -----------------------------------------------------------------------------

FIGURE_METHODS = ("at", "n2v", "isp")  # whose training images the figures show (trial 0)
FIGURE_INPUTS = "figure_inputs"


def is_paper_default(row: Row) -> bool:
    """Whether the row's options (if any) are the paper's."""
    return row.options == {k: PAPER_DEFAULTS[k] for k in row.options}


def shows_in_figures(row: Row, trial: int) -> bool:
    """Whether this run saves example images for the figures: trial 0, paper options."""
    return trial == 0 and row.method in FIGURE_METHODS and is_paper_default(row)


def figure_row(rows: list[Row]) -> Row | None:
    """ISP with the paper's options, whose trial-0 runs choose the figures' samples."""
    return next((row for row in rows if row.method == "isp" and is_paper_default(row)), None)


def run_order(rows: list[Row]) -> list[Row]:
    """The rows in the order they train: :func:`figure_row` first, so that the AT and N2V runs
    after it know which samples to save images of."""
    first = figure_row(rows)
    return rows if first is None else [first, *(row for row in rows if row is not first)]


def figure_input_path(out: Path, noise: str, method: str) -> Path:
    """Where the trial-0 run of ``method`` on ``noise`` saves its example images."""
    return out / FIGURE_INPUTS / f"{noise}_{method}.pt"


def first_of_each_class(candidates: torch.Tensor, y: torch.Tensor) -> list[int]:
    """The first index in ``candidates`` of every class that occurs among them."""
    labels = y[candidates]
    return [int(candidates[(labels == c).nonzero()[0, 0]])
            for c in range(len(CLASS_NAMES)) if (labels == c).any()]


def isp_picks(isp: ISPTrainer, y: torch.Tensor) -> list[int]:
    """One perturbed sample per class: the one with the largest mean ``|δ|``."""
    order = isp.delta.abs().flatten(1).mean(1).argsort(descending=True).cpu()
    return first_of_each_class(isp.selected.cpu()[order], y)


def figure_picks(out: Path, noise: str, rows: list[Row], y: torch.Tensor) -> list[int] | None:
    """The training samples the figures show for ``noise``: those the trial-0 ISP run chose
    (``None`` while its images are not saved) or, without that row, the first of each class."""
    if figure_row(rows) is None:
        return first_of_each_class(torch.arange(len(y)), y)
    path = figure_input_path(out, noise, "isp")
    return torch.load(path)["index"] if path.exists() else None


def run_images(trainer: Any, picks: list[int], train: tuple, settings: Settings,
               trial: int) -> dict[str, torch.Tensor]:
    """The images of samples ``picks`` that a finished AT, N2V or ISP trainer trained on (CPU)."""
    x_noisy, y = train
    if isinstance(trainer, ATTrainer):
        trainer.model.eval()  # eval mode: drawing must not move BatchNorm's running averages
        device = next(trainer.model.parameters()).device
        generator = torch.Generator().manual_seed(trial)
        adversarial = fgsm_uniform(trainer.model, x_noisy[picks].to(device),
                                   y[picks].to(device), settings.epsilon, settings.alpha,
                                   generator)
        return {"AT": adversarial.cpu()}
    if isinstance(trainer, N2VTrainer):
        return {"N2V": trainer.denoiser.denoise(x_noisy[picks]).cpu()}
    position = {int(i): k for k, i in enumerate(trainer.selected)}
    return {"ISP": trainer.train_data[0][picks].cpu(),
            "delta": trainer.delta[[position[i] for i in picks]].cpu()}


def figure_arrays(out: Path, rows: list[Row], data: Data,
                  settings: Settings) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The tensors of Figures 1 and 2 by noise, from the data and the saved run images, and
    what is missing (then no figure is drawn: a figure without a method's column would
    misreport the run)."""
    shown = [row.method for row in rows if shows_in_figures(row, 0)]
    figures, missing = {}, []
    for noise in settings.noises:
        paths = [figure_input_path(out, noise, method) for method in shown]
        missing += [str(path) for path in paths if not path.exists()]
        (x_noisy, y), _ = noisy_splits(data, noise, 0)
        picks = figure_picks(out, noise, rows, y)
        if picks is None:
            continue
        images: dict[str, Any] = {"index": picks, "labels": y[picks],
                                  "clean": data.train[0][picks], "noisy": x_noisy[picks],
                                  "mask": data.train_masks[picks]}
        for path in filter(Path.exists, paths):
            saved = torch.load(path)
            if saved.pop("index") != picks:
                missing.append(f"{path} (of other samples than ISP's)")
            images.update(saved)
        figures[noise] = images
    return figures, missing


def show(ax: Any, image: torch.Tensor, title: str, **style: Any) -> None:
    """One image panel without ticks."""
    ax.imshow(image.numpy(), **style)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def save_figures(out: Path, figures: dict[str, dict[str, Any]]) -> list[Path]:
    from matplotlib.figure import Figure

    saved = []
    with_delta = {n: f for n, f in figures.items() if "delta" in f}
    if with_delta:
        rows = [(noise, k) for noise, f in with_delta.items() for k in range(len(f["index"]))]
        figure = Figure(figsize=(6.6, 2.2 * len(rows)))
        axes = figure.subplots(len(rows), 3, squeeze=False)
        for (noise, k), line in zip(rows, axes, strict=True):
            f = with_delta[noise]
            delta = f["delta"][k, 0].abs()
            panels = [(f["noisy"][k, 0], "gray", "noisy training image"),
                      (f["mask"][k, 0].float(), "gray", "tumour mask"),
                      (delta, "magma", "ISP |δ|")]
            for ax, (image, cmap, title) in zip(line, panels, strict=True):
                show(ax, image, title, cmap=cmap)
            line[0].set_ylabel(f"{NOISE_NAMES[noise]}\n{CLASS_NAMES[int(f['labels'][k])]}",
                               fontsize=8)
        figure.suptitle("Figure 1: ISP perturbation beside the tumour mask", fontsize=9)
        saved.append(save_figure(figure, out / "figure1_isp_perturbation.png", dpi=110))
    columns = [c for c in ("clean", "noisy", "AT", "ISP", "N2V")
               if all(c in f for f in figures.values())]
    figure = Figure(figsize=(1.9 * len(columns), 2.0 * len(figures)))
    axes = figure.subplots(len(figures), len(columns), squeeze=False)
    for (noise, f), line in zip(figures.items(), axes, strict=True):
        for ax, name in zip(line, columns, strict=True):
            show(ax, f[name][0, 0], name, cmap="gray", vmin=0, vmax=1)
        line[0].set_ylabel(NOISE_NAMES[noise], fontsize=8)
    figure.suptitle("Figure 2: training images seen by each method", fontsize=9)
    saved.append(save_figure(figure, out / "figure2_training_images.png", dpi=110))
    return saved


# -- main ------------------------------------------------------------------------------------


def run_id(record: dict[str, Any]) -> tuple[str, str, int]:
    """A run's identity: its row, noise and trial."""
    return record["key"], record["noise"], record["trial"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every missing (method, noise, trial), then write the table and the figures.

    Returns the runs, the table rows, the figures' tensors by noise and the written paths.
    Ctrl-C saves nothing of the unfinished run and exits with code 130 after one line.
    """
    session = Session(CLI, argv, run_id, render_table)
    settings, out = session.settings, session.out
    rows = table_rows(settings)
    jobs = [(trial, noise, row) for trial in range(settings.trials) for noise in settings.noises
            for row in run_order(rows)]
    figures: dict[str, dict[str, Any]] = {}
    paths: list[Path] = []
    with session:
        start = time.perf_counter()
        data = load_data(settings, session.args.progress)
        session.meta["slices"] = {name: len(split[1]) for name, split in
                                  (("train", data.train), ("val", data.val), ("test", data.test))}
        print(f"data: {session.meta['slices']} slices at {data.train[0].shape[-1]}² "
              f"({time.perf_counter() - start:.0f} s)")
        splits = functools.lru_cache(maxsize=1)(functools.partial(noisy_splits, data))

        def work(job: tuple[int, str, Row]) -> None:
            trial, noise, row = job
            if session.done((row.key, noise, trial)):
                return
            train, tests = splits(noise, trial)
            torch.manual_seed(trial)  # the same initial weights for every method of a trial
            model = PaperCNN(data.train[0].shape[-1])
            trainer = make_trainer(row, settings, model, trial, session.device)
            result = trainer.fit(train, data.val, tests)
            if shows_in_figures(row, trial):
                picks = (isp_picks(trainer, train[1]) if row.method == "isp"
                         else figure_picks(out, noise, rows, train[1]))
                if picks is not None:  # None: ISP's images were never saved (old runs)
                    save_tensors(figure_input_path(out, noise, row.method), {
                        "index": picks, **run_images(trainer, picks, train, settings, trial)})
            session.save(run_record(row, noise, trial, result,
                                    method_summary(trainer, data.train_masks,
                                                   data.train_heads)))

        session.run(jobs, work, lambda job: f"trial {job[0]}, {job[1]}, {job[2].label}",
                    desc="Table 1")
        figures, missing = figure_arrays(out, rows, data, settings)
        if missing:
            print(f"figures not drawn: no saved images in {', '.join(missing)} (runs made "
                  f"before the images were saved; --fresh redoes them)")
        paths = save_figures(out, figures) if figures and not missing else []
        session.finish(paths)
    return {"runs": session.runs, "rows": rows, "figures": figures, "paths": paths}


if __name__ == "__main__":
    main()
