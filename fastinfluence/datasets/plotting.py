"""A look at the embedded data sets, saved as PNG: brain-tumour clean / noisy / mask images
per class, dermoscopy samples per diagnosis, chest films per class and MR spectra per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastinfluence._optional import require
from fastinfluence.datasets.brain_tumour import BrainTumourData
from fastinfluence.datasets.chest_xray import ChestXrayData
from fastinfluence.datasets.dermoscopy import DIAGNOSES, DermoscopyData
from fastinfluence.datasets.mrs import (
    BASES,
    FIELD_MHZ,
    MRSData,
    metabolite_spectrum,
    ppm_axis,
    standardise,
)
from fastinfluence.datasets.noise import NoiseKind, add_noise


def _check_per_class(per_class: object) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")


def _sample_groups(groups: np.ndarray, order: list, per_group: int,
                   rng: np.random.Generator) -> list[list[int]]:
    """For each value of ``order``, up to ``per_group`` random indices where ``groups`` has it
    (without replacement; empty groups give an empty list)."""
    picked = []
    for value in order:
        members = np.nonzero(groups == value)[0]
        picked.append([int(i) for i in rng.choice(members, min(per_group, len(members)),
                                                  replace=False)])
    return picked


def _save(figure: object, path: str | Path, dpi: int) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def save_brain_tumour_grid(
    data: BrainTumourData,
    path: str | Path,
    *,
    noise: NoiseKind = "gaussian",
    per_class: int = 2,
    seed: int = 0,
    dpi: int = 80,
) -> Path:
    """Save a grid with one row per sample (``per_class`` random slices of every class) and
    three columns: the clean image, the noisy image (:func:`add_noise` with the paper's
    parameters for ``noise``) and the tumour mask outlined on the clean image.

    Uses matplotlib's object API (no pyplot, no global backend change). Returns the path.
    """
    Figure = require(
        "matplotlib.figure", "matplotlib", "examples", "save_brain_tumour_grid"
    ).Figure

    _check_per_class(per_class)
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    groups = _sample_groups(labels, list(range(len(data.class_names))), per_class, rng)
    rows = [index for group in groups for index in group]
    if not rows:
        raise ValueError("data has no slices")
    clean = data.images[rows]
    noisy = add_noise(clean, noise, seed=seed)
    figure = Figure(figsize=(3 * 1.6, len(rows) * 1.6))
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for r, index in enumerate(rows):
        mask = data.masks[index, 0].numpy()
        panels = (clean[r, 0], noisy[r, 0], clean[r, 0])
        for c, (axis, image) in enumerate(zip(axes[r], panels, strict=True)):
            axis.imshow(torch.as_tensor(image).numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 2 and mask.any():
                axis.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        axes[r, 0].set_ylabel(data.class_names[labels[index]], fontsize=8)
    for axis, title in zip(axes[0], ("clean", f"{noise} noise", "tumour mask"), strict=True):
        axis.set_title(title, fontsize=9)
    return _save(figure, path, dpi)


def save_dermoscopy_grid(
    data: DermoscopyData,
    path: str | Path,
    *,
    per_class: int = 6,
    seed: int = 0,
    dpi: int = 80,
) -> Path:
    """Save a grid of generated dermoscopy images: one row per diagnosis present in ``data``
    (in :data:`~fastinfluence.datasets.dermoscopy.DIAGNOSES` order), ``per_class`` random
    images each, the lesion outlined in the last column's copy of the row's first image.

    Uses matplotlib's object API (no pyplot, no global backend change). Returns the path.
    """
    from matplotlib.figure import Figure

    _check_per_class(per_class)
    present = [code for code in DIAGNOSES if code in set(data.diagnoses.tolist())]
    if not present:
        raise ValueError("data has no images")
    groups = _sample_groups(data.diagnoses, present, per_class, np.random.default_rng(seed))
    columns = max(len(g) for g in groups) + 1
    figure = Figure(figsize=(columns * 1.3, len(present) * 1.4))
    axes = figure.subplots(len(present), columns, squeeze=False)
    for row, (code, group) in enumerate(zip(present, groups, strict=True)):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(group):
                axis.imshow(data.images[group[column]].permute(1, 2, 0).numpy())
            elif column == columns - 1:
                axis.imshow(data.images[group[0]].permute(1, 2, 0).numpy())
                axis.contour(data.masks[group[0], 0].numpy().astype(float), levels=[0.5],
                             colors="lime", linewidths=0.8)
            else:
                axis.set_axis_off()
        axes[row, 0].set_ylabel(DIAGNOSES[code].name.replace("_", " "), fontsize=7)
    axes[0, -1].set_title("lesion mask", fontsize=8)
    return _save(figure, path, dpi)


def save_chest_xray_grid(
    data: ChestXrayData,
    path: str | Path,
    *,
    per_class: int = 6,
    seed: int = 0,
    dpi: int = 80,
) -> Path:
    """Save a grid of chest films: one row per class, ``per_class`` random films each, titled
    by their painted findings, each finding's mask outlined in red.

    Uses matplotlib's object API (no pyplot, no global backend change). Returns the path.
    """
    Figure = require("matplotlib.figure", "matplotlib", "examples", "save_chest_xray_grid").Figure

    _check_per_class(per_class)
    if len(data) == 0:
        raise ValueError("data has no films")
    classes = list(range(len(data.class_names)))
    groups = _sample_groups(data.labels.numpy(), classes, per_class, np.random.default_rng(seed))
    columns = max(len(g) for g in groups)
    figure = Figure(figsize=(columns * 1.4, len(classes) * 1.55))
    axes = figure.subplots(len(classes), columns, squeeze=False)
    for row, group in enumerate(groups):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(group):
                axis.set_axis_off()
                continue
            index = group[column]
            axis.imshow(data.images[index, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            mask = data.masks[index, 0].numpy()
            if mask.any():
                axis.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.6)
            axis.set_title(data.findings[index].replace("+", " + ") or " ", fontsize=6)
        axes[row, 0].set_ylabel(data.class_names[row].replace(" / ", "/\n"), fontsize=7)
    return _save(figure, path, dpi)


METABOLITE_MARKS: tuple[tuple[str, float], ...] = (
    ("Lip1", 0.9), ("Lip2", 1.3), ("NAA", 2.01), ("Glx", 2.25), ("Cr1", 3.03), ("Cho", 3.21),
    ("Ins", 3.56), ("Glx", 3.75), ("Cr2", 3.92),
)
"""Where the paper's Fig. 9 marks the metabolites (ppm)."""


def save_mrs_class_means(data: MRSData, path: str | Path, *, dpi: int = 80) -> Path:
    """Save the mean ± one standard deviation of the standardised spectra
    (:func:`~fastinfluence.datasets.mrs.standardise`) of each label, ppm decreasing to the
    right, with the metabolites of the paper's Fig. 9 marked. With tissue truth (simulated
    data) a second panel shows the same by tissue (healthy tissue labelled tumour apart).

    Uses matplotlib's object API. Returns the path.
    """
    Figure = require("matplotlib.figure", "matplotlib", "examples", "save_mrs_class_means").Figure
    if len(data) == 0:
        raise ValueError("data has no spectra")
    x = standardise(data.spectra)[:, 0].numpy()
    labels = data.labels.numpy()
    colours = ("tab:green", "tab:purple")
    groups = [(f"labelled {name}", labels == k, colour)
              for k, (name, colour) in enumerate(zip(data.class_names, colours, strict=False))]
    panels = [("by label", groups)]
    if data.tissue_labels is not None:
        tissue = data.tissue_labels.numpy()
        panels.append(("by tissue", [
            ("healthy tissue, labelled healthy", (tissue == 0) & (labels == 0), "tab:green"),
            ("healthy tissue, labelled tumour", (tissue == 0) & (labels == 1), "tab:orange"),
            ("tumour tissue", tissue == 1, "tab:purple"),
        ]))
    figure = Figure(figsize=(8, 3.2 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axis, (title, members) in zip(axes, panels, strict=True):
        for name, member, colour in members:
            if not member.any():
                continue
            mean, std = x[member].mean(0), x[member].std(0)
            axis.plot(data.ppm, mean, color=colour, lw=1.2, label=f"{name} (n={member.sum()})")
            axis.fill_between(data.ppm, mean - std, mean + std, color=colour, alpha=0.15)
        top = axis.get_ylim()[1]
        for name, position in METABOLITE_MARKS:
            if data.ppm.min() <= position <= data.ppm.max():
                axis.axvline(position, color="grey", lw=0.5, ls=":")
                axis.text(position, top, name, fontsize=7, ha="center", va="bottom")
        axis.set_xlim(data.ppm.max(), data.ppm.min())
        axis.set_xlabel("chemical shift (ppm)")
        axis.set_ylabel("standardised intensity")
        axis.set_title(f"mean ± std {title}", fontsize=9, pad=14)
        axis.legend(fontsize=7, loc="upper right")
    return _save(figure, path, dpi)


def save_mrs_bases(path: str | Path, names: tuple[str, ...] = ("NAA", "Cho", "mI", "Glu", "Gln",
                                                               "Lac"),
                   *, lorentz_hz: float = 2.0, gauss_hz: float = 2.5, dpi: int = 80) -> Path:
    """Save each metabolite's spectrum (real part, 1 mM, TE 30 ms, T2 included) in both bases
    of :func:`~fastinfluence.datasets.mrs.make_mrs` — first-order multiplets and the
    density-matrix PRESS echo — one panel per metabolite, ppm decreasing to the right.

    Uses matplotlib's object API. Returns the path.
    """
    Figure = require("matplotlib.figure", "matplotlib", "examples", "save_mrs_bases").Figure
    if not names:
        raise ValueError("names is empty")
    ppm = ppm_axis(2000)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(3.6 * columns, 2.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, name in zip(axes, names, strict=False):
        for basis, style in zip(BASES, ("-", "--"), strict=True):
            spectrum = metabolite_spectrum(name, ppm, lorentz_hz=lorentz_hz, gauss_hz=gauss_hz,
                                           basis=basis).real
            axis.plot(ppm, spectrum, style, lw=1.0, label=basis)
        axis.set_xlim(ppm.max(), ppm.min())
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("ppm", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes[len(names):]:
        axis.set_visible(False)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"PRESS TE 30 ms at {FIELD_MHZ} MHz: first-order multiplets vs "
                    "density-matrix simulation", fontsize=9)
    figure.tight_layout()
    return _save(figure, path, dpi)

