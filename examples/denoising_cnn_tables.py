"""Reproduce Tables 1-4 of the denoising-CNN paper (neighbour loss + embedded auto-encoder).

Xue et al., "Improving robustness of medical image diagnosis with denoising convolutional
neural networks", on embedded data: the SKIN4 dermoscopy set (MEL / NV / BCC / BKL in the
paper's proportions, NV subsampled to 1,500 as the paper did; Tables 1, 3, 4) or the chest
X-ray set (Table 2). Every classifier is trained from scratch with SGD (lr 0.01, weight decay
1e-4, momentum 0.9) on the shared loop (:mod:`fastinfluence.robust`); the defence minimises
``L_c + λ_n·L_n + λ_a·L_a`` (:mod:`fastinfluence.robust.denoising`). Attacks are black-box as
in the paper: FGSM and I-FGSM (10 steps) at ε = 4/255 and 8/255 and Carlini-Wagner L2 (the
adversarial-robustness- toolbox, 5 binary-search steps) are crafted once per trial on a
separately trained undefended ResNet-18 (the *source*) and every classifier is evaluated on the
same adversarial test images.

Tables (``--tables``):

1. ResNet-18: no defence, λ_n ∈ {0.1, 1, 10} alone, λ_a ∈ {0.1, 1, 10} alone, λ_n = 1 with
   λ_a = 10.
2. The same four main rows on the chest X-ray set (``--dataset chest``).
3. VGG-16 (with BatchNorm), attacked from the ResNet-18 source: no defence, L_n, L_a, both.
4. MagNet's Reformer and HGD (``fastinfluence.robust.input_denoisers``) in front of the
   Table 1 classifiers without defence, with L_n (λ_n = 1), L_a (λ_a = 10) and both.
5. Beyond the paper: which training images make the undefended model fragile?
   :class:`fastinfluence.Influence` (final layer) scores every training image by its
   influence on the loss of *adversarial validation* images (FGSM and I-FGSM, both ε,
   crafted on the source; the test set chooses nothing); the ``--remove-fraction`` most
   harmful are removed and the model retrained from the same initial weights; a row that
   removes as many random images is the control.

Outputs in ``--out``: ``runs.json`` (settings and every run, rewritten after each: the same
command resumes after Ctrl-C), ``table.md``, ``figure_images.png`` (clean, adversarial,
perturbation, and the embedded auto-encoder's, the Reformer's and HGD's outputs), and
``cache/`` (trained classifiers and the adversarial images, not for version control), from
which the figure and the Table 4 rows are made, so a resumed run gives the same results.

    python examples/denoising_cnn_tables.py                  # CPU default (skin4)
    python examples/denoising_cnn_tables.py --dataset chest  # Table 2
    python examples/denoising_cnn_tables.py --full           # the paper's settings (a GPU)

The CPU default differs from the paper where 2 cores demand it (all flags): 1,000 generated
images of 64² split 70/10/20 by patient (paper: SKIN4 4,226 photographs at 224², train:test
5:1; chest 21,000 training and 6,000 test films at 224², which ``--full`` matches with 30,000),
ResNet-18 of width 16 and VGG-16 of width 8 (paper: 64), 8 epochs (paper: 80), batch 32 (paper
64), C&W with 10 iterations per search step on the first 100 test images (paper: 1,000 on
all), Reformer and HGD trained 5 epochs, BatchNorm statistics re-estimated on the training
images after every epoch, one trial. Training images are flipped horizontally at random on
skin4 (the shared loop's default; the paper names no augmentation) and never on chest films
(``--flip/--no-flip``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastinfluence import Influence
from fastinfluence.datasets import make_chest_xray, make_dermoscopy, split_by_patient
from fastinfluence.experiments import (
    ExperimentCLI,
    Session,
    format_markdown_table,
    percent_cell,
    save_figure,
    save_tensors,
    setting,
)
from fastinfluence.models import resnet18, vgg16
from fastinfluence.robust import NaiveTrainer, TrainConfig
from fastinfluence.robust.attacks import carlini_wagner_l2, fgsm, ifgsm
from fastinfluence.robust.denoising import DenoisingConfig, DenoisingNet, DenoisingTrainer
from fastinfluence.robust.input_denoisers import (
    ConvDenoiser,
    DenoisedClassifier,
    train_guided_denoiser,
    train_reformer,
)

SKIN4_PAPER_MIX = {"MEL": 1113.0, "NV": 1500.0, "BCC": 514.0, "BKL": 1099.0}
"""The paper's SKIN4 selection: ISIC 2018's MEL, BCC, BKL and 1,500 of its 6,705 NV."""
ATTACKS = ("fgsm4", "fgsm8", "ifgsm4", "ifgsm8", "cw")
COLUMNS = ("clean", *ATTACKS)
COLUMN_NAMES = {"clean": "Clean", "fgsm4": "FGSM ε=4", "fgsm8": "FGSM ε=8",
                "ifgsm4": "IFGSM10 ε=4", "ifgsm8": "IFGSM10 ε=8", "cw": "C&W"}
REFORMER_WIDTH = 8  # MagNet's reformers are small (3 filters per layer on CIFAR-10)
HGD_WIDTH = 16  # Liao et al.'s is a large U-Net; at 64² on a CPU a small one
EPSILON = {"fgsm4": 4 / 255, "fgsm8": 8 / 255, "ifgsm4": 4 / 255, "ifgsm8": 8 / 255}
TABLES = {"skin4": (1, 3, 4, 5), "chest": (2, 5)}
SPLIT = (0.7, 0.1, 0.2)
"""Train / validation / test shares, by patient (the paper has no validation set)."""
FULL_N_IMAGES = {"skin4": 4226, "chest": 30_000}
"""``--full``: SKIN4 as the paper selected it; chest: 30,000 films, so that ``SPLIT`` gives the
paper's 21,000 training and 6,000 test images (and 3,000 for validation)."""
# The paper's numbers (%): (λ_n, λ_a) or defence -> clean, FGSM 4, 8, IFGSM 4, 8, C&W.
PAPER = {
    1: {"NA": (84.28, 19.27, 21.99, 3.78, 3.78, 1.54),
        "n0.1": (81.32, 41.84, 30.97, 49.29, 30.61, 16.31),
        "n1": (82.74, 46.34, 32.51, 56.15, 38.65, 21.28),
        "n10": (64.78, None, None, None, None, None),
        "a0.1": (83.22, 39.13, 27.54, 45.27, 28.49, 15.25),
        "a1": (82.62, 41.02, 29.20, 53.43, 33.57, 19.39),
        "a10": (82.39, 41.66, 29.55, 49.41, 31.80, 18.91),
        "n1a10": (78.96, 57.92, 45.86, 65.37, 54.37, 35.22)},
    2: {"NA": (76.00, 20.86, 20.91, 28.21, 16.13, 12.39),
        "n1": (75.27, 68.48, 63.07, 71.84, 68.68, 60.29),
        "a10": (74.85, 67.66, 62.04, 70.66, 68.34, 57.74),
        "n1a10": (73.97, 71.21, 68.66, 72.35, 70.79, 60.87)},
    3: {"NA": (84.28, 38.77, 28.25, 50.71, 29.08, 15.60),
        "n1": (82.74, 68.68, 58.75, 74.00, 69.50, 50.12),
        "a10": (82.39, 66.55, 56.03, 73.05, 67.85, 44.21),
        "n1a10": (78.96, 70.21, 64.18, 74.00, 70.45, 54.73)},
    4: {"R:NA": (None, 30.16, 27.44, 18.64, 14.41, 9.71),
        "R:n1": (None, 48.37, 36.85, 58.17, 42.14, 26.06),
        "R:a10": (None, 42.71, 31.28, 53.47, 33.49, 25.46),
        "R:n1a10": (None, 59.17, 46.48, 69.66, 55.54, 44.71),
        "HGD:NA": (None, 41.80, 36.97, 42.49, 26.01, 22.73),
        "HGD:n1": (None, 56.42, 57.01, 63.52, 46.32, 36.77),
        "HGD:a10": (None, 51.14, 47.41, 58.18, 41.34, 31.59),
        "HGD:n1a10": (None, 64.13, 51.83, 70.52, 58.67, 49.55)},
}


def check(settings: Settings) -> str | None:
    """What is wrong with ``settings``, if anything."""
    if not 0 < settings.remove_fraction < 1:
        return "--remove-fraction must lie in (0, 1)"
    wrong = [t for t in settings.tables if t not in TABLES[settings.dataset]]
    if wrong:
        return f"--dataset {settings.dataset} has tables {TABLES[settings.dataset]}, not {wrong}"
    return None


@dataclass
class Settings:
    """Everything that determines the runs (saved in ``runs.json``; resuming needs equality).
    The number of trials is not part of it: a larger ``--trials`` adds trials to a finished
    run, each with its own seeds."""

    dataset: str = setting("skin4", choices=list(TABLES),
                           help="skin4 (embedded dermoscopy) or chest (embedded chest X-ray, "
                                "Table 2)")
    tables: list[int] = setting(lambda s: list(TABLES[s.dataset]), nargs="+", type=int,
                                normalise=lambda tables: sorted(set(tables)),
                                help="which tables (default: skin4 1 3 4 5, chest 2 5; 5 = the "
                                     "influence row)")
    n_images: int = setting(1000, lambda s: FULL_N_IMAGES[s.dataset], type=int,
                            help="split 70/10/20 by patient (default 1000; --full: skin4 4226, "
                                 "chest 30000)")
    image_size: int = setting(64, 224, type=int)
    data_seed: int = setting(0, type=int)
    epochs: int = setting(8, 80, type=int)
    lr: float = setting(0.01, type=float)
    momentum: float = setting(0.9, type=float, help="SGD momentum (the paper does not say)")
    weight_decay: float = setting(1e-4, type=float)
    batch_size: int = setting(32, 64, type=int)
    width: int = setting(16, 64, type=int, help="ResNet-18 first-stage width")
    vgg_width: int = setting(8, 64, type=int, help="VGG-16 first-block width")
    recalibrate_bn: bool = setting(
        True, flag="--no-recalibrate-bn",
        help="keep BatchNorm's running averages (by default they are re-estimated on the "
             "training images after every epoch)")
    lambda_n: list[float] = setting([0.1, 1.0, 10.0], nargs="+", type=float,
                                    help="Table 1's λ_n ablation (λ_a = 0)")
    lambda_a: list[float] = setting([0.1, 1.0, 10.0], nargs="+", type=float,
                                    help="Table 1's λ_a ablation (λ_n = 0)")
    noise: float = setting(0.2, type=float, help="σ of the uniform noise of the noisy copies")
    copies: int = setting(3, type=int, help="noisy copies per image and step")
    ifgsm_iterations: int = setting(10, type=int)
    cw_images: int = setting(100, lambda s: s.n_images, type=int,
                             help="C&W on the first this many test images (default 100; --full "
                                  "all)")
    cw_iterations: int = setting(10, 1000, type=int, help="per search step")
    cw_searches: int = setting(5, type=int, help="binary-search steps over the constant")
    denoiser_epochs: int = setting(5, 30, type=int, help="Reformer and HGD")
    remove_fraction: float = setting(0.1, type=float, help="Table 5: share removed")
    flip: bool = setting(
        lambda s: s.dataset != "chest", action=argparse.BooleanOptionalAction, absent=True,
        help="random horizontal flips of the training images (default: on for skin4, whose "
             "lesions have no side; off for chest, where a mirrored film puts the heart on "
             "the wrong side)")


def run_options(add: Any) -> None:
    """The flags that are not settings: the trials and the white-box table."""
    add("--trials", type=int, default=1,
        help="trials 0..n-1 (seeds of the initial weights, batches, noise and the source); "
             "a larger value on a finished --out adds trials")
    add("--white-box", action="store_true",
        help="also attack every cached ResNet-18/VGG-16 classifier of Tables 1-3 directly "
             "(FGSM, I-FGSM) and write white_box.md (not part of the paper's tables)")


def default_out(settings: Settings) -> Path:
    """``examples/results/denoising_cnn_tables``, with ``_chest`` for the chest data."""
    suffix = "" if settings.dataset == "skin4" else f"_{settings.dataset}"
    return Path(f"examples/results/denoising_cnn_tables{suffix}")


CLI = ExperimentCLI(Settings, __doc__, "examples/denoising_cnn_tables.py", default_out,
                    check=check, options=run_options, scratch=("cache",))
parse_args = CLI.parse_args
settings_from = CLI.settings_from


@dataclass(frozen=True)
class Row:
    """One table row: a classifier (architecture and loss weights), optionally behind an input
    denoiser (``"reformer"``/``"hgd"``), or retrained without removed images (``removal``)."""

    table: int
    arch: str
    lambda_n: float = 0.0
    lambda_a: float = 0.0
    denoiser: str | None = None
    removal: str | None = None

    @property
    def defended(self) -> bool:
        return self.lambda_n > 0 or self.lambda_a > 0

    @property
    def classifier_key(self) -> str:
        """The trained classifier this row evaluates (Table 4 reuses Table 1's)."""
        base = f"{self.arch}:n{self.lambda_n:g}a{self.lambda_a:g}"
        return base + (f":minus-{self.removal}" if self.removal else "")

    @property
    def key(self) -> str:
        return f"{self.classifier_key}" + (f":{self.denoiser}" if self.denoiser else "")

    @property
    def paper_key(self) -> str:
        losses = ("n" + f"{self.lambda_n:g}" if self.lambda_n else "") + (
            "a" + f"{self.lambda_a:g}" if self.lambda_a else "")
        own = losses or "NA"
        return {"reformer": "R:", "hgd": "HGD:"}.get(self.denoiser or "", "") + own

    @property
    def label(self) -> str:
        if self.removal:
            return {"influence": "NA − most harmful (influence on adversarial val loss)",
                    "random": "NA − as many random images (control)"}[self.removal]
        terms = [name for name, on in (("L_n", self.lambda_n), ("L_a", self.lambda_a)) if on]
        prefix = {"reformer": "R", "hgd": "HGD"}.get(self.denoiser or "")
        if prefix:
            return " + ".join([prefix, *terms])
        if not terms:
            return "NA"
        return ", ".join(f"λ_{t[-1]} = {v:g}" for t, v in
                         (("L_n", self.lambda_n), ("L_a", self.lambda_a)) if v)


def table_rows(settings: Settings) -> list[Row]:
    """Every row, in table order."""
    rows: list[Row] = []
    main = [(0.0, 0.0), (1.0, 0.0), (0.0, 10.0), (1.0, 10.0)]
    for table in settings.tables:
        if table == 1:
            rows += [Row(1, "resnet18"),
                     *(Row(1, "resnet18", lambda_n=v) for v in settings.lambda_n),
                     *(Row(1, "resnet18", lambda_a=v) for v in settings.lambda_a),
                     Row(1, "resnet18", 1.0, 10.0)]
        elif table == 2:
            rows += [Row(2, "resnet18", n, a) for n, a in main]
        elif table == 3:
            rows += [Row(3, "vgg16", n, a) for n, a in main]
        elif table == 4:
            rows += [Row(4, "resnet18", n, a, denoiser=d) for d in ("reformer", "hgd")
                     for n, a in main]
        else:
            rows += [Row(5, "resnet18", removal=r) for r in ("influence", "random")]
    return list(dict.fromkeys(rows))


def run_order(rows: list[Row]) -> list[Row]:
    """Rows in the order they are computed: the paper's main rows first (so a run cut short
    has them), the ablation and the other architectures after."""
    def priority(row: Row) -> tuple[int, int]:
        if row.table in (1, 2) and row.paper_key in ("NA", "n1", "a10", "n1a10"):
            return (0, 0)
        if row.table in (4, 5):
            return (1, row.table)
        return (2 if row.table in (1, 2) else 3, 0)
    return sorted(rows, key=priority)


# -- data and attacks ------------------------------------------------------------------------


@dataclass
class Data:
    """The splits ``(images, labels)`` and the class names."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    class_names: tuple[str, ...]


def load_data(settings: Settings, progress: bool) -> Data:
    """The generated SKIN4 or chest X-ray images, split :data:`SPLIT` by patient."""
    data: Any
    if settings.dataset == "chest":
        data = make_chest_xray(settings.n_images, settings.image_size, seed=settings.data_seed,
                               progress=progress)
    else:
        data = make_dermoscopy(settings.n_images, image_size=settings.image_size,
                               mix=SKIN4_PAPER_MIX, binary=False, seed=settings.data_seed,
                               progress=progress)
    split = split_by_patient(data.patient_ids, data.labels, SPLIT, seed=settings.data_seed)
    parts = [data.subset(index) for index in (split.train, split.val, split.test)]
    train, val, test = ((part.images, part.labels) for part in parts)
    return Data(train, val, test, tuple(data.class_names))


def build_classifier(arch: str, settings: Settings, data: Data, decoder: bool) -> DenoisingNet:
    channels, classes = data.train[0].shape[1], len(data.class_names)
    if arch == "vgg16":
        return DenoisingNet.from_vgg(vgg16(classes, width=settings.vgg_width,
                                           in_channels=channels), decoder)
    return DenoisingNet.from_resnet(resnet18(classes, width=settings.width,
                                             in_channels=channels), decoder)


def train_config(settings: Settings, trial: int, device: str, **extra: Any) -> dict[str, Any]:
    return dict(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                seed=trial, optimizer="sgd", momentum=settings.momentum,
                weight_decay=settings.weight_decay, recalibrate_bn=settings.recalibrate_bn,
                flip=settings.flip, device=device, **extra)


def train_classifier(arch: str, lambda_n: float, lambda_a: float, settings: Settings,
                     data: Data, train: tuple, trial: int, device: str,
                     seed_offset: int = 0) -> tuple[DenoisingNet, Any]:
    """Train one classifier from the trial's initial weights (``seed_offset`` for the source)."""
    torch.manual_seed(1000 * seed_offset + trial)
    model = build_classifier(arch, settings, data, decoder=lambda_a > 0)
    if lambda_n > 0 or lambda_a > 0:
        config = DenoisingConfig(**train_config(settings, trial, device), lambda_n=lambda_n,
                                 lambda_a=lambda_a, noise=settings.noise, copies=settings.copies)
        trainer: Any = DenoisingTrainer(model, config)
    else:
        trainer = NaiveTrainer(model, TrainConfig(**train_config(settings, trial, device)))
    result = trainer.fit(train, data.val, data.test)
    return model, result


def craft_attacks(source: torch.nn.Module, data: Data, settings: Settings,
                  trial: int) -> dict[str, Any]:
    """The adversarial images, all crafted on the source: test and validation sets by every
    FGSM/I-FGSM setting, C&W on the first ``cw_images`` test images, and one adversarial per
    training image for HGD (FGSM or I-FGSM alternately, ε drawn from {2, 4, 6, 8}/255)."""
    def by_attack(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: (fgsm(source, x, y, eps) if name.startswith("fgsm")
                       else ifgsm(source, x, y, eps, settings.ifgsm_iterations))
                for name, eps in EPSILON.items()}

    test = by_attack(*data.test)
    count = min(settings.cw_images, len(data.test[1]))
    start = time.perf_counter()
    test["cw"] = carlini_wagner_l2(source, data.test[0][:count], data.test[1][:count],
                                   num_classes=len(data.class_names),
                                   binary_search_steps=settings.cw_searches,
                                   max_iter=settings.cw_iterations)
    cw_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(trial)
    x, y = data.train
    epsilons = torch.tensor([2, 4, 6, 8])[torch.randint(0, 4, (len(y),), generator=generator)]
    train = torch.empty_like(x)
    for value in (2, 4, 6, 8):
        for iterative in (False, True):
            index = torch.nonzero((epsilons == value)
                                  & ((torch.arange(len(y)) % 2 == 1) == iterative))[:, 0]
            if len(index):
                attack = ifgsm if iterative else fgsm
                train[index] = attack(source, x[index], y[index], value / 255)
    return {"test": test, "val": by_attack(*data.val), "train": train,
            "cw_count": count, "cw_seconds": cw_seconds}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    """The share of ``x`` that ``model`` (put in eval mode on ``device``) classifies as ``y``."""
    model.eval()
    model.to(device)
    predictions = torch.cat([model(part.to(device)).argmax(1).cpu() for part in x.split(256)])
    return float((predictions == y).double().mean())


def evaluate(model: torch.nn.Module, data: Data, attacks: dict[str, Any],
             device: str) -> dict[str, float]:
    """Accuracy on the clean test set and on each adversarial test set (C&W on its subset)."""
    x, y = data.test
    result = {"clean": accuracy(model, x, y, device)}
    for name in ATTACKS:
        images = attacks["test"][name]
        result[name] = accuracy(model, images, y[:len(images)], device)
    count = attacks["cw_count"]
    result["clean_cw_subset"] = accuracy(model, x[:count], y[:count], device)
    return result


def perturbation_sizes(attacks: dict[str, Any], data: Data) -> dict[str, float]:
    """Largest L∞ (×255) of every attack and mean L2 of C&W, as a check of the crafting."""
    x = data.test[0]
    sizes = {f"{name}_linf_255": float((attacks["test"][name] - x).abs().max() * 255)
             for name in EPSILON}
    cw = attacks["test"]["cw"] - x[:len(attacks["test"]["cw"])]
    norms = cw.flatten(1).norm(dim=1)
    sizes["cw_mean_l2"] = float(norms.mean())
    sizes["cw_changed_fraction"] = float((norms > 0).double().mean())
    return sizes


# -- the cache (models and attacks on disk, so resumed runs give the same rows) --------------


class Cache:
    """``out/cache``: the trial's attacks and every trained classifier and denoiser."""

    def __init__(self, out: Path) -> None:
        self.root = out / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".gitignore").write_text("*\n")

    def path(self, name: str, trial: int) -> Path:
        return self.root / f"{name.replace(':', '_')}_t{trial}.pt"

    def has(self, name: str, trial: int) -> bool:
        return self.path(name, trial).exists()

    def save(self, name: str, trial: int, value: dict[str, Any]) -> None:
        save_tensors(self.path(name, trial), value)

    def load(self, name: str, trial: int) -> Any:
        return torch.load(self.path(name, trial), weights_only=True)


# -- the jobs --------------------------------------------------------------------------------


class Runner:
    """Computes rows on demand, each classifier, denoiser and attack set once per trial."""

    def __init__(self, settings: Settings, data: Data, cache: Cache, device: str) -> None:
        self.settings, self.data, self.cache, self.device = settings, data, cache, device

    def attacks(self, trial: int) -> dict[str, Any]:
        if not self.cache.has("attacks", trial):
            source, result = train_classifier("resnet18", 0.0, 0.0, self.settings, self.data,
                                              self.data.train, trial, self.device,
                                              seed_offset=1)
            attacks = craft_attacks(source, self.data, self.settings, trial)
            attacks["source_clean_accuracy"] = result.final_test_accuracy
            attacks["source_seconds"] = result.seconds
            self.cache.save("attacks", trial, attacks)
        return self.cache.load("attacks", trial)

    def classifier(self, row: Row, trial: int) -> tuple[DenoisingNet, dict[str, Any]]:
        """The row's trained classifier and its training record (trained if not cached)."""
        key = row.classifier_key
        if not self.cache.has(key, trial):
            train, removed = self.data.train, {}
            if row.removal:
                train, removed = self.reduced_training_set(row.removal, trial)
            model, result = train_classifier(row.arch, row.lambda_n, row.lambda_a,
                                             self.settings, self.data, train, trial,
                                             self.device)
            record = {"seconds": result.seconds, "final_val_accuracy":
                      result.history[-1].val_accuracy,
                      "history": [asdict(h) for h in result.history],
                      "extras": result.extras, **removed}
            self.cache.save(key, trial, {"state": model.state_dict(), "record": record})
        saved = self.cache.load(key, trial)
        model = build_classifier(row.arch, self.settings, self.data, decoder=row.lambda_a > 0)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["record"]

    def reduced_training_set(self, removal: str, trial: int) -> tuple[tuple, dict[str, Any]]:
        """The training set without the most harmful images (or as many random ones)."""
        x, y = self.data.train
        count = max(1, round(self.settings.remove_fraction * len(y)))
        if removal == "influence":
            base, _ = self.classifier(Row(1, "resnet18"), trial)
            val = self.attacks(trial)["val"]
            x_val = torch.cat([val[name] for name in EPSILON])
            y_val = self.data.val[1].repeat(len(EPSILON))
            start = time.perf_counter()
            influence = Influence(base.to(self.device), (x, y), (x_val, y_val), params="last",
                                  device=self.device)
            scores = influence.scores().cpu()
            removed = torch.argsort(scores, descending=True)[:count]  # I > 0: harmful
            info = {"influence_seconds": time.perf_counter() - start,
                    "scoring": influence.report.scoring,
                    "params": list(influence.selection.names),
                    "removed_score_min": float(scores[removed].min()),
                    "score_positive_fraction": float((scores > 0).double().mean())}
        else:
            generator = torch.Generator().manual_seed(10_000 + trial)
            removed = torch.randperm(len(y), generator=generator)[:count]
            info = {}
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[removed] = False
        counts = torch.bincount(y[removed], minlength=len(self.data.class_names))
        info.update(removed=int(count), removed_per_class=counts.tolist())
        return (x[keep], y[keep]), info

    def new_denoiser(self, kind: str) -> ConvDenoiser:
        channels = self.data.train[0].shape[1]
        if kind == "reformer":
            return ConvDenoiser(channels, REFORMER_WIDTH)
        return ConvDenoiser(channels, HGD_WIDTH, residual=True)

    def denoiser(self, row: Row, classifier: DenoisingNet, trial: int) -> ConvDenoiser:
        """The Reformer (one per trial) or the row's classifier's HGD (trained if not cached)."""
        name = "reformer" if row.denoiser == "reformer" else f"{row.classifier_key}:hgd"
        if not self.cache.has(name, trial):
            torch.manual_seed(trial)
            denoiser = self.new_denoiser(row.denoiser).to(self.device)
            epochs = self.settings.denoiser_epochs
            if row.denoiser == "reformer":
                losses = train_reformer(denoiser, self.data.train[0], epochs=epochs, seed=trial)
            else:
                losses = train_guided_denoiser(denoiser, classifier.to(self.device),
                                               self.data.train[0], self.attacks(trial)["train"],
                                               epochs=epochs, seed=trial)
            self.cache.save(name, trial, {"state": denoiser.state_dict(), "losses": losses})
        saved = self.cache.load(name, trial)
        denoiser = self.new_denoiser(row.denoiser)
        denoiser.load_state_dict(saved["state"])
        denoiser.losses = saved["losses"]
        return denoiser.eval()

    def run(self, row: Row, trial: int) -> dict[str, Any]:
        attacks = self.attacks(trial)
        classifier, record = self.classifier(row, trial)
        model: torch.nn.Module = classifier
        summary: dict[str, Any] = {
            "source_clean_accuracy": attacks["source_clean_accuracy"],
            **perturbation_sizes(attacks, self.data),
        }
        if row.denoiser:
            denoiser = self.denoiser(row, classifier, trial)
            model = DenoisedClassifier(denoiser, classifier)
            summary["denoiser_losses"] = denoiser.losses
        summary.update({k: v for k, v in record.items() if k not in ("history",)})
        return {"key": row.key, "table": row.table, "label": row.label, "trial": trial,
                "accuracy": evaluate(model, self.data, attacks, self.device),
                "history": record["history"], "summary": summary}


# -- the tables ------------------------------------------------------------------------------


def paper_cells(table: int, row: Row) -> list[str]:
    values = PAPER.get(table, {}).get(row.paper_key if table != 5 else "", None)
    if values is None:
        return ["–"] * len(COLUMNS)
    return ["–" if v is None else f"{v:.2f}" for v in values]


HEADER = ["Defence", *(COLUMN_NAMES[c] for c in COLUMNS)]


def markdown_table(table: int, rows: list[Row], runs: list[dict]) -> str:
    lines = []
    for row in rows:
        if row.table != table:
            continue
        found = [r for r in runs if r["key"] == row.key and r["table"] == table]
        lines.append([row.label, *(percent_cell([r["accuracy"][c] for r in found])
                                   for c in COLUMNS)])
    return format_markdown_table(HEADER, lines)


def paper_table(table: int, rows: list[Row]) -> str:
    return format_markdown_table(HEADER, [[row.label, *paper_cells(table, row)]
                                          for row in rows if row.table == table])


TITLES = {1: "Table 1: ResNet-18, λ_n and λ_a ablation",
          2: "Table 2: ResNet-18 on the chest X-ray set",
          3: "Table 3: VGG-16 (attacks crafted on the ResNet-18 source)",
          4: "Table 4: with the Reformer (R) and HGD in front (Table 1's classifiers)",
          5: "Extra row: removing the training images most harmful to adversarial loss"}


def render_table(settings: Settings, runs: list[dict], meta: dict[str, Any]) -> str:
    """``table.md``, from what ``runs.json`` holds."""
    rows = table_rows(settings)
    trained = [r for r in runs if not r["key"].endswith((":reformer", ":hgd"))]
    minutes = sum(r["summary"]["seconds"] for r in trained) / 60
    parts = [f"# Denoising-CNN Tables on the embedded {settings.dataset} data\n",
             f"Command: `{meta['command']}`",
             f"({len(runs)} rows, trials {sorted({r['trial'] for r in runs})}, classifier "
             f"training {minutes:.1f} min on {meta['machine']}.)",
             f"Settings: {json.dumps(asdict(settings))}\n",
             "Test accuracy (%) after the last epoch, mean ± std over trials. Attacks are "
             "black-box: crafted on a separately trained undefended ResNet-18. C&W: on the "
             f"first {settings.cw_images} test images, {settings.cw_searches} binary-search "
             f"steps of {settings.cw_iterations} iterations. Training images "
             f"{'flipped horizontally at random' if settings.flip else 'never flipped'}.\n"]
    if runs:
        summary = runs[0]["summary"]
        parts.append("Source model clean accuracy "
                     f"{100 * summary['source_clean_accuracy']:.2f} %; largest L∞ ×255: "
                     + ", ".join(f"{k.split('_')[0]} {summary[k]:.2f}" for k in summary
                                 if k.endswith("_linf_255"))
                     + f"; C&W mean L2 {summary['cw_mean_l2']:.3f}, changed "
                       f"{100 * summary['cw_changed_fraction']:.0f} % of its images.\n")
    for table in settings.tables:
        parts += [f"## {TITLES[table]}\n", markdown_table(table, rows, runs), ""]
        if table in PAPER:
            parts += ["The paper's numbers:\n", paper_table(table, rows), ""]
    removal = [r for r in runs if r["table"] == 5]
    if removal:
        parts.append("Removal details: " + "; ".join(
            f"{r['label']}: " + ", ".join(f"{k} {v}" for k, v in r["summary"].items()
                                          if k.startswith(("removed", "scoring", "params",
                                                           "influence_seconds",
                                                           "score_positive")))
            for r in removal) + "\n")
    parts += ["## Seconds per classifier (training only)\n", format_markdown_table(
        ["Row", "s"], [[f"{r['label']} (Table {r['table']})", f"{r['summary']['seconds']:.0f}"]
                       for r in trained])]
    return "\n".join(parts) + "\n"


def white_box_accuracy(model: torch.nn.Module, data: Data, iterations: int) -> dict[str, float]:
    """Test accuracy under FGSM / I-FGSM crafted on ``model`` itself (white-box)."""
    x, y = data.test
    result = {}
    for name, eps in EPSILON.items():
        adversarial = (fgsm(model, x, y, eps) if name.startswith("fgsm")
                       else ifgsm(model, x, y, eps, iterations))
        with torch.no_grad():
            result[name] = float((model(adversarial).argmax(1) == y).double().mean())
    return result


def write_white_box(path: Path, runner: Runner, rows: list[Row], trials: int) -> Path:
    """``white_box.md``: every cached Table 1-3 classifier attacked directly, per trial."""
    lines = []
    for row in rows:
        if row.table not in (1, 2, 3):
            continue
        values = [white_box_accuracy(runner.classifier(row, trial)[0], runner.data,
                                     runner.settings.ifgsm_iterations)
                  for trial in range(trials) if runner.cache.has(row.classifier_key, trial)]
        cells = [percent_cell([v[name] for v in values], 1) for name in EPSILON]
        lines.append([str(row.table), row.label, *cells])
    path.write_text("# White-box accuracy (%): FGSM / I-FGSM crafted on each classifier itself\n\n"
                    + format_markdown_table(["Table", "Classifier",
                                             *(COLUMN_NAMES[c] for c in EPSILON)], lines) + "\n")
    return path


# -- the figure ------------------------------------------------------------------------------


def figure_arrays(runner: Runner, rows: list[Row], trial: int = 0) -> dict[str, Any] | None:
    """One test image per class: clean, I-FGSM ε=8, |perturbation|, and the outputs of the
    embedded auto-encoder (λ_n = 1, λ_a = 10), the Reformer and HGD (when those were run)."""
    if not runner.cache.has("attacks", trial):
        return None
    x, y = runner.data.test
    picks = [int(torch.nonzero(y == c)[0, 0]) for c in range(len(runner.data.class_names))
             if bool((y == c).any())]
    attacks = runner.cache.load("attacks", trial)
    adversarial = attacks["test"]["ifgsm8"][picks]
    arrays: dict[str, Any] = {"labels": y[picks], "clean": x[picks],
                              "IFGSM ε=8": adversarial,
                              "|δ| ×10": ((adversarial - x[picks]).abs() * 10).clamp(0, 1)}
    with torch.no_grad():
        both = next((r for r in rows if r.arch == "resnet18" and r.lambda_a > 0
                     and r.lambda_n > 0 and not r.denoiser), None)
        if both is not None and runner.cache.has(both.classifier_key, trial):
            model, _ = runner.classifier(both, trial)
            arrays["embedded AE"] = model.cpu().parts(adversarial)[2]
        for name in ("reformer", "hgd"):
            row = next((r for r in rows if r.denoiser == name and not r.defended), None)
            if row is None:
                continue
            cached = "reformer" if name == "reformer" else f"{row.classifier_key}:hgd"
            if runner.cache.has(cached, trial):
                classifier, _ = runner.classifier(row, trial)
                denoiser = runner.denoiser(row, classifier, trial)
                arrays["Reformer" if name == "reformer" else "HGD"] = denoiser(adversarial)
    return arrays


def draw_figure(path: Path, arrays: dict[str, Any], class_names: tuple[str, ...]) -> Path:
    from matplotlib.figure import Figure

    columns = [k for k in arrays if k != "labels"]
    figure = Figure(figsize=(1.6 * len(columns), 1.7 * len(arrays["labels"])))
    axes = figure.subplots(len(arrays["labels"]), len(columns), squeeze=False)
    for i, line in enumerate(axes):
        for ax, name in zip(line, columns, strict=True):
            image = arrays[name][i].permute(1, 2, 0).numpy()
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image,
                      cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
        line[0].set_ylabel(class_names[int(arrays["labels"][i])], fontsize=8)
    figure.suptitle("Clean, adversarial (crafted on the source) and denoised test images",
                    fontsize=9)
    return save_figure(figure, path, dpi=110)


# -- main ------------------------------------------------------------------------------------


def run_id(record: dict[str, Any]) -> tuple[str, int, int]:
    """A row's identity: its key, table and trial."""
    return record["key"], record["table"], record["trial"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compute every missing (row, trial), then write the tables and the figure.

    Returns the runs, the rows, the figure's tensors and the written paths. Ctrl-C keeps the
    finished rows (and the cached models) and exits with code 130 after one line.
    """
    session = Session(CLI, argv, run_id, render_table)
    settings, out, trials = session.settings, session.out, session.args.trials
    if trials < 1:
        raise SystemExit("--trials must be >= 1")
    rows = table_rows(settings)
    cache = Cache(out)
    jobs = [(trial, row) for trial in range(trials) for row in run_order(rows)]
    figure: dict[str, Any] | None = None
    paths: list[Path] = []
    with session:
        data = load_data(settings, session.args.progress)
        session.meta["images"] = {name: len(split[1]) for name, split in
                                  (("train", data.train), ("val", data.val), ("test", data.test))}
        print(f"data: {session.meta['images']} images at {data.train[0].shape[-1]}², classes "
              f"{data.class_names}")
        runner = Runner(settings, data, cache, session.device)

        def work(job: tuple[int, Row]) -> None:
            trial, row = job
            if not session.done((row.key, row.table, trial)):
                session.save(runner.run(row, trial))

        session.run(jobs, work, lambda job: f"trial {job[0]}, Table {job[1].table}, "
                                            f"{job[1].label}", desc="denoising tables")
        if session.args.white_box:
            paths.append(write_white_box(out / "white_box.md", runner, rows, trials))
        figure = figure_arrays(runner, rows)
        if figure is not None:
            paths.append(draw_figure(out / "figure_images.png", figure, data.class_names))
        session.finish(paths)
    return {"runs": session.runs, "rows": rows, "figure": figure, "paths": paths}


if __name__ == "__main__":
    main()
