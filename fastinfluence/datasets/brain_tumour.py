"""Seeded brain-tumour MRI slices built on real anatomy (the MNI152 T1 template).

Mimics the figshare brain-tumour data set used by the ISR/ISP paper (Cheng et al.; 3,064
contrast-enhanced T1 slices of 233 patients: 708 meningioma, 1,426 glioma, 930 pituitary
slices from 82, 89 and 62 patients). See :func:`make_brain_tumour` for what is modelled and
where it differs from the real scans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from fastinfluence.datasets.mni_template import Template, load_template

CLASS_NAMES: tuple[str, str, str] = ("meningioma", "glioma", "pituitary")
PAPER_SLICES_PER_CLASS: tuple[int, int, int] = (708, 1426, 930)
PAPER_PATIENTS_PER_CLASS: tuple[int, int, int] = (82, 89, 62)

_FIELD_OF_VIEW_MM = 220.0
_FINEST_SAMPLE_MM = 2.0  # supersample until a sub-pixel is at most this wide, then average
_EDGE_MM = 0.7  # width of the soft lesion and layer boundaries
DEFAULT_LESION_CONTRAST = 1.0


@dataclass
class BrainTumourData:
    """Brain-tumour slices: images ``[N, 1, H, W]`` float32 in [0, 1], labels ``[N]`` int64
    (0 meningioma, 1 glioma, 2 pituitary), one patient id per slice, tumour masks
    ``[N, 1, H, W]`` bool, and (real data only) the cross-validation fold of each slice."""

    images: torch.Tensor
    labels: torch.Tensor
    patient_ids: np.ndarray
    masks: torch.Tensor
    class_names: tuple[str, ...] = CLASS_NAMES
    folds: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be [N, 1, H, W], got {tuple(self.images.shape)}")
        if self.masks.shape != self.images.shape:
            raise ValueError(
                f"masks must match images {tuple(self.images.shape)}, got {tuple(self.masks.shape)}"
            )
        self.patient_ids = np.asarray(self.patient_ids, dtype=str)
        sizes = {"labels": len(self.labels), "patient_ids": len(self.patient_ids)}
        if self.folds is not None:
            sizes["folds"] = len(self.folds)
        for name, size in sizes.items():
            if size != n:
                raise ValueError(f"{name} has {size} entries for {n} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> BrainTumourData:
        """The slices at ``indices`` (e.g. one split of :func:`split_by_patient`)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return BrainTumourData(
            images=self.images[index],
            labels=self.labels[index],
            patient_ids=self.patient_ids[index.numpy()],
            masks=self.masks[index],
            class_names=self.class_names,
            folds=None if self.folds is None else self.folds[index],
        )


def make_brain_tumour(
    n_slices: int | None = None,
    n_patients: int | None = None,
    image_size: int | None = None,
    *,
    seed: int = 0,
    lesion_contrast: float = DEFAULT_LESION_CONTRAST,
    anatomy_variation: float = 1.0,
    paper_size: bool = False,
    progress: bool | None = None,
) -> BrainTumourData:
    """Generate a seeded brain-tumour data set from axial slices of the MNI152 T1 template.

    Each patient gets one tumour class (slices in the paper's 708:1,426:930 proportions,
    patients in its 82:89:62 proportions) and its own anatomy: a 3-D affine (in-plane
    rotation, small tilt, anisotropic scale, head position), an in-plane elastic
    deformation, a smooth multiplicative bias field and intensity jitter (tissue gamma,
    scalp and marrow brightness). A synthetic skull (CSF, inner table, diploe, outer table,
    scalp) is drawn around the skull-stripped template. Lesions are 3-D, irregular, displace
    the surrounding brain (mass effect) and every slice of a patient cuts through its lesion:

    * meningioma (0): extra-axial, homogeneously enhancing, with a broad dural base, at the
      convexity, along the falx, or at the skull base (sphenoid wing, olfactory groove,
      parasellar), sometimes with a dural tail;
    * glioma (1): intra-axial in the hemispheres, irregular enhancing rim around a dark
      necrotic core with surrounding (T1-dark) oedema; a quarter are non-enhancing;
    * pituitary (2): at the sella on the midline, often with a suprasellar lobe, sometimes
      cystic.

    Images are scaled to [0, 1] per image by their maximum (as the authors' code did) and
    carry no noise: add it with :func:`fastinfluence.datasets.add_noise`.

    Where it differs from the real data: all slices are axial (the real set mixes axial,
    coronal and sagittal views) and closer together than the real 6 mm + 1 mm spacing; the
    anatomy is one template deformed, not 233 brains; no vessels, orbits, sinuses or
    scanner-specific contrast; the skull is a layered shell; the lesions are painted shapes.

    Args:
        n_slices: number of slices (default 600; paper 3,064).
        n_patients: number of patients (default 120; paper 233); at most ``n_slices``.
        image_size: side of the square images (default 64; the paper used 512, the
            authors' code 256).
        seed: everything is a deterministic function of the seed and the sizes.
        lesion_contrast: scales how strongly lesions stand out from the tissue under them
            (1 is the calibrated default; larger is easier, smaller harder).
        anatomy_variation: scales all per-patient anatomical and intensity variation
            (0 gives every patient the template anatomy).
        paper_size: default sizes to the paper's (3,064 slices, 233 patients, 256²).
        progress: show a progress bar (default: only for 1,000 slices or more).

    Returns:
        A :class:`BrainTumourData`; slices are grouped by patient, patients in random order.
    """
    n_slices = _resolve(n_slices, 3064 if paper_size else 600)
    n_patients = _resolve(n_patients, 233 if paper_size else 120)
    image_size = _resolve(image_size, 256 if paper_size else 64)
    _check_sizes(n_slices, n_patients, image_size)
    if not (np.isfinite(lesion_contrast) and lesion_contrast > 0):
        raise ValueError(f"lesion_contrast must be positive, got {lesion_contrast}")
    if not (np.isfinite(anatomy_variation) and anatomy_variation >= 0):
        raise ValueError(f"anatomy_variation must be >= 0, got {anatomy_variation}")

    rng = np.random.default_rng([seed, 0])
    patients_per_class = _apportion(n_patients, PAPER_PATIENTS_PER_CLASS, minimum=1)
    # A class left without patients (fewer patients than classes) gets no slices either.
    slice_weights = [
        w if n_p else 0.0
        for w, n_p in zip(PAPER_SLICES_PER_CLASS, patients_per_class, strict=True)
    ]
    slices_per_class = _apportion(n_slices, slice_weights, minimum=patients_per_class)
    patient_classes: list[int] = []
    patient_slices: list[int] = []
    for label, (n_p, n_s) in enumerate(zip(patients_per_class, slices_per_class, strict=True)):
        if n_p == 0:
            continue
        shares = rng.dirichlet(np.full(n_p, 3.0))
        patient_slices += list(1 + rng.multinomial(n_s - n_p, shares))
        patient_classes += [label] * n_p
    order = rng.permutation(len(patient_classes))

    template = load_template()
    renderer = _Renderer(template, image_size)
    images = np.empty((n_slices, image_size, image_size), dtype=np.float32)
    masks = np.empty((n_slices, image_size, image_size), dtype=bool)
    labels = np.empty(n_slices, dtype=np.int64)
    pids: list[str] = []
    show = n_slices >= 1000 if progress is None else progress
    bar = tqdm(total=n_slices, desc="brain-tumour slices", unit="slice", disable=not show)
    start = 0
    for rank, patient in enumerate(order):
        label, count = patient_classes[patient], int(patient_slices[patient])
        patient_rng = np.random.default_rng([seed, 1, int(patient)])
        anatomy = _Anatomy.draw(patient_rng, renderer, anatomy_variation)
        lesion = _draw_lesion(label, patient_rng, template, lesion_contrast)
        for offset, level in enumerate(_slice_levels(lesion, anatomy, count, patient_rng)):
            image, mask = renderer.render(anatomy, lesion, level)
            images[start + offset], masks[start + offset] = image, mask
        labels[start : start + count] = label
        pids += [f"P{rank:03d}"] * count
        start += count
        bar.update(count)
    bar.close()
    return BrainTumourData(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels),
        patient_ids=np.asarray(pids),
        masks=torch.from_numpy(masks).unsqueeze(1),
    )


def _resolve(value: int | None, default: int) -> int:
    return default if value is None else value


def _check_sizes(n_slices: int, n_patients: int, image_size: int) -> None:
    for name, value in (("n_slices", n_slices), ("n_patients", n_patients)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_patients > n_slices:
        raise ValueError(
            f"n_patients ({n_patients}) must not exceed n_slices ({n_slices}): every patient "
            "has at least one slice"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise ValueError(f"image_size must be an integer, got {image_size!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")


def _apportion(total: int, weights: Sequence[float], minimum: int | Sequence[int] = 0) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder), each part at least
    ``minimum`` while the total allows, filling the largest weights first."""
    weights = np.asarray(weights, dtype=np.float64)
    floors = np.broadcast_to(np.asarray(minimum), weights.shape).astype(np.int64)
    order = np.argsort(-weights, kind="stable")
    counts = np.zeros_like(floors)
    left = total
    for k in order:  # guarantee the minimums first, largest classes first
        counts[k] = min(floors[k], left)
        left -= counts[k]
    ideal = weights / weights.sum() * total
    extra = np.clip(ideal - counts, 0, None)
    if left and extra.sum() > 0:
        share = extra / extra.sum() * left
        add = np.floor(share).astype(np.int64)
        remainder = share - add
        for k in np.argsort(-remainder, kind="stable")[: left - int(add.sum())]:
            add[k] += 1
        counts += add
    elif left:
        counts[order[0]] += left
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------
# Patient anatomy


@dataclass
class _Anatomy:
    """One patient's mapping from the image plane to the template, and its intensity look."""

    rotation: np.ndarray  # patient mm -> template mm (3x3), includes scale
    shift: np.ndarray  # template mm
    warp: np.ndarray  # [2, G, G] elastic in-plane displacement (mm) on the sub-pixel grid
    bias: np.ndarray  # [4] coefficients of a smooth log-bias field
    bias_quadratic: np.ndarray  # [3]
    gamma: float
    layers: np.ndarray  # [6] outer boundaries (mm outside the hull) of CSF .. scalp
    layer_values: np.ndarray  # [5] intensities of CSF, inner table, diploe, outer table, scalp

    @classmethod
    def draw(cls, rng: np.random.Generator, renderer: _Renderer, variation: float) -> _Anatomy:
        v = variation
        yaw = np.deg2rad(rng.uniform(-12, 12) * v)
        pitch = np.deg2rad(rng.uniform(-4, 4) * v)
        roll = np.deg2rad(rng.uniform(-4, 4) * v)
        scale = 1.0 + rng.uniform(-0.08, 0.08, size=3) * v
        rotation = _rotation(yaw, pitch, roll) @ np.diag(1.0 / scale)
        shift = np.array([rng.uniform(-6, 6) * v, rng.uniform(-6, 6) * v, 0.0])
        coarse = rng.normal(0.0, 2.5 * v, size=(2, 5, 5))
        zoom = renderer.grid / 5
        warp = np.stack(
            [ndimage.zoom(c, zoom, order=3, grid_mode=True, mode="grid-constant") for c in coarse]
        )
        thickness = np.array(
            [
                rng.uniform(1.5, 3),
                rng.uniform(1.5, 2.5),
                rng.uniform(2, 4),
                rng.uniform(1.5, 2.5),
                rng.uniform(4, 8),
            ]
        )
        layer_values = np.array([0.06, 0.02, rng.uniform(0.3, 0.55), 0.02, rng.uniform(0.5, 0.95)])
        return cls(
            rotation=rotation,
            shift=shift,
            warp=warp,
            bias=rng.normal(0.0, 0.12 * v, size=4),
            bias_quadratic=rng.normal(0.0, 0.08 * v, size=3),
            gamma=float(np.exp(rng.normal(0.0, 0.12 * v))),
            layers=np.concatenate([[0.5], 0.5 + np.cumsum(thickness)]),
            layer_values=layer_values,
        )

    def to_template(self, points: np.ndarray) -> np.ndarray:
        return points @ self.rotation.T + self.shift

    def to_patient(self, points: np.ndarray) -> np.ndarray:
        return (points - self.shift) @ np.linalg.inv(self.rotation).T

    def bias_field(self, points: np.ndarray) -> np.ndarray:
        x = points / 100.0
        log_bias = x @ self.bias[:3] + self.bias[3] * x[..., 0] * x[..., 1]
        log_bias = log_bias + (x**2) @ self.bias_quadratic
        return np.exp(log_bias)

    def head(self, hull_distance: np.ndarray) -> np.ndarray:
        """Skull and scalp intensities from the distance outside the intracranial hull."""
        value = np.zeros_like(hull_distance)
        for inner, outer, level in zip(
            self.layers[:-1], self.layers[1:], self.layer_values, strict=True
        ):
            value += level * _box(hull_distance, inner, outer)
        return value


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    about_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return about_z @ about_x @ about_y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _box(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return _sigmoid((x - low) / _EDGE_MM) * _sigmoid((high - x) / _EDGE_MM)


# ---------------------------------------------------------------------------------------------
# Lesions


@dataclass
class _Blob:
    """An irregular ellipsoid: level < 1 inside; the boundary wobbles by random plane waves."""

    centre: np.ndarray
    axes: np.ndarray
    frequencies: np.ndarray  # [K, 3], in cycles per semi-axis
    phases: np.ndarray  # [K]
    amplitudes: np.ndarray  # [K]

    @classmethod
    def draw(
        cls, rng: np.random.Generator, centre: np.ndarray, axes: np.ndarray, irregularity: float
    ) -> _Blob:
        k = 6
        directions = rng.normal(size=(k, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return cls(
            centre=np.asarray(centre, dtype=np.float64),
            axes=np.asarray(axes, dtype=np.float64),
            frequencies=directions * rng.uniform(0.3, 0.9, size=(k, 1)),
            phases=rng.uniform(0, 2 * np.pi, size=k),
            amplitudes=rng.uniform(0, irregularity, size=k) / np.sqrt(k),
        )

    def wobble(self, points: np.ndarray) -> np.ndarray:
        """The smooth random field that makes the boundary irregular."""
        scaled = (points - self.centre) / self.axes
        return np.sin(2 * np.pi * scaled @ self.frequencies.T + self.phases) @ self.amplitudes

    def level(self, points: np.ndarray) -> np.ndarray:
        scaled = (points - self.centre) / self.axes
        return np.sqrt((scaled**2).sum(-1)) - self.wobble(points)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Soft occupancy of ``level < 1`` with an edge about ``_EDGE_MM`` wide."""
        return _sigmoid((1.0 - self.level(points)) * self.axes.mean() / _EDGE_MM)


@dataclass
class _Lesion:
    body: list[_Blob]  # union of blobs = the tumour (the mask)
    contrast: float  # fraction of the way from tissue to the lesion's own intensity
    value: float  # intensity of the enhancing tumour
    mass_effect: float  # fraction by which nearby tissue is pushed away
    texture: _Blob  # its wobble field modulates the lesion intensity
    core: _Blob | None = None  # glioma: necrotic core
    core_value: float = 0.0
    oedema: _Blob | None = None  # glioma: oedema extent
    oedema_depth: float = 0.0
    cyst: _Blob | None = None  # pituitary: cystic part
    dural_tail: float = 0.0  # meningioma: tail reach in units of the mean semi-axis
    clip_to_hull: bool = False  # extra-axial lesions stay inside the skull

    @property
    def centre(self) -> np.ndarray:
        return self.body[0].centre

    @property
    def radius(self) -> float:
        return float(self.body[0].axes.mean())

    def vertical_range(self) -> tuple[float, float]:
        low = min(b.centre[2] - b.axes[2] for b in self.body)
        high = max(b.centre[2] + b.axes[2] for b in self.body)
        return float(low), float(high)

    def displace(self, points: np.ndarray) -> np.ndarray:
        """Where the tissue now at ``points`` came from (radial push away from the centre)."""
        offset = points - self.centre
        distance = np.sqrt((offset**2).sum(-1, keepdims=True))
        shrink = 1.0 - self.mass_effect * np.exp(-((distance / (1.4 * self.radius)) ** 2))
        return self.centre + offset * shrink

    def reach(self) -> float:
        """Distance from the centre beyond which the lesion changes nothing but mass effect."""
        blobs = [*self.body, *(b for b in (self.core, self.oedema, self.cyst) if b is not None)]
        extent = max(
            _distance(b.centre, self.centre) + b.axes.max() * (1 + b.amplitudes.sum())
            for b in blobs
        )
        return float(max(extent, self.dural_tail * self.radius) + 4 * _EDGE_MM + 3.0)

    def paint(
        self, points: np.ndarray, tissue: np.ndarray, hull: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Paint the lesion over ``tissue``; returns (image, tumour occupancy in [0, 1])."""
        image, occupancy = tissue.copy(), np.zeros_like(tissue)
        near = _distance(points, self.centre) < self.reach()
        image[near], occupancy[near] = self._paint(points[near], tissue[near], hull[near])
        return image, occupancy

    def _paint(
        self, points: np.ndarray, tissue: np.ndarray, hull: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        occupancy = np.maximum.reduce([b.inside(points) for b in self.body])
        if self.clip_to_hull:
            occupancy = occupancy * _sigmoid((1.5 - hull) / _EDGE_MM)
        value = self.value * (1.0 + 0.15 * self.texture.wobble(points))
        if self.core is not None:
            core = self.core.inside(points)
            value = value * (1 - core) + self.core_value * core
        if self.cyst is not None:
            cyst = self.cyst.inside(points)
            value = value * (1 - cyst) + 0.25 * cyst
        if self.oedema is not None:
            swelling = self.oedema.inside(points) * (1 - occupancy) * (hull < 0)
            tissue = tissue * (1 - self.oedema_depth * swelling)
        if self.dural_tail:
            near = _sigmoid((self.dural_tail * self.radius - _distance(points, self.centre)) / 2.0)
            sheet = np.exp(-(((hull - 0.5) / 0.8) ** 2)) * near * (1 - occupancy)
            tissue = tissue + 0.6 * self.contrast * sheet * (self.value - tissue)
        return tissue + self.contrast * occupancy * (value - tissue), occupancy


def _distance(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return np.sqrt(((points - centre) ** 2).sum(-1))


def _draw_lesion(
    label: int, rng: np.random.Generator, template: Template, lesion_contrast: float
) -> _Lesion:
    contrast = float(np.clip(lesion_contrast * rng.uniform(0.6, 1.0), 0.0, 1.0))
    texture = _Blob.draw(rng, np.zeros(3), np.full(3, rng.uniform(4, 10)), 1.0)
    if label == 0:
        return _meningioma(rng, template, contrast, texture)
    if label == 1:
        return _glioma(rng, template, contrast, texture)
    return _pituitary(rng, contrast, texture)


def _meningioma(
    rng: np.random.Generator, template: Template, contrast: float, texture: _Blob
) -> _Lesion:
    radius = rng.uniform(12, 28)
    site = rng.choice(["convexity", "falx", "skull base"], p=[0.5, 0.25, 0.25])
    if site == "convexity":
        surface = _surface_point(rng, template)
        normal = _outward_normal(template, surface)
        centre = surface + normal * rng.uniform(0.0, 0.3) * radius
    elif site == "falx":
        side = rng.choice([-1.0, 1.0])
        centre = np.array(
            [side * rng.uniform(0, 0.4) * radius, rng.uniform(-60, 40), rng.uniform(5, 55)]
        )
    else:
        spot = rng.integers(3)
        side = rng.choice([-1.0, 1.0])
        centre = [
            np.array([side * rng.uniform(15, 40), rng.uniform(0, 15), rng.uniform(-25, -10)]),
            np.array([rng.uniform(-5, 5), rng.uniform(25, 45), rng.uniform(-20, -10)]),
            np.array([side * rng.uniform(8, 18), rng.uniform(-10, 5), rng.uniform(-35, -22)]),
        ][spot]
        radius = min(radius, 20.0)
    axes = radius * rng.uniform(0.8, 1.2, size=3)
    return _Lesion(
        body=[_Blob.draw(rng, centre, axes, irregularity=0.12)],
        contrast=contrast,
        value=rng.uniform(1.1, 1.4),
        mass_effect=rng.uniform(0.25, 0.5),
        texture=texture,
        dural_tail=rng.uniform(1.3, 2.0) if rng.random() < 0.5 else 0.0,
        clip_to_hull=True,
    )


def _surface_point(rng: np.random.Generator, template: Template) -> np.ndarray:
    """A random point on the convexity: near the hull surface, lateral or superior."""
    for _ in range(1000):
        point = np.array([rng.uniform(-75, 75), rng.uniform(-100, 70), rng.uniform(-5, 65)])
        if abs(point[0]) < 15 and point[2] < 40:
            continue
        # walk along the ray from the head centre to the hull surface
        centre = np.array([0.0, -18.0, 15.0])
        direction = (point - centre) / np.linalg.norm(point - centre)
        steps = centre + np.outer(np.arange(0, 120, 1.0), direction)
        outside = np.nonzero(template.hull(steps) > 0)[0]
        if outside.size:
            return steps[max(outside[0] - 1, 0)]
    raise RuntimeError("could not find a convexity point on the template")  # pragma: no cover


def _outward_normal(template: Template, point: np.ndarray) -> np.ndarray:
    offsets = np.eye(3) * 2.0
    gradient = template.hull(point + offsets) - template.hull(point - offsets)
    norm = np.linalg.norm(gradient)
    return gradient / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _glioma(
    rng: np.random.Generator, template: Template, contrast: float, texture: _Blob
) -> _Lesion:
    radius = rng.uniform(14, 30)
    centre = None
    for _ in range(1000):
        candidate = np.array(
            [
                rng.choice([-1.0, 1.0]) * rng.uniform(12, 55),
                rng.uniform(-80, 45),
                rng.uniform(-25, 55),
            ]
        )
        depth = -float(template.brain(candidate[None])[0])
        if depth > 0.6 * radius + 4 and template.sample(candidate[None])[0] > 0.5:
            centre = candidate
            break
    if centre is None:  # pragma: no cover - the template has ample white matter
        raise RuntimeError("could not place a glioma in the template white matter")
    axes = radius * rng.uniform(0.75, 1.25, size=3)
    body = _Blob.draw(rng, centre, axes, irregularity=0.35)
    enhancing = rng.random() < 0.75
    core = _Blob.draw(rng, centre, axes * rng.uniform(0.4, 0.75), irregularity=0.35)
    oedema = _Blob.draw(rng, centre, axes * rng.uniform(1.4, 2.2), irregularity=0.4)
    return _Lesion(
        body=[body],
        contrast=contrast,
        value=rng.uniform(1.1, 1.4) if enhancing else rng.uniform(0.3, 0.45),
        mass_effect=rng.uniform(0.15, 0.4),
        texture=texture,
        core=core if enhancing else None,
        core_value=rng.uniform(0.15, 0.35),
        oedema=oedema,
        oedema_depth=rng.uniform(0.2, 0.4),
    )


def _pituitary(rng: np.random.Generator, contrast: float, texture: _Blob) -> _Lesion:
    radius = rng.uniform(9, 17)
    centre = np.array([rng.uniform(-2, 2), rng.uniform(-7, 0), rng.uniform(-33, -27)])
    axes = radius * np.array([rng.uniform(0.8, 1.1), rng.uniform(0.8, 1.1), rng.uniform(1, 1.4)])
    body = [_Blob.draw(rng, centre, axes, irregularity=0.1)]
    if rng.random() < 0.6:  # suprasellar extension ("snowman")
        upper = centre + np.array([rng.uniform(-2, 2), rng.uniform(-2, 4), axes[2]])
        body.append(_Blob.draw(rng, upper, axes * rng.uniform(0.6, 0.9), irregularity=0.15))
    cyst = None
    if rng.random() < 0.3:
        cyst = _Blob.draw(rng, centre + rng.normal(0, 0.3 * radius, 3), axes * 0.45, 0.2)
    return _Lesion(
        body=body,
        contrast=contrast,
        value=rng.uniform(1.0, 1.3),
        mass_effect=rng.uniform(0.1, 0.3),
        texture=texture,
        cyst=cyst,
    )


def _slice_levels(
    lesion: _Lesion, anatomy: _Anatomy, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Axial levels (patient mm) through the lesion, spread over most of its height."""
    low, high = lesion.vertical_range()
    centre = anatomy.to_patient(lesion.centre[None])[0, 2]
    half = 0.6 * (high - low) / 2 / np.linalg.norm(anatomy.rotation[2])
    middle = centre + ((high + low) / 2 - lesion.centre[2])
    if count == 1:
        return np.array([middle + rng.uniform(-0.3, 0.3) * half])
    levels = np.linspace(middle - half, middle + half, count)
    return levels + rng.uniform(-0.5, 0.5, size=count)


# ---------------------------------------------------------------------------------------------
# Rendering


class _Renderer:
    def __init__(self, template: Template, image_size: int) -> None:
        self.template = template
        self.size = image_size
        pixel = _FIELD_OF_VIEW_MM / image_size
        self.factor = int(np.ceil(pixel / _FINEST_SAMPLE_MM))
        self.grid = image_size * self.factor
        step = _FIELD_OF_VIEW_MM / self.grid
        axis = (np.arange(self.grid) - (self.grid - 1) / 2) * step
        # rows run anterior -> posterior, columns patient right -> left (radiological view)
        self.across = -axis[None, :].repeat(self.grid, 0)
        self.along = -axis[:, None].repeat(self.grid, 1)

    def render(self, anatomy: _Anatomy, lesion: _Lesion, level: float) -> tuple[np.ndarray, ...]:
        for _ in range(6):
            image, mask = self._render(anatomy, lesion, level)
            if mask.any():
                return image, mask
            # the cut missed the (clipped, irregular) lesion: move towards its centre
            middle = anatomy.to_patient(lesion.centre[None])[0, 2]
            level = middle + 0.5 * (level - middle)
        return image, mask

    def _render(self, anatomy: _Anatomy, lesion: _Lesion, level: float) -> tuple[np.ndarray, ...]:
        patient = np.stack(
            [
                self.across + anatomy.warp[0],
                self.along + anatomy.warp[1],
                np.full_like(self.across, level),
            ],
            axis=-1,
        )
        points = anatomy.to_template(patient)
        source = lesion.displace(points)
        hull = self.template.hull(points)
        brain = self.template.sample(source) ** anatomy.gamma
        tissue = brain + anatomy.head(hull)
        image, occupancy = lesion.paint(points, tissue, hull)
        image = np.clip(image * anatomy.bias_field(patient), 0.0, None)
        image = self._pool(image)
        mask = self._pool(occupancy) > 0.5
        peak = image.max()
        return (image / peak if peak > 0 else image).astype(np.float32), mask

    def _pool(self, values: np.ndarray) -> np.ndarray:
        f = self.factor
        return values.reshape(self.size, f, self.size, f).mean(axis=(1, 3))
