"""Loader for the RSNA Pneumonia Detection Challenge (stage 2) in its own file format.

The challenge ships (column order does not matter; columns are found by name):

* ``stage_2_train_labels.csv``: ``patientId, x, y, width, height, Target`` — one row per
  opacity bounding box (pixels of the stored image, origin top left) with ``Target`` 1, or
  one row with empty box fields and ``Target`` 0;
* ``stage_2_detailed_class_info.csv``: ``patientId, class`` with ``class`` one of
  ``Normal``, ``Lung Opacity``, ``No Lung Opacity / Not Normal`` (repeated once per box);
* ``stage_2_train_images/<patientId>.dcm``: one frontal film per patient, 1,024² 8-bit
  ``MONOCHROME2`` DICOM.

DICOM files are read with pydicom (``pip install pydicom``; uncompressed pixel data needs
nothing else). Folders of ``<patientId>.png`` / ``.jpg`` (e.g. the DICOMs converted once with
another tool) are read with Pillow and need no pydicom.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastinfluence._optional import require
from fastinfluence.datasets.chest_xray import CLASS_NAMES, ChestXrayData

_IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")
_OPACITY = CLASS_NAMES.index("Lung Opacity")


def load_rsna_pneumonia(
    image_dir: str | Path,
    labels_csv: str | Path,
    class_info_csv: str | Path,
    *,
    image_size: int | None = 224,
    progress: bool | None = None,
) -> ChestXrayData:
    """Read the RSNA pneumonia challenge's training set as a :class:`ChestXrayData`.

    Labels are the three classes of ``class_info_csv`` (``CLASS_NAMES`` order: 0 Normal,
    1 Lung Opacity, 2 No Lung Opacity / Not Normal); ``masks`` are the union of each film's
    opacity boxes from ``labels_csv``, scaled with the image. Films are in the order of their
    first row in ``class_info_csv``; ``image_ids`` and ``patient_ids`` are the patientIds.

    Args:
        image_dir: folder of ``<patientId>.dcm`` (needs pydicom), ``.png`` or ``.jpg`` files.
        labels_csv: ``stage_2_train_labels.csv``.
        class_info_csv: ``stage_2_detailed_class_info.csv``.
        image_size: resize to ``image_size``² (bilinear, antialiased); None keeps the stored
            size, which must then be the same for all films.
        progress: show a progress bar (default: for 1,000 films or more).

    Raises:
        FileNotFoundError: a file or folder is missing, or a patient has no image.
        ValueError: missing columns, an unknown class, a patient whose rows disagree, a
            ``Target`` that contradicts the class, or images of different sizes.
        ImportError: ``.dcm`` files without pydicom installed (with the command to install it).
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    classes = _read_classes(class_info_csv)
    boxes = _read_boxes(labels_csv)
    unlabelled = sorted(set(boxes) - set(classes))
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} patients of {Path(labels_csv).name} have no class "
                         f"in {Path(class_info_csv).name}, e.g. {unlabelled[0]}")
    for pid, label in classes.items():
        has_box = bool(boxes.get(pid))
        if has_box != (label == _OPACITY):
            raise ValueError(f"{pid}: class {CLASS_NAMES[label]!r} but Target "
                             f"{int(has_box)} in {Path(labels_csv).name}")
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image_dir is not a folder: {folder}")
    files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    ids = list(classes)
    missing = [pid for pid in ids if pid not in files]
    if missing:
        raise FileNotFoundError(f"{len(missing)} films missing from {folder}, e.g. {missing[0]}")
    show = len(ids) >= 1000 if progress is None else progress
    images, masks = [], []
    for pid in tqdm(ids, desc="RSNA films", unit="film", disable=not show):
        film = _read_film(files[pid])
        mask = _box_mask(film.shape, boxes.get(pid, []))
        if image_size is not None and film.shape != (image_size, image_size):
            film = _resize(film, image_size, antialias=True)
            mask = _resize(mask.astype(np.float32), image_size, antialias=False) >= 0.5
        images.append(film)
        masks.append(mask)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"films have different sizes {sorted(shapes)}; pass image_size")
    return ChestXrayData(
        images=torch.from_numpy(np.stack(images)[:, None].astype(np.float32)),
        labels=torch.tensor([classes[pid] for pid in ids], dtype=torch.int64),
        image_ids=np.asarray(ids),
        patient_ids=np.asarray(ids),
        masks=torch.from_numpy(np.stack(masks)[:, None]),
    )


def _rows(path: str | Path, columns: list[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        lacking = [name for name in columns if name not in header]
        if lacking:
            raise ValueError(f"{path.name} lacks columns {lacking}")
        reader.fieldnames = header
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise ValueError(f"{path.name} has no rows")
    return rows


def _read_classes(path: str | Path) -> dict[str, int]:
    classes: dict[str, int] = {}
    for row in _rows(path, ["patientId", "class"]):
        if row["class"] not in CLASS_NAMES:
            raise ValueError(f"{row['patientId']}: unknown class {row['class']!r} in "
                             f"{Path(path).name} (expected one of {CLASS_NAMES})")
        label = CLASS_NAMES.index(row["class"])
        if classes.setdefault(row["patientId"], label) != label:
            raise ValueError(f"{row['patientId']} has two classes in {Path(path).name}")
    return classes


def _read_boxes(path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for row in _rows(path, ["patientId", "x", "y", "width", "height", "Target"]):
        pid, target = row["patientId"], row["Target"]
        if target not in ("0", "1"):
            raise ValueError(f"{pid}: Target must be 0 or 1, got {target!r}")
        listed = boxes.setdefault(pid, [])
        if target == "1":
            try:
                box = tuple(float(row[k]) for k in ("x", "y", "width", "height"))
            except ValueError as error:
                raise ValueError(f"{pid}: Target 1 needs a numeric box ({error})") from error
            listed.append(box)  # type: ignore[arg-type]
        elif listed:
            raise ValueError(f"{pid} has Target 0 and Target 1 rows")
    return boxes


def _read_film(path: Path) -> np.ndarray:
    """A film as float32 ``[H, W]`` in [0, 1], bright = dense."""
    if path.suffix.lower() == ".dcm":
        pydicom = require("pydicom", "pydicom", "datasets", "reading RSNA DICOM films")
        dataset = pydicom.dcmread(path)
        pixels = np.asarray(dataset.pixel_array, dtype=np.float64)
        if pixels.ndim != 2:
            raise ValueError(f"{path.name}: expected one grayscale frame, got {pixels.shape}")
        bits = int(getattr(dataset, "BitsStored", 8))
        film = pixels / (2**bits - 1)
        if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
            film = 1.0 - film  # MONOCHROME1 stores dense as dark
        return np.clip(film, 0.0, 1.0).astype(np.float32)
    image_module = require("PIL.Image", "Pillow", "datasets", "reading RSNA films")
    with image_module.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _box_mask(shape: tuple[int, ...], boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Pixels whose centres lie in any box (``x, y, width, height`` in pixels)."""
    rows = np.arange(shape[0])[:, None] + 0.5
    cols = np.arange(shape[1])[None, :] + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x, y, width, height in boxes:
        mask |= (cols >= x) & (cols < x + width) & (rows >= y) & (rows < y + height)
    return mask


def _resize(array: np.ndarray, size: int, *, antialias: bool) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=antialias)
    return resized[0, 0].clamp(0.0, 1.0).numpy()
