"""Loader for the real figshare brain-tumour data set (Cheng et al., 3,064 ``.mat`` files).

Each slice is a MATLAB v7.3 file (HDF5 with a 512-byte MATLAB header) holding a struct
``cjdata`` with ``label`` (1 meningioma, 2 glioma, 3 pituitary), ``PID`` (the patient id as
MATLAB characters, stored as uint16 codes), ``image`` (int16, 512² or 256²), ``tumorMask``
(logical) and ``tumorBorder``. ``cvind.mat`` holds ``cvind``, the 5-fold cross-validation fold
of every slice. MATLAB stores arrays column-major, so HDF5 sees them transposed; the loader
transposes them back to MATLAB's orientation.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastinfluence._optional import require
from fastinfluence.datasets.brain_tumour import CLASS_NAMES, BrainTumourData

_FIELDS = ("label", "PID", "image", "tumorMask")


def load_figshare_brain_tumour(
    root: str | Path,
    *,
    image_size: int | None = 256,
    progress: bool | None = None,
) -> BrainTumourData:
    """Read the figshare brain-tumour ``.mat`` files in ``root``.

    Slices are read in the numeric order of their file names (``1.mat``, ``2.mat``, ...);
    ``cvind.mat``, if present, gives the ``folds`` of the result (file ``k.mat`` takes entry
    ``k``). Each image is scaled to [0, 1] by its maximum (as the authors' code did) and
    resized to ``image_size`` (bilinear with antialiasing; masks by area coverage >= 0.5).

    Args:
        root: folder with the ``.mat`` files.
        image_size: output side; the authors' code used 256. None keeps the stored size,
            which must then be the same for all slices.
        progress: show a progress bar (default: for 1,000 files or more).

    Returns:
        A :class:`BrainTumourData` with labels 0 meningioma, 1 glioma, 2 pituitary.
    """
    h5py = require("h5py", "h5py", "datasets", "reading MATLAB v7.3 files")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root is not a folder: {root}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    files = sorted(
        (p for p in root.glob("*.mat") if p.stem != "cvind"), key=lambda p: _file_number(p)
    )
    if not files:
        raise FileNotFoundError(f"no slice .mat files in {root}")
    show = len(files) >= 1000 if progress is None else progress
    images, masks, labels, pids = [], [], [], []
    for path in tqdm(files, desc="figshare slices", unit="file", disable=not show):
        with h5py.File(path, "r") as handle:
            if "cjdata" not in handle:
                raise ValueError(f"{path.name}: no 'cjdata' struct (not a figshare slice file)")
            record = handle["cjdata"]
            missing = [name for name in _FIELDS if name not in record]
            if missing:
                raise ValueError(f"{path.name}: cjdata lacks {missing}")
            label = int(np.asarray(record["label"]).ravel()[0])
            pid = "".join(chr(int(c)) for c in np.asarray(record["PID"]).ravel())
            image = np.asarray(record["image"], dtype=np.float32).T
            mask = np.asarray(record["tumorMask"]).T.astype(bool)
        if label not in (1, 2, 3):
            raise ValueError(f"{path.name}: label must be 1, 2 or 3, got {label}")
        if image.shape != mask.shape:
            raise ValueError(f"{path.name}: image {image.shape} and mask {mask.shape} differ")
        image = np.clip(image, 0.0, None)
        peak = image.max()
        image = image / peak if peak > 0 else image
        image_t, mask_t = _resize(torch.from_numpy(image), torch.from_numpy(mask), image_size)
        images.append(image_t)
        masks.append(mask_t)
        labels.append(label - 1)
        pids.append(pid)
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ValueError(f"slices have different sizes {sorted(shapes)}; pass image_size")
    return BrainTumourData(
        images=torch.stack(images)[:, None],
        labels=torch.tensor(labels, dtype=torch.int64),
        patient_ids=np.asarray(pids),
        masks=torch.stack(masks)[:, None],
        class_names=CLASS_NAMES,
        folds=_folds(root / "cvind.mat", files, h5py),
    )


def _file_number(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (np.iinfo(np.int64).max, path.stem)


def _resize(
    image: torch.Tensor, mask: torch.Tensor, size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if size is None or tuple(image.shape) == (size, size):
        return image, mask
    image = F.interpolate(
        image[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0, 0].clamp(0, 1)
    coverage = F.interpolate(mask[None, None].float(), size=(size, size), mode="area")
    return image, coverage[0, 0] >= 0.5


def _folds(path: Path, files: list[Path], h5py: ModuleType) -> torch.Tensor | None:
    if not path.exists():
        return None
    with h5py.File(path, "r") as handle:
        if "cvind" not in handle:
            raise ValueError(f"{path.name}: no 'cvind' variable")
        folds = np.asarray(handle["cvind"]).ravel().astype(np.int64)
    numbers = [_file_number(p)[0] for p in files]
    if any(not 1 <= k <= len(folds) for k in numbers):
        raise ValueError(
            f"{path.name} has {len(folds)} entries but slice files are numbered up to "
            f"{max(numbers)} (or not numbered)"
        )
    return torch.from_numpy(folds[np.asarray(numbers) - 1])
