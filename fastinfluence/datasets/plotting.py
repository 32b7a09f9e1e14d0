"""A look at brain-tumour data: clean / noisy / mask images per class, saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastinfluence._optional import require
from fastinfluence.datasets.brain_tumour import BrainTumourData
from fastinfluence.datasets.noise import NoiseKind, add_noise


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

    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    rows: list[int] = []
    for label in range(len(data.class_names)):
        members = np.nonzero(labels == label)[0]
        rows += [int(i) for i in rng.choice(members, min(per_class, len(members)), replace=False)]
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
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
