"""Seeded single-voxel-style 1H MR brain spectra (PRESS, 3 T, TE 30 ms) with noisy labels.

Mimics the data of the MRS paper (Lu et al., "Human-expert-level brain tumor detection using
deep learning with data distillation and augmentation", §3: 7,442 spectra of 435 patients,
3,388 non-tumour and 4,054 tumour, 288 points each; a tumour patient's spectra are all those of
the tumour-affected hemisphere, so some "tumour" spectra are healthy tissue). See
:func:`make_mrs` for what is modelled and where it differs from in-vivo data, and
:func:`load_mrs_spectra` for real spectra tables.

**Two metabolite bases** (``basis=``). ``"multiplet"`` (the default, which every committed
result used): each metabolite is a sum of first-order multiplets (chemical shifts and J
couplings from Govindaraju et al.), which places every peak where it belongs but treats
strong coupling (mI, Glu, Gln) as weak and J-evolution at TE 30 ms as a fixed amplitude factor
(:data:`J_MODULATION`). ``"density-matrix"``: the lines of an ideal PRESS echo at TE 30 ms
computed from each molecule's full spin Hamiltonian (:mod:`fastinfluence.datasets.mrs_spins`,
in numpy, no extra dependency), so strong coupling and the J-evolution of every line,
including its phase, are simulated. The one installable third-party simulator (``mrsandbox``)
was not used: a first-release personal toolbox that pulls Keras
and a network-fetched calibration.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import wofz
from tqdm.auto import tqdm

from fastinfluence.datasets import mrs_spins

CLASS_NAMES: tuple[str, str] = ("healthy", "tumour")
N_POINTS = 288
"""Points per spectrum (the paper's 288×1 column vectors)."""
PPM_RANGE: tuple[float, float] = (4.2, 0.5)
"""The window, first point to last (ppm decreasing left to right, as spectra are shown).
The paper does not state it; this is the usual 1H brain window holding every marked peak."""
FIELD_MHZ = 123.2
"""1H frequency of a 3 T Siemens scanner (the paper's Skyra): Hz per ppm."""
TE_MS = 30.0
PAPER_SPECTRA: tuple[int, int] = (3388, 4054)
PAPER_PATIENTS = 435
DEFAULT_SPECTRA = 2000
DEFAULT_PATIENTS = 120
DEFAULT_HEALTHY_FRACTION = 0.3
DEFAULT_TUMOUR_CONTRAST = 1.0


def ppm_axis(n_points: int = N_POINTS, ppm_range: tuple[float, float] = PPM_RANGE) -> np.ndarray:
    """The chemical-shift axis (ppm) of the spectra, from ``ppm_range[0]`` to ``[1]``."""
    return np.linspace(ppm_range[0], ppm_range[1], n_points)


# -- the metabolites ---------------------------------------------------------------------------

Line = tuple[float, float]
"""One line of a multiplet: (offset from the group's shift in Hz, relative intensity)."""


def _splitting(lines: list[Line], j_hz: float, n: int) -> list[Line]:
    """Split every line by ``n`` equivalent spins of coupling ``j_hz`` (first order: the
    binomial pattern of ``n + 1`` lines)."""
    from math import comb

    out = []
    for offset, weight in lines:
        for k in range(n + 1):
            out.append((offset + (k - n / 2) * j_hz, weight * comb(n, k) / 2**n))
    return out


def multiplet(*couplings: tuple[float, int]) -> list[Line]:
    """A first-order multiplet: ``multiplet()`` is a singlet, ``multiplet((6.93, 1))`` a
    doublet, ``multiplet((7.0, 2))`` a triplet, ``multiplet((10, 1), (3, 1))`` a doublet of
    doublets. Intensities sum to 1."""
    lines: list[Line] = [(0.0, 1.0)]
    for j_hz, n in couplings:
        lines = _splitting(lines, j_hz, n)
    return lines


@dataclass(frozen=True)
class Group:
    """Equivalent protons of one metabolite: shift (ppm), number of protons, multiplet."""

    ppm: float
    protons: float
    lines: tuple[Line, ...]


def _group(ppm: float, protons: float, *couplings: tuple[float, int]) -> Group:
    return Group(ppm, protons, tuple(multiplet(*couplings)))


METABOLITES: dict[str, tuple[Group, ...]] = {
    # Govindaraju, Young & Maudsley, NMR Biomed 13:129 (2000), Table 2: shifts and couplings.
    "NAA": (_group(2.008, 3), _group(2.486, 1, (15.9, 1), (3.9, 1)),
            _group(2.673, 1, (15.9, 1), (9.5, 1))),
    "Cr": (_group(3.027, 3), _group(3.913, 2)),  # total creatine (Cr + PCr)
    "Cho": (_group(3.185, 9), _group(3.501, 2, (5.0, 2)), _group(4.054, 2, (3.0, 2))),
    "mI": (_group(3.522, 2, (10.0, 1), (2.9, 1)), _group(3.614, 2, (9.9, 2)),
           _group(3.269, 1, (9.5, 2)), _group(4.054, 1, (2.8, 2))),
    "Glu": (_group(3.744, 1, (7.3, 1), (4.6, 1)), _group(2.075, 2, (7.0, 2)),
            _group(2.344, 2, (7.6, 2))),
    "Gln": (_group(3.753, 1, (6.0, 1), (5.8, 1)), _group(2.129, 2, (6.5, 2)),
            _group(2.444, 2, (7.4, 2))),
    "Lac": (_group(1.313, 3, (6.93, 1)), _group(4.097, 1, (6.93, 3))),
    "Gly": (_group(3.548, 2),),
    # 2-hydroxyglutarate (Choi et al., Nat Med 18:624 (2012)): IDH-mutant gliomas.
    "2HG": (_group(4.022, 1, (7.0, 1), (4.0, 1)), _group(2.251, 2, (7.5, 2)),
            _group(1.91, 2, (7.0, 2))),
    # Mobile lipids (methyl 0.9, methylene 1.3, allylic 2.0): broad lines, see LIPID_WIDTH_HZ.
    "Lip09": (_group(0.90, 3),),
    "Lip13": (_group(1.30, 2),),
    "Lip20": (_group(2.02, 1),),
}
"""Each metabolite as groups of equivalent protons (first-order multiplets)."""

LIPID_WIDTH_HZ = 18.0
"""Extra Lorentzian half width of the mobile-lipid lines (FWHM ≈ 0.3 ppm in tumour spectra)."""

T2_MS: dict[str, float] = {"NAA": 247, "Cr": 162, "Cho": 222, "mI": 200, "Glu": 180,
                           "Gln": 180, "Lac": 240, "Gly": 200, "2HG": 180, "Lip09": 80,
                           "Lip13": 80, "Lip20": 80}
"""T2 at 3 T (Träber et al., JMRI 19:537 (2004); Mlynárik et al., NMR Biomed 14:325 (2001));
amplitudes carry ``exp(−TE/T2)``."""

J_MODULATION: dict[str, float] = {"NAA": 1.0, "Cr": 1.0, "Cho": 1.0, "mI": 0.8, "Glu": 0.7,
                                  "Gln": 0.7, "Lac": 0.9, "Gly": 1.0, "2HG": 0.7,
                                  "Lip09": 1.0, "Lip13": 1.0, "Lip20": 1.0}
"""A fixed factor for the signal coupled spins lose to J-evolution by TE 30 ms (what the
density-matrix basis would compute)."""

# Concentrations (mM; lipids in mM-equivalent of their protons' groups), grey and white
# matter: de Graaf, "In vivo NMR spectroscopy" (2019), Table 2.1; Govindaraju et al. (2000).
GREY_MATTER = {"NAA": 10.0, "Cr": 8.0, "Cho": 1.3, "mI": 5.5, "Glu": 10.0, "Gln": 3.5,
               "Lac": 0.5, "Gly": 0.6, "2HG": 0.0, "Lip09": 0.0, "Lip13": 0.0, "Lip20": 0.0}
WHITE_MATTER = {"NAA": 9.0, "Cr": 6.0, "Cho": 1.8, "mI": 4.5, "Glu": 6.5, "Gln": 2.5,
                "Lac": 0.5, "Gly": 0.5, "2HG": 0.0, "Lip09": 0.0, "Lip13": 0.0, "Lip20": 0.0}
# Gliomas as multiples of white matter. Low grade: Howe et al., MRM 49:223 (2003) (grade II:
# NAA −50 %, Cr −15 %, Cho ×1.6, mI ×1.6, Gly up); Castillo et al., AJNR 21:1645 (2000) (mI in
# low grade). High grade: Howe et al. (2003) (GBM: NAA −75 %, Cr −30 %, Cho ×1.5–2, lactate and
# mobile lipids high); Hattingen et al., Neuroradiology 50:759 (2008) (Cho and Gly in
# gliomas). 2HG in IDH-mutant gliomas ~1–10 mM (Choi et al. 2012), most low-grade tumours.
LOW_GRADE = {"NAA": 0.5, "Cr": 0.85, "Cho": 1.6, "mI": 1.6, "Glu": 0.8, "Gln": 1.6,
             "Lac": 4.0, "Gly": 3.0, "Lip09": 0.5, "Lip13": 1.0, "Lip20": 0.3}
HIGH_GRADE = {"NAA": 0.25, "Cr": 0.7, "Cho": 1.8, "mI": 0.9, "Glu": 0.7, "Gln": 2.0,
              "Lac": 12.0, "Gly": 5.0, "Lip09": 6.0, "Lip13": 12.0, "Lip20": 2.5}
"""Tumour tissue as a multiple of white matter (lipid entries are mM-equivalents, not
multiples: white matter has none)."""
# Non-neoplastic lesions of the paper's control group (demyelination, gliosis, dysplasia):
# Cho up and NAA down mildly, mI up in gliosis (Hattingen et al., Neuroradiology 2008).
LESION = {"NAA": 0.8, "Cr": 0.95, "Cho": 1.25, "mI": 1.3, "Lac": 1.5}
# Macromolecule baseline under every spectrum (Behar et al., MRM 32:294 (1994)):
# (ppm, relative amplitude, half width in Hz).
MACROMOLECULES = ((0.93, 1.0, 12.0), (1.21, 0.8, 14.0), (1.43, 0.5, 12.0), (1.67, 0.4, 12.0),
                  (2.00, 0.9, 14.0), (2.26, 0.4, 12.0), (3.00, 0.5, 14.0), (3.96, 0.4, 14.0))
WATER_PPM = 4.70
OEDEMA_DILUTION = (0.55, 0.9)
"""Metabolite dilution of healthy tissue in the tumour hemisphere (vasogenic oedema around
gliomas lowers every metabolite's concentration per voxel)."""
OEDEMA_WATER = 2.0
"""More water in oedematous voxels: a larger residual water peak."""


def voigt(offset_hz: np.ndarray, lorentz_hz: float, gauss_hz: float,
          tail_z: float | None = None) -> np.ndarray:
    """Complex Voigt line (absorption + i·dispersion) of unit area at ``offset_hz`` from its
    centre: Lorentzian half width at half maximum ``lorentz_hz`` convolved with a Gaussian of
    standard deviation ``gauss_hz`` (the Faddeeva function ``w(z)``, ``z = (offset + i·lorentz)
    / (gauss·√2)``; both widths must be > 0).

    ``tail_z``: where ``|z| > tail_z``, ``w(z)`` is taken from its asymptotic series
    ``(i/√π)(1/z + 1/(2z³) + 3/(4z⁵))`` (relative error < 5e-5 at ``tail_z = 6``), which costs a
    fraction of ``wofz``: for spectra of hundreds of lines. ``None``: ``wofz`` everywhere."""
    z = (np.asarray(offset_hz) + 1j * lorentz_hz) / (gauss_hz * np.sqrt(2))
    if tail_z is None:
        w = wofz(z)
    else:
        near = np.abs(z) <= tail_z
        w = np.empty(z.shape, dtype=np.complex128)
        w[near] = wofz(z[near])
        inverse = 1 / z[~near]
        squared = inverse * inverse
        w[~near] = (1j / np.sqrt(np.pi)) * inverse * (1 + squared * (0.5 + 0.75 * squared))
    return w / (gauss_hz * np.sqrt(2 * np.pi))


def voigt_fwhm(lorentz_hz: float, gauss_hz: float) -> float:
    """Full width at half maximum (Hz) of :func:`voigt`, Olivero & Longbothum's formula
    (accurate to 0.02 %)."""
    f_l, f_g = 2 * lorentz_hz, 2 * gauss_hz * np.sqrt(2 * np.log(2))
    return float(0.5346 * f_l + np.sqrt(0.2166 * f_l**2 + f_g**2))


BASES = ("multiplet", "density-matrix")
"""How metabolite lines are made: first-order multiplets, or the density-matrix PRESS echo."""
VOIGT_TAIL_Z = 6.0
""":func:`voigt`'s ``tail_z`` for the density-matrix basis (~700 lines per spectrum)."""


def metabolite_lines(name: str, basis: str = "multiplet",
                     field_mhz: float = FIELD_MHZ) -> tuple[np.ndarray, np.ndarray]:
    """Lines of 1 mM of metabolite ``name`` at TE 30 ms before T2 decay: ``(frequency_hz`` from
    0 ppm, complex ``amplitude)``. ``"multiplet"``: the first-order multiplets of
    :data:`METABOLITES` (real, area ``protons × intensity``) times :data:`J_MODULATION`;
    ``"density-matrix"``: :func:`fastinfluence.datasets.mrs_spins.metabolite_lines`."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis == "density-matrix":
        return mrs_spins.metabolite_lines(name, field_mhz, TE_MS / 2, TE_MS / 2)
    lines = [(group.ppm * field_mhz + offset, group.protons * weight)
             for group in METABOLITES[name] for offset, weight in group.lines]
    frequency, amplitude = np.array(lines).T
    return frequency, amplitude * J_MODULATION[name] + 0j


def metabolite_spectrum(name: str, ppm: np.ndarray, *, lorentz_hz: float = 2.5,
                        gauss_hz: float = 3.0, shift_ppm: float = 0.0,
                        field_mhz: float = FIELD_MHZ, basis: str = "multiplet") -> np.ndarray:
    """Complex spectrum of 1 mM of metabolite ``name`` on ``ppm``: every line of
    :func:`metabolite_lines` a :func:`voigt` of its (complex) amplitude, times
    ``exp(−TE/T2)``; mobile lipids get :data:`LIPID_WIDTH_HZ` more Lorentzian width."""
    ppm = np.asarray(ppm, dtype=np.float64)
    width = lorentz_hz + (LIPID_WIDTH_HZ if name.startswith("Lip") else 0.0)
    frequency, amplitude = metabolite_lines(name, basis, field_mhz)
    offsets = ppm[None, :] * field_mhz - (frequency[:, None] + shift_ppm * field_mhz)
    # the multiplet basis keeps exact wofz, so the spectra of committed results stay identical
    tail_z = None if basis == "multiplet" else VOIGT_TAIL_Z
    out = amplitude @ voigt(offsets, width, gauss_hz, tail_z)
    return out * np.exp(-TE_MS / T2_MS[name])


# -- the data set ------------------------------------------------------------------------------


@dataclass
class MRSData:
    """Spectra with their labels and patients.

    Attributes:
        spectra: ``[N, L]`` float32, arbitrary units (the real part of the phased spectrum;
            feed :func:`standardise` to a network).
        labels: ``[N]`` int64, the label the data set gives (0 healthy, 1 tumour): for the
            tumour group the hemisphere's label, so some are wrong.
        patient_ids: ``[N]`` str.
        ppm: ``[L]`` chemical shift of each point.
        tissue_labels: ``[N]`` int64, what the voxel really holds (1 when it contains tumour
            tissue); simulated data only (``None`` for real data).
        tumour_fraction: ``[N]`` float32, the tumour's share of the voxel; simulated only.
        class_names: names of the labels.
    """

    spectra: torch.Tensor
    labels: torch.Tensor
    patient_ids: np.ndarray
    ppm: np.ndarray
    tissue_labels: torch.Tensor | None = None
    tumour_fraction: torch.Tensor | None = None
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        if self.spectra.ndim != 2:
            raise ValueError(f"spectra must be [N, L], got {tuple(self.spectra.shape)}")
        n, length = self.spectra.shape
        self.patient_ids = np.asarray(self.patient_ids, dtype=str)
        self.ppm = np.asarray(self.ppm, dtype=np.float64)
        sizes = {"labels": len(self.labels), "patient_ids": len(self.patient_ids)}
        for name in ("tissue_labels", "tumour_fraction"):
            if getattr(self, name) is not None:
                sizes[name] = len(getattr(self, name))
        for name, size in sizes.items():
            if size != n:
                raise ValueError(f"{name} has {size} entries for {n} spectra")
        if self.ppm.shape != (length,):
            raise ValueError(f"ppm must have {length} entries, got {self.ppm.shape}")

    def __len__(self) -> int:
        return int(self.spectra.shape[0])

    @property
    def mislabelled(self) -> torch.Tensor | None:
        """``[N]`` bool: the given label differs from the tissue (simulated data only)."""
        return None if self.tissue_labels is None else self.labels != self.tissue_labels

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> MRSData:
        """The spectra at ``indices`` (e.g. one fold)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        pick = None if self.tissue_labels is None else self.tissue_labels[index]
        fraction = None if self.tumour_fraction is None else self.tumour_fraction[index]
        return MRSData(self.spectra[index], self.labels[index], self.patient_ids[index.numpy()],
                       self.ppm, pick, fraction, self.class_names)


def standardise(spectra: torch.Tensor) -> torch.Tensor:
    """Network input ``[N, 1, L]``: each spectrum minus its mean, divided by its standard
    deviation. The paper does not say how it normalised; per-spectrum z-scores remove the
    receiver gain, which differs between patients and carries no diagnosis."""
    x = torch.as_tensor(spectra, dtype=torch.float32)
    x = x - x.mean(-1, keepdim=True)
    return (x / x.std(-1, keepdim=True).clamp_min(1e-12)).unsqueeze(1)


def make_mrs(
    n_spectra: int | None = None,
    n_patients: int | None = None,
    *,
    seed: int = 0,
    healthy_fraction: float = DEFAULT_HEALTHY_FRACTION,
    tumour_contrast: float = DEFAULT_TUMOUR_CONTRAST,
    paper_size: bool = False,
    basis: str = "multiplet",
    progress: bool | None = None,
) -> MRSData:
    """Generate a seeded MRS data set with the paper's structure and its label noise.

    **Patients.** Half are the tumour group (glioma: low or high grade with equal odds, 2HG in
    70 % of low-grade and 15 % of high-grade tumours), half the control group (non-neoplastic
    lesions). Spectra are shared between the groups in the paper's 3,388 : 4,054 proportion
    and between the patients of a group very unevenly (log-normal shares, σ = 1, at least 2
    spectra each), as the paper's regions of interest differed in size.

    **Voxels.** Every voxel mixes grey and white matter (grey fraction U(0.2, 0.8)).
    Control-group voxels lie in the patient's lesion with probability U(0, 0.5) per patient
    (mildly raised Cho and mI, lowered NAA: :data:`LESION`). Tumour-group voxels are the
    whole affected hemisphere, **all labelled tumour**: a voxel is healthy tissue with a
    per-patient probability (Beta distributed with mean ``healthy_fraction``), otherwise it
    holds a tumour fraction U(0.35, 1) mixed linearly with healthy tissue (partial volume).
    ``tissue_labels`` and ``tumour_fraction`` record the truth; the label noise is one-sided
    (tumour-labelled healthy tissue), as the paper describes.

    **Signal.** Metabolite concentrations (mM, :data:`GREY_MATTER`, :data:`WHITE_MATTER`;
    tumour tissue :data:`LOW_GRADE`, :data:`HIGH_GRADE` scaled by ``tumour_contrast`` in log
    space) get per-patient log-normal variation (σ 0.1 healthy, 0.3 tumour: patient-to-patient
    overlap) and per-voxel variation (σ 0.07). Each metabolite is :func:`metabolite_spectrum`
    (T2 weighting at TE 30 ms from :data:`T2_MS`). Per patient: Lorentzian half width
    U(1.5, 3.5) Hz and Gaussian σ U(2, 5) Hz (FWHM ≈ 6–14 Hz, clinical multivoxel shims), 30 %
    broader in tumour tissue (susceptibility), frequency shift N(0, 0.02 ppm), zero-order phase
    N(0, 10°), receiver gain, and the SNR of the NAA singlet log-uniform in 5–40; per voxel
    smaller jitter of each. Under every spectrum: the macromolecule humps
    (:data:`MACROMOLECULES`), the tail of a residual water peak at 4.7 ppm, and a smooth
    baseline (a cubic in ppm); their levels, the water's phase and the baseline's shape are
    the patient's scan's (shared by its voxels, with a little voxel jitter), so a patient's
    spectra look alike. Healthy voxels of the tumour hemisphere are diluted by peritumoural
    oedema (all metabolites ×U(0.55, 0.9), twice the residual water). White Gaussian noise on
    top. The spectrum is the real
    part after the phase error.

    Where it differs from in-vivo data: with the default ``basis="multiplet"``, first-order
    multiplets instead of a simulated basis, and with ``"density-matrix"`` ideal hard pulses
    instead of the scanner's slice-selective ones (see the module docstring); no eddy-current
    line distortions, no lipid contamination from outside the voxel, no spurious echoes,
    independent noise per point; the partial-volume mixing is linear; the concentration changes
    are literature means with made-up spreads, not fitted to a real cohort; hemispheres have no
    spatial layout (voxels are independent given the patient). The paper's cohort (mostly
    gliomas of all grades vs mixed lesions) was harder than the default here may be:
    ``tumour_contrast`` < 1 makes it harder.

    Args:
        n_spectra: spectra (default 2,000; paper 7,442).
        n_patients: patients (default 120; paper 435); at most ``n_spectra / 2``.
        seed: everything is a deterministic function of the seed and the arguments.
        healthy_fraction: mean fraction of the tumour group's spectra that are healthy tissue
            (the label noise among tumour labels; in [0, 1)).
        tumour_contrast: scales the tumour's metabolic changes (> 0; 1 = the literature values).
        paper_size: default sizes to the paper's.
        basis: ``"multiplet"`` or ``"density-matrix"`` metabolite lines (module docstring).
        progress: show a progress bar (default: for 5,000 spectra or more).

    Returns:
        An :class:`MRSData` on :func:`ppm_axis`, spectra grouped by patient, patients in
        random order.
    """
    n_spectra = int(n_spectra if n_spectra is not None else
                    sum(PAPER_SPECTRA) if paper_size else DEFAULT_SPECTRA)
    n_patients = int(n_patients if n_patients is not None else
                     PAPER_PATIENTS if paper_size else DEFAULT_PATIENTS)
    if n_patients < 2 or n_spectra < 2 * n_patients:
        raise ValueError(f"need n_patients >= 2 and n_spectra >= 2 * n_patients, got "
                         f"{n_spectra} spectra of {n_patients} patients")
    if not 0 <= healthy_fraction < 1:
        raise ValueError(f"healthy_fraction must lie in [0, 1), got {healthy_fraction}")
    if not (np.isfinite(tumour_contrast) and tumour_contrast > 0):
        raise ValueError(f"tumour_contrast must be > 0, got {tumour_contrast}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    rng = np.random.default_rng([seed, 0])
    ppm = ppm_axis()
    patients_per_group = [n_patients // 2, n_patients - n_patients // 2]
    tumour_spectra = round(n_spectra * PAPER_SPECTRA[1] / sum(PAPER_SPECTRA))
    tumour_spectra = int(np.clip(tumour_spectra, 2 * patients_per_group[1],
                                 n_spectra - 2 * patients_per_group[0]))
    spectra_per_group = [n_spectra - tumour_spectra, tumour_spectra]
    groups, counts = [], []
    for group, (n_p, n_s) in enumerate(zip(patients_per_group, spectra_per_group, strict=True)):
        shares = rng.lognormal(0.0, 1.0, n_p)
        extra = _largest_remainder((n_s - 2 * n_p) * shares / shares.sum())
        counts += list(2 + extra)
        groups += [group] * n_p
    order = rng.permutation(n_patients)
    out = np.empty((n_spectra, len(ppm)), dtype=np.float32)
    labels = np.empty(n_spectra, dtype=np.int64)
    tissue = np.empty(n_spectra, dtype=np.int64)
    fraction = np.empty(n_spectra, dtype=np.float32)
    pids: list[str] = []
    show = n_spectra >= 5000 if progress is None else progress
    bar = tqdm(total=n_spectra, desc="MR spectra", unit="spectrum", disable=not show)
    lines = _Basis(ppm, basis)
    start = 0
    for rank, patient in enumerate(order):
        group, count = groups[patient], int(counts[patient])
        patient_rng = np.random.default_rng([seed, 1, int(patient)])
        block = slice(start, start + count)
        out[block], fraction[block] = _patient_spectra(
            patient_rng, lines, group, count, healthy_fraction, tumour_contrast)
        labels[block] = group
        tissue[block] = fraction[block] > 0
        pids += [f"P{rank:03d}"] * count
        start += count
        bar.update(count)
    bar.close()
    return MRSData(torch.from_numpy(out), torch.from_numpy(labels), np.asarray(pids), ppm,
                   torch.from_numpy(tissue), torch.from_numpy(fraction))


def _largest_remainder(ideal: np.ndarray) -> np.ndarray:
    """Whole numbers summing to ``round(ideal.sum())``, each within 1 of ``ideal``."""
    counts = np.floor(ideal).astype(np.int64)
    short = int(round(ideal.sum())) - int(counts.sum())
    counts[np.argsort(-(ideal - counts), kind="stable")[:short]] += 1
    return counts


class _Basis:
    """Metabolite spectra on the axis from the lines of one basis."""

    def __init__(self, ppm: np.ndarray, basis: str = "multiplet") -> None:
        self.ppm = ppm
        self.names = list(METABOLITES)
        self.basis = basis
        if basis == "density-matrix":
            # every line of every metabolite in one matrix: one voigt call per width
            lines = [metabolite_lines(name, basis) for name in self.names]
            self.frequency = np.concatenate([f for f, _ in lines])
            counts = [len(f) for f, _ in lines]
            owner = np.repeat(np.arange(len(lines)), counts)
            self.starts = np.cumsum([0, *counts[:-1]])
            self.lipid = np.array([self.names[k].startswith("Lip") for k in owner])
            decay = np.array([np.exp(-TE_MS / T2_MS[name]) for name in self.names])
            self.amplitude = np.concatenate([a for _, a in lines]) * decay[owner]

    def spectra(self, lorentz_hz: float, gauss_hz: float, shift_ppm: float) -> np.ndarray:
        """``[metabolites, L]`` complex spectra of 1 mM each (:func:`metabolite_spectrum`)."""
        if self.basis == "multiplet":
            return np.stack([metabolite_spectrum(name, self.ppm, lorentz_hz=lorentz_hz,
                                                 gauss_hz=gauss_hz, shift_ppm=shift_ppm)
                             for name in self.names])
        offsets = self.ppm[None, :] * FIELD_MHZ - (self.frequency[:, None]
                                                   + shift_ppm * FIELD_MHZ)
        shapes = np.empty(offsets.shape, dtype=np.complex128)
        for lipid, width in ((False, lorentz_hz), (True, lorentz_hz + LIPID_WIDTH_HZ)):
            rows = self.lipid == lipid
            shapes[rows] = voigt(offsets[rows], width, gauss_hz, VOIGT_TAIL_Z)
        # a sum per metabolite (its lines are contiguous), not a sparse matrix product
        return np.add.reduceat(self.amplitude[:, None] * shapes, self.starts, axis=0)

    def background(self, lorentz_hz: float, gauss_hz: float, shift_ppm: float) -> np.ndarray:
        """Complex macromolecule spectrum (amplitude of NAA's 1 mM singlet scale)."""
        hz = self.ppm * FIELD_MHZ
        total = np.zeros(self.ppm.shape, dtype=np.complex128)
        for centre, amplitude, width in MACROMOLECULES:
            total += amplitude * 6.0 * voigt(hz - (centre + shift_ppm) * FIELD_MHZ,
                                             width + lorentz_hz, gauss_hz)
        return total


def _concentrations(grey: float) -> np.ndarray:
    return np.array([grey * GREY_MATTER[m] + (1 - grey) * WHITE_MATTER[m] for m in METABOLITES])


def _tumour_profile(rng: np.random.Generator, contrast: float) -> np.ndarray:
    """One patient's tumour tissue concentrations (mM)."""
    high = rng.random() < 0.5
    table = HIGH_GRADE if high else LOW_GRADE
    white = np.array([WHITE_MATTER[m] for m in METABOLITES])
    out = white.copy()
    for k, name in enumerate(METABOLITES):
        if name.startswith("Lip"):
            out[k] = contrast * table[name] * rng.lognormal(0, 0.5)
        elif name == "2HG":
            mutant = rng.random() < (0.15 if high else 0.7)
            out[k] = contrast * rng.uniform(1.5, 6.0) if mutant else 0.0
        else:
            factor = table.get(name, 1.0) ** contrast
            out[k] = white[k] * factor * rng.lognormal(0, 0.3)
    return out


def _patient_spectra(rng: np.random.Generator, basis: _Basis, group: int, count: int,
                     healthy_fraction: float, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    names = basis.names
    hz = basis.ppm * FIELD_MHZ
    lorentz, gauss = rng.uniform(1.5, 3.5), rng.uniform(2.0, 5.0)
    shift, phase = rng.normal(0, 0.02), np.deg2rad(rng.normal(0, 10))
    snr = np.exp(rng.uniform(np.log(5), np.log(40)))
    gain = rng.lognormal(0, 0.3)
    variation = rng.lognormal(0, 0.1, len(names))
    # Acquisition effects shared by a patient's voxels (one multivoxel scan): water
    # suppression, baseline and macromolecule level, each with a little voxel jitter.
    water_level, water_phase = rng.lognormal(np.log(0.3), 0.8), rng.uniform(-np.pi, np.pi)
    baseline_shape = rng.normal(0, 0.05, 4)
    macromolecules = rng.uniform(0.7, 1.3)
    if group == 1:
        tumour = _tumour_profile(rng, contrast)
        mean = healthy_fraction
        p_healthy = rng.beta(2 * mean / (1 - mean), 2) if mean > 0 else 0.0
        fraction = np.where(rng.random(count) < p_healthy, 0.0, rng.uniform(0.35, 1.0, count))
        lesion = np.zeros(count, dtype=bool)
    else:
        fraction = np.zeros(count)
        lesion = rng.random(count) < rng.uniform(0.0, 0.5)
    lesion_factor = np.array([LESION.get(m, 1.0) for m in names])
    # the noise level: this patient's typical healthy NAA singlet
    naa_height = float(np.abs(9.5 * metabolite_spectrum(
        "NAA", np.array([2.008]), lorentz_hz=lorentz, gauss_hz=gauss)[0]))
    out = np.empty((count, len(basis.ppm)), dtype=np.float32)
    for v in range(count):
        f = fraction[v]
        healthy = _concentrations(rng.uniform(0.2, 0.8)) * variation
        if lesion[v]:
            healthy = healthy * lesion_factor
        oedema = group == 1 and f == 0
        if oedema:  # healthy tissue of the tumour hemisphere: peritumoural oedema dilutes it
            healthy = healthy * rng.uniform(*OEDEMA_DILUTION)
        conc = (1 - f) * healthy + (f * tumour if f > 0 else 0.0)
        conc = conc * rng.lognormal(0, 0.07, len(names))
        broadening = 1 + 0.3 * f
        lw = lorentz * broadening * rng.uniform(0.9, 1.1)
        gw = gauss * broadening * rng.uniform(0.9, 1.1)
        dv = shift + rng.normal(0, 0.004)
        spectrum = conc @ basis.spectra(lw, gw, dv)
        spectrum = spectrum + macromolecules * rng.uniform(0.9, 1.1) * basis.background(lw, gw, dv)
        water = water_level * rng.lognormal(0, 0.3) * naa_height * (OEDEMA_WATER if oedema else 1)
        spectrum = spectrum + water * 4.0 * voigt(hz - WATER_PPM * FIELD_MHZ, 8.0, 3.0) * np.exp(
            1j * (water_phase + rng.normal(0, 0.3)))
        phased = np.real(spectrum * np.exp(1j * (phase + np.deg2rad(rng.normal(0, 3)))))
        centred = (basis.ppm - 2.35) / 1.85
        coefficients = baseline_shape + rng.normal(0, 0.02, 4)
        baseline = np.polyval(coefficients, centred) * naa_height
        noise = rng.normal(0, naa_height / (snr * rng.uniform(0.8, 1.25)), len(basis.ppm))
        out[v] = gain * (phased + baseline + noise)
    return out, fraction.astype(np.float32)


# -- real spectra tables -----------------------------------------------------------------------


def load_mrs_spectra(path: str | Path, *, patient_column: str = "patient_id",
                     label_column: str = "label",
                     ppm: Sequence[float] | np.ndarray | None = None) -> MRSData:
    """Read a table of spectra: one row per spectrum, with its patient id and label.

    Formats (by suffix):

    - ``.csv``: a header row; the columns named ``patient_column`` and ``label_column`` (any
      position), every other column a point of the spectrum, in file order;
    - ``.npy``: a 2-D numeric array, column 0 the patient id, column 1 the label, the rest
      the spectrum (ids are read as integers and kept as their decimal strings).

    Labels must be 0 (healthy) or 1 (tumour). ``ppm`` is the axis of the points (default:
    :func:`ppm_axis` for 288 points; required for other lengths). No tissue truth exists for
    real data (``tissue_labels`` is ``None``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spectra table not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if len(rows) < 2:
            raise ValueError(f"{path.name}: needs a header row and at least one spectrum")
        header = rows[0]
        for column in (patient_column, label_column):
            if column not in header:
                raise ValueError(f"{path.name}: no column named {column!r} in the header")
        id_at, label_at = header.index(patient_column), header.index(label_column)
        points = [k for k in range(len(header)) if k not in (id_at, label_at)]
        try:
            ids = [row[id_at] for row in rows[1:]]
            labels = [int(float(row[label_at])) for row in rows[1:]]
            values = np.array([[float(row[k]) for k in points] for row in rows[1:]])
        except (ValueError, IndexError) as error:
            raise ValueError(f"{path.name}: malformed row ({error})") from error
    elif path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
        if table.ndim != 2 or table.shape[1] < 4 or not np.issubdtype(table.dtype, np.number):
            raise ValueError(f"{path.name}: needs a numeric [N, 2 + L] array, got "
                             f"{table.dtype} {table.shape}")
        ids = [str(int(v)) for v in table[:, 0]]
        labels = [int(v) for v in table[:, 1]]
        values = table[:, 2:].astype(np.float64)
    else:
        raise ValueError(f"{path.name}: unknown format (use .csv or .npy)")
    if not set(labels) <= {0, 1}:
        raise ValueError(f"{path.name}: labels must be 0 (healthy) or 1 (tumour), got "
                         f"{sorted(set(labels))}")
    if not np.isfinite(values).all():
        raise ValueError(f"{path.name}: spectra contain NaN or Inf")
    if ppm is None:
        if values.shape[1] != N_POINTS:
            raise ValueError(f"{path.name}: {values.shape[1]} points per spectrum; pass ppm "
                             f"for lengths other than {N_POINTS}")
        ppm = ppm_axis()
    return MRSData(torch.from_numpy(values.astype(np.float32)),
                   torch.tensor(labels, dtype=torch.int64), np.asarray(ids), np.asarray(ppm))
