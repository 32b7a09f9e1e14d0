"""The MNI152 T1 template, read through the installed nilearn package and kept in memory."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from fastinfluence._optional import require

_BRAIN_THRESHOLD = 0.05
_DISTANCE_STEP = 2  # voxels; the distance maps are computed on a 2 mm grid (fast, smooth enough)
_HULL_CLOSING_MM = 28.0  # closes the skull-base notches so the skull is drawn around, not into


@dataclass(frozen=True)
class Template:
    """Template volume (values in [0, 1], background 0) and derived maps, in voxel space.

    ``world_to_voxel`` maps MNI millimetres (homogeneous coordinates) to voxel indices of
    ``volume``. The signed distances (mm, negative inside) to the brain surface and to the
    intracranial hull (the brain mask after a morphological closing) live on a grid that is
    ``distance_step`` times coarser.
    """

    volume: np.ndarray
    brain_distance: np.ndarray
    hull_distance: np.ndarray
    world_to_voxel: np.ndarray
    distance_step: int

    def voxel(self, points: np.ndarray) -> np.ndarray:
        """MNI millimetres ``[..., 3]`` -> voxel indices ``[3, ...]`` for ``map_coordinates``."""
        rotation, offset = self.world_to_voxel[:3, :3], self.world_to_voxel[:3, 3]
        return np.moveaxis(points @ rotation.T + offset, -1, 0)

    def sample(self, points: np.ndarray) -> np.ndarray:
        """Trilinear template intensity at MNI points ``[..., 3]`` (0 outside the volume)."""
        return ndimage.map_coordinates(self.volume, self.voxel(points), order=1, cval=0.0)

    def brain(self, points: np.ndarray) -> np.ndarray:
        """Signed distance to the brain surface (mm, < 0 inside) at MNI points ``[..., 3]``."""
        return self._coarse(self.brain_distance, points)

    def hull(self, points: np.ndarray) -> np.ndarray:
        """Signed distance to the intracranial hull (mm, < 0 inside) at MNI points."""
        return self._coarse(self.hull_distance, points)

    def _coarse(self, grid: np.ndarray, points: np.ndarray) -> np.ndarray:
        coords = self.voxel(points) / self.distance_step
        return ndimage.map_coordinates(grid, coords, order=1, mode="nearest")


def _signed_distance(mask: np.ndarray, step: float) -> np.ndarray:
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    return ((outside - inside) * step).astype(np.float32)


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the 1 mm MNI152 T1 template from nilearn's wheel (no download) and derive the
    signed distance maps. Cached for the life of the process, never on disk."""
    nilearn_datasets = require(
        "nilearn.datasets", "nilearn", "datasets", "the brain-tumour generator (MNI152 template)"
    )
    image = nilearn_datasets.load_mni152_template(resolution=1)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    volume = np.clip(volume / volume.max(), 0.0, 1.0)
    brain = ndimage.binary_fill_holes(volume > _BRAIN_THRESHOLD)
    coarse = brain[::_DISTANCE_STEP, ::_DISTANCE_STEP, ::_DISTANCE_STEP]
    radius = _HULL_CLOSING_MM / _DISTANCE_STEP
    dilated = ndimage.distance_transform_edt(~coarse) <= radius
    hull = (ndimage.distance_transform_edt(dilated) > radius) | coarse
    return Template(
        volume=volume,
        brain_distance=_signed_distance(coarse, _DISTANCE_STEP),
        hull_distance=_signed_distance(hull, _DISTANCE_STEP),
        world_to_voxel=np.linalg.inv(np.asarray(image.affine, dtype=np.float64)),
        distance_step=_DISTANCE_STEP,
    )
