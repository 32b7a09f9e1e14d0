"""Loaders for the ISIC dermoscopy challenges: ISIC 2017 part 3 and ISIC 2018 task 3.

Both ship a folder of JPEG images named ``<image id>.jpg`` (ISIC 2017 also ships
``<image id>_superpixels.png`` files, which are skipped) and a ground-truth CSV with one row
per image. Columns are selected by name, so extra columns and any column order are fine:

* ISIC 2017: ``image_id``, ``melanoma``, ``seborrheic_keratosis`` (0/1; nevus when both 0);
* ISIC 2018: ``image`` and the one-hot diagnosis columns ``MEL, NV, BCC, AKIEC, BKL, DF, VASC``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastinfluence._optional import require

ISIC2017_CLASSES: tuple[str, ...] = ("melanoma", "seborrheic_keratosis", "nevus")
ISIC2018_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
SKIN4_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "BKL")
"""The denoising paper's SKIN4 task: the ISIC 2018 diagnoses with more than 500 images."""
SKIN4_MAX_PER_CLASS: dict[str, int] = {"NV": 1500}
"""The paper kept a random 1,500 of ISIC 2018's 6,705 nevi (and every MEL, BCC, BKL image)."""
BINARY_CLASSES: tuple[str, ...] = ("benign", "melanoma")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class SkinLesionData:
    """Dermoscopy images ``[N, 3, H, W]`` float32 in [0, 1], int64 labels, image ids."""

    images: torch.Tensor
    labels: torch.Tensor
    image_ids: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_isic2017(
    image_dir: str | Path,
    ground_truth_csv: str | Path,
    *,
    image_size: int | None = 224,
    binary: bool = True,
    progress: bool | None = None,
) -> SkinLesionData:
    """Read ISIC 2017 part 3 (lesion classification).

    Args:
        image_dir: folder of ``<image_id>.jpg`` files (superpixel files are ignored).
        ground_truth_csv: the part-3 ground-truth CSV.
        image_size: resize to ``image_size``² (bilinear; the skin paper used 224); None
            keeps the stored size, which must then be the same for all images.
        binary: melanoma (1) vs benign (0), the skin paper's task; otherwise three classes
            ``ISIC2017_CLASSES`` (melanoma, seborrheic keratosis, nevus).
        progress: show a progress bar (default: for 1,000 images or more).
    """
    ids, table = _read_csv(ground_truth_csv, "image_id", ["melanoma", "seborrheic_keratosis"])
    if (table.sum(axis=1) > 1).any():
        row = int(np.nonzero(table.sum(axis=1) > 1)[0][0])
        raise ValueError(f"{ids[row]}: both melanoma and seborrheic_keratosis are set")
    if binary:
        labels, names = table[:, 0].astype(np.int64), BINARY_CLASSES
    else:
        labels = np.where(table[:, 0] == 1, 0, np.where(table[:, 1] == 1, 1, 2))
        names = ISIC2017_CLASSES
    return _assemble(image_dir, ids, labels, names, image_size, progress)


def load_isic2018(
    image_dir: str | Path,
    ground_truth_csv: str | Path,
    *,
    image_size: int | None = 224,
    binary: bool = False,
    classes: Sequence[str] | None = None,
    max_per_class: Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> SkinLesionData:
    """Read ISIC 2018 task 3 (seven diagnoses, one-hot ground truth).

    The denoising paper's SKIN4 set is ``classes=SKIN4_CLASSES,
    max_per_class=SKIN4_MAX_PER_CLASS`` (MEL, NV, BCC, BKL; a random 1,500 of the nevi).

    Args:
        image_dir: folder of ``<image>.jpg`` files.
        ground_truth_csv: the task-3 ground-truth CSV.
        image_size: resize to ``image_size``² (bilinear); None keeps the stored size.
        binary: melanoma (``MEL``, 1) vs the rest (0); otherwise the diagnoses as classes.
        classes: keep only images of these diagnoses, labelled in this order (default: the
            seven ``ISIC2018_CLASSES`` in the CSV's column order).
        max_per_class: keep at most this many images of a diagnosis, chosen at random
            (seeded by ``seed``) before any image is read; the kept images stay in CSV order.
        seed: seeds ``max_per_class``'s choice.
        progress: show a progress bar (default: for 1,000 images or more).
    """
    ids, table = _read_csv(ground_truth_csv, "image", list(ISIC2018_CLASSES))
    bad = np.nonzero(table.sum(axis=1) != 1)[0]
    if bad.size:
        raise ValueError(f"{ids[bad[0]]}: the diagnosis columns must be one-hot")
    diagnoses = np.asarray(ISIC2018_CLASSES)[table.argmax(axis=1)]
    names = ISIC2018_CLASSES if classes is None else tuple(classes)
    unknown = sorted(set(names) - set(ISIC2018_CLASSES)
                     | set(max_per_class or {}) - set(ISIC2018_CLASSES))
    if unknown:
        raise ValueError(f"unknown ISIC 2018 diagnoses {unknown}; known: {ISIC2018_CLASSES}")
    keep = np.isin(diagnoses, names)
    rng = np.random.default_rng(seed)
    for diagnosis, limit in (max_per_class or {}).items():
        rows = np.nonzero(keep & (diagnoses == diagnosis))[0]
        if len(rows) > limit:
            keep[rng.choice(rows, size=len(rows) - limit, replace=False)] = False
    if not keep.any():
        raise ValueError(f"no image of the diagnoses {names} in {Path(ground_truth_csv).name}")
    ids = [image_id for image_id, kept in zip(ids, keep, strict=True) if kept]
    diagnoses = diagnoses[keep]
    if binary:
        labels, names = (diagnoses == "MEL").astype(np.int64), BINARY_CLASSES
    else:
        labels = np.array([names.index(d) for d in diagnoses], dtype=np.int64)
    return _assemble(image_dir, ids, labels, names, image_size, progress)


def _read_csv(path: str | Path, id_column: str, columns: list[str]) -> tuple[list[str], np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground_truth_csv not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [name for name in [id_column, *columns] if name not in header]
        if missing:
            raise ValueError(f"ground_truth_csv {path.name} lacks columns {missing}")
        reader.fieldnames = header
        rows = list(reader)
    if not rows:
        raise ValueError(f"ground_truth_csv {path.name} has no rows")
    ids = [row[id_column].strip() for row in rows]
    try:
        table = np.array([[float(row[c]) for c in columns] for row in rows])
    except ValueError as error:
        raise ValueError(f"ground_truth_csv {path.name}: non-numeric label ({error})") from error
    if not np.isin(table, (0.0, 1.0)).all():
        raise ValueError(f"ground_truth_csv {path.name}: labels must be 0 or 1")
    return ids, table


def _assemble(
    image_dir: str | Path,
    ids: list[str],
    labels: np.ndarray,
    names: tuple[str, ...],
    image_size: int | None,
    progress: bool | None,
) -> SkinLesionData:
    Image = require("PIL.Image", "Pillow", "datasets", "reading ISIC images")

    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image_dir is not a folder: {folder}")
    files = {
        p.stem: p
        for p in folder.iterdir()
        if p.suffix.lower() in _IMAGE_SUFFIXES and not p.stem.endswith("_superpixels")
    }
    missing = [i for i in ids if i not in files]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing from {folder}, e.g. {missing[0]}")
    show = len(ids) >= 1000 if progress is None else progress
    arrays = []
    for image_id in tqdm(ids, desc="ISIC images", unit="image", disable=not show):
        with Image.open(files[image_id]) as image:
            rgb = image.convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass image_size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return SkinLesionData(
        images=images.contiguous(),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        image_ids=np.asarray(ids),
        class_names=names,
    )
