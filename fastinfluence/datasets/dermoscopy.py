"""Seeded dermoscopy-like colour images of skin lesions, drawn from the ABCD cues.

Mimics the structure of ISIC 2017 part 3 (lesion classification, the skin noisy-label paper's
data): melanoma against benign lesions, the benign ones nevi and seborrhoeic keratoses, in
ISIC 2017's training proportions (374 melanoma, 1,372 nevi, 254 seborrhoeic keratoses: about
1 melanoma to 4.3 benign), several images for some "patients", and each patient's skin
tone, hair and dermoscope on every image of theirs. The same generator serves the four-class
SKIN4 task (MEL, NV, BCC, BKL) of the denoising paper: diagnoses are keys of
:data:`DIAGNOSES`, a table of per-diagnosis cue generators, and the class set is a parameter.

What is drawn (everything a seeded function of ``seed`` and the sizes):

* **Skin**: a per-patient tone (pale pink to brown), fine texture, a per-image colour cast,
  uneven illumination and the dermoscope's round vignette; per-patient hair density (dark
  curved hairs over everything), a millimetre ruler along an edge on ~15 % of images, gel
  bubbles on about a quarter.
* **Lesions** by the dermoscopic ABCD rule (Stolz): **A**\\symmetry (elongation, an
  off-centre bulge, colour mass off the centre), **B**\\order irregularity (boundary
  harmonics, notches), **C**\\olour variegation (how many of light brown, dark brown, black,
  blue-grey, red and white), **D**\\iameter; plus structures: pigment network (regular or
  broken and uneven), dots and globules, radial streaks at the edge, blue-white veil.
  Melanoma and nevus share one latent "atypia" in ``[0, 1]`` whose class distributions
  overlap (melanoma high, nevus low; ``cue_separation`` sets the gap) and each cue adds its
  own noise, so atypical nevi and featureless melanomas exist: the hard samples of the
  paper's Fig. 1. Seborrhoeic keratosis (BKL): sharp "stuck-on" border, tan to dark
  brown, milia-like cysts, comedo-like openings, cerebriform fissures, no network; a
  per-lesion typicality fades those cues, leaving a dark irregular lesion that looks like a
  melanoma. BCC: pink translucent base, arborising vessels, blue-grey ovoid nests, an
  occasional ulceration, no network.

Where it differs from real dermoscopy: painted parametric shapes and procedural textures,
not photographs; no pathology-level ambiguity beyond the drawn overlap; one dermoscope
model; artefacts are independent of the diagnosis (real archives have biases, e.g. rulers
and ink marks more often beside melanomas); sizes are CPU-sized by default (64²; the paper
resized to 224²).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from fastinfluence.datasets.brain_tumour import _apportion
from fastinfluence.datasets.isic import BINARY_CLASSES, SkinLesionData

ISIC2017_MIX: dict[str, float] = {"MEL": 374.0, "NV": 1372.0, "BKL": 254.0}
"""ISIC 2017 part 3 training counts (BKL = seborrhoeic keratosis): the default mix."""
SKIN4_MIX: dict[str, float] = {"MEL": 1113.0, "NV": 1500.0, "BCC": 514.0, "BKL": 1099.0}
"""The denoising paper's SKIN4 counts: ISIC 2018 task 3's MEL, BCC and BKL images and a
random 1,500 of its 6,705 nevi (``load_isic2018(..., classes=SKIN4_CLASSES,
max_per_class=SKIN4_MAX_PER_CLASS)`` reads the real set that way)."""
MALIGNANT: frozenset[str] = frozenset({"MEL"})
"""Diagnoses labelled 1 by ``binary=True`` (melanoma against the rest, ISIC 2017 part 3)."""

DEFAULT_CUE_SEPARATION = 0.57
_PALETTE = {  # dermoscopic colours, linear RGB in [0, 1]
    "light_brown": (0.66, 0.45, 0.30),
    "dark_brown": (0.36, 0.21, 0.13),
    "black": (0.10, 0.07, 0.07),
    "blue_grey": (0.40, 0.46, 0.58),
    "red": (0.72, 0.30, 0.30),
    "white": (0.88, 0.84, 0.83),
    "tan": (0.76, 0.58, 0.40),
    "pink": (0.86, 0.58, 0.56),
}
_MELANOMA_EXTRA_COLOURS = ("black", "blue_grey", "red", "white")


@dataclass
class DermoscopyData(SkinLesionData):
    """Generated dermoscopy images: a :class:`SkinLesionData` (``images [N, 3, H, W]`` float32
    in [0, 1], int64 ``labels``, ``image_ids``, ``class_names``) plus the diagnosis code of
    every image (``diagnoses``, keys of :data:`DIAGNOSES`), its patient (``patient_ids``) and
    the lesion mask ``masks [N, 1, H, W]`` (bool)."""

    diagnoses: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    patient_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    masks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, 1, 1, dtype=torch.bool))

    def __post_init__(self) -> None:
        n = len(self)
        for name in ("labels", "image_ids", "diagnoses", "patient_ids", "masks"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} images")

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> DermoscopyData:
        """The images at ``indices`` (e.g. one split of :func:`split_by_patient`)."""
        index = np.asarray(indices, dtype=np.int64)
        tensor_index = torch.from_numpy(index)
        return DermoscopyData(
            images=self.images[tensor_index],
            labels=self.labels[tensor_index],
            image_ids=self.image_ids[index],
            class_names=self.class_names,
            diagnoses=self.diagnoses[index],
            patient_ids=self.patient_ids[index],
            masks=self.masks[tensor_index],
        )


# ---------------------------------------------------------------------------------------------
# Lesion parameters and the per-diagnosis cue generators


@dataclass
class _Lesion:
    """Everything the renderer needs about one lesion (lengths in half field-of-view units)."""

    radius: float
    elongation: float = 0.0  # axis ratio - 1 of the ellipse
    angle: float = 0.0
    bulge: float = 0.0  # first-harmonic (egg-shaped) asymmetry of the outline
    harmonics: np.ndarray = field(default_factory=lambda: np.zeros(0))  # border, k = 3..
    phases: np.ndarray = field(default_factory=lambda: np.zeros(0))
    edge: float = 0.04  # width of the soft border (fraction of the radius)
    colours: tuple[str, ...] = ("light_brown",)
    colour_offset: tuple[float, float] = (0.0, 0.0)  # centre of the darkest colour mass
    colour_mixing: float = 0.3  # spatial irregularity of the colour map
    central_dark: float = 0.4  # darker centre (regular nevi) in [0, 1]
    network: float = 0.0  # pigment network strength
    network_irregularity: float = 0.0
    dots: int = 0
    dots_peripheral: float = 0.0  # 0: dots near the centre (regular), 1: scattered to the rim
    streaks: int = 0
    veil: float = 0.0  # blue-white veil strength
    milia: int = 0
    comedos: int = 0
    fissures: float = 0.0
    vessels: int = 0
    nests: int = 0
    ulcer: float = 0.0
    opacity: float = 0.9


def _lerp(low: float, high: float, t: float) -> float:
    return low + (high - low) * float(np.clip(t, 0.0, 1.0))


def _atypia(rng: np.random.Generator, mean: float, concentration: float = 6.0) -> float:
    mean = float(np.clip(mean, 0.02, 0.98))
    return float(rng.beta(mean * concentration, (1 - mean) * concentration))


def _abcd(rng: np.random.Generator, atypia: float, cue_noise: float = 0.18) -> _Lesion:
    """A melanocytic lesion whose ABCD cues and structures follow ``atypia`` (each cue with
    its own noise): 0 a small, round, even, one-or-two-colour nevus with a regular network;
    1 a large, asymmetric, notched, variegated lesion with a broken network, peripheral
    dots, streaks and a blue-white veil."""

    def cue() -> float:
        return float(np.clip(atypia + rng.normal(0.0, cue_noise), 0.0, 1.0))

    asymmetry, border, colour, diameter, structure = (cue() for _ in range(5))
    n_harmonics = 10
    decay = 1.0 / np.arange(1, n_harmonics + 1) ** 0.7
    harmonics = _lerp(0.01, 0.09, border) * decay * rng.uniform(0.5, 1.5, n_harmonics)
    n_extra = int(np.clip(np.round(colour * 4.4 + rng.normal(0, 0.5) - 0.6), 0, 4))
    extra = tuple(rng.choice(_MELANOMA_EXTRA_COLOURS, n_extra, replace=False))
    base = ("light_brown", "dark_brown") if colour > 0.2 or rng.random() < 0.5 else ("tan",)
    angle = rng.uniform(0, 2 * np.pi)
    offset = _lerp(0.0, 0.45, asymmetry)
    return _Lesion(
        radius=_lerp(0.24, 0.62, diameter) * rng.uniform(0.9, 1.1),
        elongation=_lerp(0.0, 0.45, asymmetry) * rng.uniform(0.5, 1.0),
        angle=angle,
        bulge=_lerp(0.0, 0.22, asymmetry) * rng.uniform(0.5, 1.0),
        harmonics=harmonics,
        phases=rng.uniform(0, 2 * np.pi, n_harmonics),
        edge=_lerp(0.12, 0.04, border),
        colours=base + extra,
        colour_offset=(offset * np.cos(angle + 1.0), offset * np.sin(angle + 1.0)),
        colour_mixing=_lerp(0.15, 0.9, colour),
        central_dark=_lerp(0.5, 0.0, asymmetry),
        network=_lerp(0.55, 0.3, structure) * rng.uniform(0.5, 1.0),
        network_irregularity=structure,
        dots=int(rng.poisson(_lerp(1.0, 7.0, structure))),
        dots_peripheral=structure,
        streaks=int(rng.poisson(max(0.0, structure - 0.55) * 18)),
        veil=max(0.0, colour - 0.6) * 1.8 * rng.uniform(0.4, 1.0),
    )


def _melanoma(rng: np.random.Generator, separation: float) -> _Lesion:
    return _abcd(rng, _atypia(rng, 0.5 + separation / 2))


def _nevus(rng: np.random.Generator, separation: float) -> _Lesion:
    return _abcd(rng, _atypia(rng, 0.5 - separation / 2))


def _keratosis(rng: np.random.Generator, separation: float) -> _Lesion:
    """Seborrhoeic keratosis: its own cues fade with a low typicality, and what remains is a
    dark, irregular lesion (a benign melanoma mimic)."""
    typical = float(rng.beta(1.5 + 3 * separation, 1.5))
    lesion = _abcd(rng, _atypia(rng, 0.55))
    lesion.network *= 1 - typical
    lesion.edge = _lerp(lesion.edge, 0.02, typical)
    lesion.colours = ("tan", "dark_brown") + (("black",) if rng.random() < 0.4 else ())
    lesion.milia = int(rng.poisson(12 * typical))
    lesion.comedos = int(rng.poisson(8 * typical))
    lesion.fissures = typical * rng.uniform(0.5, 1.0)
    lesion.streaks = 0
    lesion.veil = 0.0
    lesion.opacity = 0.95
    return lesion


def _basal_cell(rng: np.random.Generator, separation: float) -> _Lesion:
    """Basal cell carcinoma: pink translucent base, arborising vessels, blue-grey nests."""
    typical = float(rng.beta(1.5 + 3 * separation, 1.5))
    lesion = _abcd(rng, _atypia(rng, 0.5))
    lesion.network = 0.0
    lesion.colours = ("pink", "white") + (("blue_grey",) if rng.random() < 0.6 else ())
    lesion.vessels = int(rng.poisson(1 + 4 * typical))
    lesion.nests = int(rng.poisson(1 + 5 * typical))
    lesion.ulcer = typical * rng.uniform(0.0, 1.0) if rng.random() < 0.3 else 0.0
    lesion.dots = 0
    lesion.streaks = 0
    lesion.veil = 0.0
    lesion.opacity = _lerp(0.7, 0.5, typical)
    return lesion


@dataclass(frozen=True)
class Diagnosis:
    """One row of :data:`DIAGNOSES`: a display name and the cue generator
    ``draw(rng, cue_separation) -> lesion parameters``."""

    name: str
    draw: Callable[[np.random.Generator, float], _Lesion]


DIAGNOSES: dict[str, Diagnosis] = {
    "MEL": Diagnosis("melanoma", _melanoma),
    "NV": Diagnosis("nevus", _nevus),
    "BKL": Diagnosis("seborrheic_keratosis", _keratosis),
    "BCC": Diagnosis("basal_cell_carcinoma", _basal_cell),
}
"""Diagnosis code (ISIC 2018 spelling) -> :class:`Diagnosis`."""


# ---------------------------------------------------------------------------------------------
# The generator


def make_dermoscopy(
    n_images: int | None = None,
    n_patients: int | None = None,
    image_size: int | None = None,
    *,
    mix: Mapping[str, float] = ISIC2017_MIX,
    binary: bool = True,
    seed: int = 0,
    cue_separation: float = DEFAULT_CUE_SEPARATION,
    artefacts: float = 1.0,
    paper_size: bool = False,
    progress: bool | None = None,
) -> DermoscopyData:
    """Generate seeded dermoscopy-like images (module docstring: what is drawn, how it
    differs from real dermoscopy).

    Args:
        n_images: number of images (default 1,500; ``paper_size``: 4,332 = the skin paper's
            3,582 training + 150 validation + 600 test images, or with ``mix=SKIN4_MIX``
            4,226 = the denoising paper's SKIN4 set).
        n_patients: number of patients (default ``round(0.7 * n_images)``: most have one
            image, some several); at most ``n_images``.
        image_size: side of the square images (default 64; ``paper_size``: 224).
        mix: diagnosis code (key of :data:`DIAGNOSES`) -> relative frequency; the image
            counts follow it by largest remainder. Default ISIC 2017 part 3
            (:data:`ISIC2017_MIX`); :data:`SKIN4_MIX` for the four SKIN4 classes.
        binary: labels 1 for melanoma (:data:`MALIGNANT`) and 0 for the rest, with
            ``class_names = ("benign", "melanoma")`` as :func:`load_isic2017`; otherwise
            label ``k`` is the ``k``-th key of ``mix`` and ``class_names`` the keys.
        seed: seeds everything.
        cue_separation: gap between the melanoma and nevus atypia distributions, in
            ``[0, 1]`` (0: same distribution; 1: nearly disjoint), and how typical the
            keratoses' and BCCs' own cues are. The default is calibrated (docs/papers/data.md).
        artefacts: scales hair density, ruler and bubble frequency and illumination
            unevenness (0: none).
        paper_size: default sizes to the paper's (4,332 or, for SKIN4, 4,226 images of 224²).
        progress: show a progress bar (default: for 2,000 images or more).
    """
    paper_images = round(sum(SKIN4_MIX.values())) if dict(mix) == SKIN4_MIX else 4332
    n_images = (paper_images if paper_size else 1500) if n_images is None else n_images
    image_size = (224 if paper_size else 64) if image_size is None else image_size
    for name, value in (("n_images", n_images), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    n_patients = max(1, round(0.7 * n_images)) if n_patients is None else n_patients
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer) or not (
        1 <= n_patients <= n_images
    ):
        raise ValueError(f"n_patients must be an integer in [1, n_images], got {n_patients!r}")
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"mix must be a non-empty mapping of diagnosis to frequency, got {mix!r}")
    unknown = [code for code in mix if code not in DIAGNOSES]
    if unknown:
        raise ValueError(f"mix has unknown diagnoses {unknown}; known: {sorted(DIAGNOSES)}")
    weights = [float(w) for w in mix.values()]
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mix frequencies must be finite, >= 0 and not all 0, got {weights}")
    if binary and len({code in MALIGNANT for code in mix}) < 2:
        raise ValueError(f"binary=True needs melanoma and at least one benign diagnosis in mix, "
                         f"got {list(mix)}")
    if not (np.isfinite(cue_separation) and 0 <= cue_separation <= 1):
        raise ValueError(f"cue_separation must lie in [0, 1], got {cue_separation!r}")
    if not (np.isfinite(artefacts) and artefacts >= 0):
        raise ValueError(f"artefacts must be >= 0, got {artefacts!r}")

    codes = list(mix)
    rng = np.random.default_rng([seed, 0])
    counts = _apportion(n_images, weights)
    diagnosis_index = rng.permutation(np.repeat(np.arange(len(codes)), counts))
    # patients: every one at least one image, the rest shared out at random, then contiguous
    images_per_patient = 1 + rng.multinomial(n_images - n_patients, np.full(n_patients,
                                                                              1 / n_patients))
    patient_of_image = np.repeat(np.arange(n_patients), images_per_patient)
    skins = [_Skin.draw(np.random.default_rng([seed, 1, p]), artefacts) for p in range(n_patients)]

    renderer = _Renderer(image_size)
    images = np.empty((n_images, 3, image_size, image_size), dtype=np.float32)
    masks = np.empty((n_images, 1, image_size, image_size), dtype=bool)
    show = n_images >= 2000 if progress is None else progress
    for i in tqdm(range(n_images), desc="dermoscopy images", unit="image", disable=not show):
        image_rng = np.random.default_rng([seed, 2, i])
        code = codes[diagnosis_index[i]]
        lesion = DIAGNOSES[code].draw(image_rng, cue_separation)
        images[i], masks[i, 0] = renderer.render(lesion, skins[patient_of_image[i]], image_rng)
    diagnoses = np.array([codes[k] for k in diagnosis_index])
    if binary:
        labels = np.isin(diagnoses, list(MALIGNANT)).astype(np.int64)
        names: tuple[str, ...] = BINARY_CLASSES
    else:
        labels, names = diagnosis_index.astype(np.int64), tuple(codes)
    return DermoscopyData(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        image_ids=np.array([f"SYN_{i:07d}" for i in range(n_images)]),
        class_names=names,
        diagnoses=diagnoses,
        patient_ids=np.array([f"P{p:05d}" for p in patient_of_image]),
        masks=torch.from_numpy(masks),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Skin:
    """A patient's skin and the dermoscope used on them."""

    tone: np.ndarray  # RGB
    hairs: float  # expected hairs per image
    ruler: float  # probability of a ruler on an image
    bubbles: float  # expected gel bubbles per image
    unevenness: float  # illumination gradient strength
    vignette: float  # radius of the dermoscope's round field (1: touches the edges)

    @classmethod
    def draw(cls, rng: np.random.Generator, artefacts: float) -> _Skin:
        darkness = rng.beta(1.6, 3.0)  # mostly light skin, as in the ISIC archive
        light, dark = np.array([0.93, 0.76, 0.68]), np.array([0.55, 0.38, 0.27])
        tone = (1 - darkness) * light + darkness * dark + rng.normal(0, 0.02, 3)
        hairy = rng.random() < 0.35
        return cls(
            tone=np.clip(tone, 0.2, 1.0),
            hairs=artefacts * (rng.uniform(2, 10) if hairy else rng.uniform(0, 0.5)),
            ruler=min(1.0, artefacts * 0.15),
            bubbles=artefacts * 0.3,
            unevenness=artefacts * rng.uniform(0.0, 0.25),
            vignette=rng.uniform(1.05, 1.5) if artefacts > 0 else 10.0,
        )


class _Renderer:
    """Draws on a supersampled grid (2× below 64², for smooth edges), then averages."""

    def __init__(self, image_size: int) -> None:
        self.size = image_size
        self.factor = 2 if image_size < 64 else 1
        n = image_size * self.factor
        self.axis = (np.arange(n) + 0.5) / n * 2 - 1
        self.y, self.x = np.meshgrid(self.axis, self.axis, indexing="ij")
        self.pixel = 2.0 / n

    def render(self, lesion: _Lesion, skin: _Skin, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.x, self.y
        cx, cy = rng.normal(0, 0.08, 2)
        self._centre = np.array([cx, cy, cx, cy])
        u, v = x - cx, y - cy
        cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
        ua, va = cos * u + sin * v, -sin * u + cos * v
        va = va * (1 + lesion.elongation)
        rho = np.hypot(ua, va)
        # e^{iθ} and its powers by multiplication: cos(kθ + φ) = Re(e^{ikθ} e^{iφ}) without
        # a transcendental per pixel and harmonic
        unit = (ua + 1j * va) / np.maximum(rho, 1e-9)
        outline = 1 + lesion.bulge * unit.real
        power = unit**3
        for amplitude, phase in zip(lesion.harmonics, lesion.phases, strict=True):
            outline = outline + amplitude * (power * np.exp(1j * phase)).real
            power = power * unit
        boundary = lesion.radius * outline
        depth = (boundary - rho) / lesion.radius  # > 0 inside, 1 at the centre
        alpha = _sigmoid(depth / max(lesion.edge, 1e-3) * 4)
        alpha = alpha * (1 + 0.15 * _field(rng, self.axis, 4, 6.0))  # uneven pigment density

        lesion_rgb = self._colours(lesion, u, v, depth, rng)
        shade = np.zeros_like(x)
        if lesion.network > 0:
            shade += lesion.network * self._network(lesion, ua, va, rng) * _box(depth, 0.0, 0.9)
        lesion_rgb = lesion_rgb * (1 - 0.6 * shade[None])
        inside = depth > 0
        self._structures(lesion, lesion_rgb, u, v, depth, rng)
        texture = 0.015 * _field(rng, self.axis, 12, 30.0) + 0.02 * _field(rng, self.axis, 4, 3.0)
        skin_rgb = skin.tone[:, None, None] * (1 + texture)[None]
        opacity = np.clip(alpha * lesion.opacity, 0, 1)[None]
        image = skin_rgb * (1 - opacity) + lesion_rgb * opacity
        self._artefacts(image, skin, rng)
        image = image + rng.normal(0, 0.012, image.shape)
        mask = self._pool(inside.astype(np.float32)[None])[0] > 0.5
        return self._pool(np.clip(image, 0, 1)), mask

    def _colours(self, lesion: _Lesion, u: np.ndarray, v: np.ndarray, depth: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """A colour map: a smooth partition of the lesion among its colours, the later
        (darker or rarer) colours biased towards ``colour_offset`` and the centre."""
        palette = np.array([_PALETTE[c] for c in lesion.colours])
        ox, oy = lesion.colour_offset
        towards = np.clip(1 - np.hypot(u - ox * 0.5, v - oy * 0.5) / 0.8, 0, 1)
        scores = []
        for rank in range(len(palette)):
            noise = _field(rng, self.axis, 5, 3.0 + 6.0 * lesion.colour_mixing)
            bias = (rank > 0) * (lesion.central_dark * depth + 0.8 * lesion.colour_mixing
                                 * towards * rank / len(palette))
            scores.append(lesion.colour_mixing * 2.0 * noise + 2.0 * bias - 0.4 * rank)
        weights = _softmax(np.stack(scores), sharpness=4.0)
        return np.einsum("kc,khw->chw", palette, weights)

    def _network(self, lesion: _Lesion, ua: np.ndarray, va: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Pigment network: a warped mesh of dark lines; an irregular one varies in spacing
        and thickness and is broken in places."""
        irregular = lesion.network_irregularity
        spacing = 0.09 * (1 + irregular * 0.6 * _field(rng, self.axis, 4, 4.0))
        warp = 0.04 * _field(rng, self.axis, 4, 8.0)
        a = np.abs(np.sin(np.pi * (ua + warp) / spacing))
        b = np.abs(np.sin(np.pi * (va - warp) / spacing))
        width = 0.35 * (1 + irregular * 0.8 * _field(rng, self.axis, 4, 5.0))
        mesh = np.exp(-((np.minimum(a, b) / np.clip(width, 0.05, None)) ** 2))
        present = _sigmoid((_field(rng, self.axis, 4, 3.0) + 1.2 - 2.0 * irregular) * 4)
        return mesh * present

    def _structures(self, lesion: _Lesion, rgb: np.ndarray, u: np.ndarray, v: np.ndarray,
                    depth: np.ndarray, rng: np.random.Generator) -> None:
        """Dots, streaks, veil, keratosis and BCC structures, painted in place on ``rgb``."""
        r = lesion.radius

        def spot_centres(count: int, peripheral: float) -> np.ndarray:
            radius = r * np.sqrt(rng.uniform(0, 1, count)) * _lerp(0.5, 1.0, peripheral)
            angle = rng.uniform(0, 2 * np.pi, count)
            return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)

        if lesion.dots:
            self._spots(rgb, u, v, spot_centres(lesion.dots, lesion.dots_peripheral),
                        rng.uniform(0.012, 0.03, lesion.dots), _PALETTE["black"], 0.85)
        if lesion.streaks:
            angles = rng.uniform(0, 2 * np.pi, lesion.streaks)
            start = np.stack([np.cos(angles), np.sin(angles)], 1) * r * 0.8
            end = start * rng.uniform(1.25, 1.5, (lesion.streaks, 1))
            self._lines(rgb, self._to_image(np.concatenate([start, end], 1)), 0.012,
                        _PALETTE["dark_brown"], 0.8)
        if lesion.veil > 0:
            cx, cy = lesion.colour_offset
            patch = np.exp(-((u - cx * r) ** 2 + (v - cy * r) ** 2) / (2 * (0.35 * r) ** 2))
            strength = np.clip(lesion.veil * patch * (depth > 0), 0, 0.8)[None]
            rgb *= 1 - strength
            rgb += strength * np.array(_PALETTE["blue_grey"])[:, None, None] * 1.3
        if lesion.fissures > 0:
            ridges = np.abs(np.sin(np.pi * (u + 0.08 * _field(rng, self.axis, 5, 6.0)) / 0.07
                                   + 3 * _field(rng, self.axis, 3, 4.0)))
            gyri = lesion.fissures * np.exp(-(ridges / 0.3) ** 2) * _box(depth, 0.05, 1.0)
            rgb *= 1 - 0.45 * gyri[None]
        if lesion.milia:
            self._spots(rgb, u, v, spot_centres(lesion.milia, 0.7),
                        rng.uniform(0.01, 0.022, lesion.milia), (0.95, 0.93, 0.80), 0.85)
        if lesion.comedos:
            self._spots(rgb, u, v, spot_centres(lesion.comedos, 0.7),
                        rng.uniform(0.012, 0.025, lesion.comedos), (0.20, 0.13, 0.08), 0.8)
        if lesion.nests:
            centres = spot_centres(lesion.nests, 0.5)
            self._spots(rgb, u, v, centres, rng.uniform(0.03, 0.07, lesion.nests),
                        _PALETTE["blue_grey"], 0.7, elongation=1.8)
        for _ in range(lesion.vessels):
            self._lines(rgb, self._to_image(_branching(rng, r)), 0.008, (0.70, 0.12, 0.15),
                        0.85)
        if lesion.ulcer > 0:
            cx, cy = rng.normal(0, 0.3 * r, 2)
            crust = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * (0.2 * r) ** 2))
            self._blend(rgb, lesion.ulcer * crust, (0.45, 0.15, 0.10), 0.9)

    def _artefacts(self, image: np.ndarray, skin: _Skin, rng: np.random.Generator) -> None:
        x, y = self.x, self.y
        for _ in range(rng.poisson(skin.hairs)):
            start, end = rng.uniform(-1.2, 1.2, 2), rng.uniform(-1.2, 1.2, 2)
            bend = rng.normal(0, 0.3, 2)
            t = np.linspace(0, 1, 9)[:, None]
            points = (1 - t) ** 2 * start + 2 * t * (1 - t) * ((start + end) / 2 + bend) \
                + t**2 * end
            segments = np.concatenate([points[:-1], points[1:]], 1)
            self._lines(image, segments, rng.uniform(0.006, 0.014),
                        (0.12, 0.09, 0.08), rng.uniform(0.6, 0.95))
        if rng.random() < skin.ruler:
            edge = rng.uniform(0.72, 0.85)
            band = (y > edge).astype(float)
            self._blend(image, band, (0.92, 0.92, 0.88), 0.85)
            ticks = np.abs(np.sin(np.pi * x / 0.08)) < 0.15
            long_ticks = np.abs(np.sin(np.pi * x / 0.4)) < 0.05
            mark = band * (ticks * (y < edge + 0.07) + long_ticks * (y < edge + 0.13))
            self._blend(image, np.clip(mark, 0, 1), (0.1, 0.1, 0.1), 0.9)
        for _ in range(rng.poisson(skin.bubbles)):
            cx, cy, radius = *rng.uniform(-0.8, 0.8, 2), rng.uniform(0.05, 0.15)
            distance = np.hypot(x - cx, y - cy)
            rim = np.exp(-((distance - radius) / 0.012) ** 2)
            self._blend(image, rim, (0.2, 0.2, 0.2), 0.5)
            self._blend(image, (distance < radius * 0.6) * 0.5, (1.0, 1.0, 1.0), 0.4)
        direction = rng.uniform(0, 2 * np.pi)
        light = 1 + skin.unevenness * (np.cos(direction) * x + np.sin(direction) * y)
        cast = 1 + rng.normal(0, 0.03, 3)
        field_of_view = _sigmoid((skin.vignette - np.hypot(x, y)) / 0.05)
        image *= (light * field_of_view)[None] * cast[:, None, None]

    def _spots(self, rgb: np.ndarray, u: np.ndarray, v: np.ndarray, centres: np.ndarray,
               radii: np.ndarray, colour: Sequence[float], strength: float,
               elongation: float = 1.0) -> None:
        coverage = np.zeros_like(u)
        for (cx, cy), radius in zip(centres, radii, strict=True):
            d2 = (u - cx) ** 2 + ((v - cy) / elongation) ** 2
            coverage = np.maximum(coverage, np.exp(-d2 / (2 * radius**2)))
        self._blend(rgb, coverage, colour, strength)

    def _lines(self, rgb: np.ndarray, segments: np.ndarray, width: float,
               colour: Sequence[float], strength: float) -> None:
        """Lines of Gaussian profile (``width``, at least 0.7 pixel) along ``segments``
        ``[m, 4]`` in image coordinates."""
        width = max(width, self.pixel * 0.7)
        distance = _segment_distance(self.axis, segments, 3 * width)
        self._blend(rgb, np.exp(-((distance / width) ** 2)), colour, strength)

    def _to_image(self, segments: np.ndarray) -> np.ndarray:
        """Segments relative to the lesion centre -> image coordinates."""
        return segments + self._centre

    @staticmethod
    def _blend(rgb: np.ndarray, coverage: np.ndarray, colour: Sequence[float],
               strength: float) -> None:
        a = np.clip(coverage * strength, 0, 1)[None]
        rgb *= 1 - a
        rgb += a * np.asarray(colour)[:, None, None]

    def _pool(self, image: np.ndarray) -> np.ndarray:
        f, n = self.factor, self.size
        return image.reshape(image.shape[0], n, f, n, f).mean(axis=(2, 4))


def _branching(rng: np.random.Generator, radius: float) -> np.ndarray:
    """Segments ``[m, 4]`` of an arborising vessel: a trunk that forks twice."""
    segments = []
    tips = [(rng.uniform(-0.5, 0.5, 2) * radius, rng.uniform(0, 2 * np.pi), 0.5 * radius)]
    for _ in range(3):
        grown = []
        for start, angle, length in tips:
            end = start + length * np.array([np.cos(angle), np.sin(angle)])
            segments.append(np.concatenate([start, end]))
            grown += [(end, angle + s * rng.uniform(0.3, 0.8), length * 0.6) for s in (-1, 1)]
        tips = grown
    return np.array(segments)


def _segment_distance(axis: np.ndarray, segments: np.ndarray, reach: float) -> np.ndarray:
    """Distance of every point of the grid ``axis × axis`` (rows y, columns x) to the nearest
    of ``segments`` ``[m, 4]`` (x0, y0, x1, y1), computed only within ``reach`` of each
    segment's bounding box (``inf`` farther away)."""
    n = len(axis)
    distance = np.full((n, n), np.inf)
    for x0, y0, x1, y1 in segments:
        cols = slice(*np.searchsorted(axis, [min(x0, x1) - reach, max(x0, x1) + reach]))
        rows = slice(*np.searchsorted(axis, [min(y0, y1) - reach, max(y0, y1) + reach]))
        px, py = axis[cols][None, :], axis[rows][:, None]
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((px - x0) * dx + (py - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
        here = np.hypot(px - x0 - t * dx, py - y0 - t * dy)
        np.minimum(distance[rows, cols], here, out=distance[rows, cols])
    return distance


def _field(rng: np.random.Generator, axis: np.ndarray, waves: int,
           frequency: float) -> np.ndarray:
    """A smooth random field of about unit amplitude on the grid ``axis × axis`` (rows y,
    columns x): ``waves`` random plane waves of angular frequency up to ``frequency`` (per
    half field of view). Each wave ``cos(a_x + a_y)`` is formed from 1-D cosines and sines
    (``cos a_x cos a_y − sin a_x sin a_y``), so no transcendental is evaluated per pixel."""
    k = rng.uniform(0.3, 1.0, waves) * frequency
    direction = rng.uniform(0, 2 * np.pi, waves)
    phase = rng.uniform(0, 2 * np.pi, waves)
    ax = k[:, None] * np.cos(direction)[:, None] * axis[None] + phase[:, None]
    ay = k[:, None] * np.sin(direction)[:, None] * axis[None]
    total = np.cos(ay).T @ np.cos(ax) - np.sin(ay).T @ np.sin(ax)
    return total * np.sqrt(2.0 / waves)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _box(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return ((x > low) & (x < high)).astype(float)


def _softmax(scores: np.ndarray, sharpness: float) -> np.ndarray:
    z = sharpness * (scores - scores.max(0, keepdims=True))
    e = np.exp(z)
    return e / e.sum(0, keepdims=True)
