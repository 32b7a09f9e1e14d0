"""Density-matrix simulation of a PRESS acquisition for coupled 1H spin systems.

The MRS simulator (:mod:`fastinfluence.datasets.mrs`) builds each metabolite's spectrum from
a list of lines. ``basis="multiplet"`` takes first-order multiplets; ``basis="density-matrix"``
takes the lines this module computes: the full spin Hamiltonian of each coupled group
(strong coupling included), ideal hard pulses, free evolution during the PRESS echo times,
so every line carries the amplitude and phase that J-evolution gives it at the echo.

Sequence (ideal, non-selective pulses; ``ħ = 1``, frequencies in Hz)::

    ρ₀ = F_z  →  90°_x  →  TE₁/2  →  180°_y  →  (TE₁ + TE₂)/2  →  180°_y  →  TE₂/2  →  acquire

with ``H = 2π [ Σ_i ν_i I_z,i + Σ_{i<j} J_ij I_i·I_j ]`` and ``ν_i = δ_i × field`` (Hz from
0 ppm). Ideal 180° pulses invert every coherence order exactly, so no crusher gradients are
needed to select the echo pathway. In the eigenbasis of ``H`` (``H V = V diag(E)``) the
signal after the echo is

    s(t) = Σ_{k,l} ρ_kl (V† F₊ V)_lk exp(−i (E_k − E_l) t),

a sum of lines at ``(E_l − E_k)/2π`` Hz with complex amplitudes. Amplitudes are scaled so
that one uncoupled proton refocuses to a line of amplitude exactly 1 at its shift (the global
receiver phase and sign conventions are fixed on that reference, so singlets of both bases
agree exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

PRESS_TE1_MS = 15.0
PRESS_TE2_MS = 15.0
"""The two echo times of PRESS at TE 30 ms, symmetric (the paper does not give them)."""


@dataclass(frozen=True)
class SpinSystem:
    """Coupled protons of one molecule (or one uncoupled group).

    Attributes:
        shifts_ppm: chemical shift of every spin; equivalent protons of a coupled group are
            separate spins (lactate's CH₃ is three).
        couplings: ``(i, j, J_Hz)`` scalar couplings between spins ``i`` and ``j``.
        weight: protons each spin stands for; > 1 only for uncoupled singlets (an isolated
            methyl group is one spin of weight 3: the same spectrum, 1/8 of the work).
    """

    shifts_ppm: tuple[float, ...]
    couplings: tuple[tuple[int, int, float], ...] = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.shifts_ppm)
        if not 1 <= n <= 8:
            raise ValueError(f"a spin system needs 1 to 8 spins, got {n}")
        for i, j, _ in self.couplings:
            if not (0 <= i < n and 0 <= j < n and i != j):
                raise ValueError(f"coupling ({i}, {j}) names no pair of the {n} spins")
        if self.couplings and self.weight != 1.0:
            raise ValueError("weight > 1 stands for equivalent uncoupled protons only")


def _spin_operators(n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """``I_x, I_y, I_z`` of each of ``n`` spin-1/2 in the product basis, ``[2ⁿ, 2ⁿ]`` each."""
    sx = np.array([[0, 0.5], [0.5, 0]], dtype=np.complex128)
    sy = np.array([[0, -0.5j], [0.5j, 0]], dtype=np.complex128)
    sz = np.array([[0.5, 0], [0, -0.5]], dtype=np.complex128)
    eye = np.eye(2, dtype=np.complex128)

    def embed(op: np.ndarray, k: int) -> np.ndarray:
        out = np.ones((1, 1), dtype=np.complex128)
        for m in range(n):
            out = np.kron(out, op if m == k else eye)
        return out

    return ([embed(sx, k) for k in range(n)], [embed(sy, k) for k in range(n)],
            [embed(sz, k) for k in range(n)])


def _rotation(generator: np.ndarray, angle: float) -> np.ndarray:
    """``exp(−i·angle·G)`` for a Hermitian ``G``."""
    values, vectors = np.linalg.eigh(generator)
    return (vectors * np.exp(-1j * angle * values)) @ vectors.conj().T


MERGE_HZ = 0.1
"""Lines closer than this merge into one (at their amplitude-weighted mean frequency): the
simulated lines are ≥ 3 Hz wide, and strongly coupled molecules have hundreds of nearly
coincident transitions (myo-inositol: 629 → 239 lines; spectra change by < 3e-4 relative)."""
MIN_AMPLITUDE = 1e-4
"""Lines weaker than this fraction of the molecule's strongest are dropped."""


def merge_lines(frequency: np.ndarray, amplitude: np.ndarray, resolution_hz: float = MERGE_HZ,
                min_amplitude: float = MIN_AMPLITUDE) -> tuple[np.ndarray, np.ndarray]:
    """Drops lines below ``min_amplitude`` of the strongest, then merges each run of lines
    within ``resolution_hz`` of the run's first (sorted by frequency) into one line: the
    summed complex amplitude at the ``|amplitude|``-weighted mean frequency."""
    keep = np.abs(amplitude) > min_amplitude * np.abs(amplitude).max()
    order = np.argsort(frequency[keep], kind="stable")
    frequency, amplitude = frequency[keep][order], amplitude[keep][order]
    starts = [0]
    for k in range(1, len(frequency)):
        if frequency[k] - frequency[starts[-1]] > resolution_hz:
            starts.append(k)
    ends = [*starts[1:], len(frequency)]
    weights = np.abs(amplitude)
    merged = np.array([np.average(frequency[s:e], weights=weights[s:e])
                       for s, e in zip(starts, ends, strict=True)])
    return merged, np.add.reduceat(amplitude, starts)


def _echo_lines(system: SpinSystem, field_mhz: float, te1_ms: float,
                te2_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled ``(frequency_hz, amplitude)`` of every transition at the PRESS echo."""
    n = len(system.shifts_ppm)
    ix, iy, iz = _spin_operators(n)
    fx, fy, fz = sum(ix), sum(iy), sum(iz)
    two_pi = 2 * np.pi
    hamiltonian = sum(two_pi * ppm * field_mhz * iz[k]
                      for k, ppm in enumerate(system.shifts_ppm))
    for i, j, j_hz in system.couplings:
        hamiltonian = hamiltonian + two_pi * j_hz * (ix[i] @ ix[j] + iy[i] @ iy[j]
                                                     + iz[i] @ iz[j])
    energies, vectors = np.linalg.eigh(hamiltonian)

    def evolve(rho: np.ndarray, seconds: float) -> np.ndarray:
        u = (vectors * np.exp(-1j * energies * seconds)) @ vectors.conj().T
        return u @ rho @ u.conj().T

    excite, refocus = _rotation(fx, np.pi / 2), _rotation(fy, np.pi)
    rho = excite @ fz @ excite.conj().T
    for seconds in (te1_ms / 2e3, (te1_ms + te2_ms) / 2e3):
        rho = evolve(rho, seconds)
        rho = refocus @ rho @ refocus.conj().T
    rho = evolve(rho, te2_ms / 2e3)
    rho_eig = vectors.conj().T @ rho @ vectors
    detect = vectors.conj().T @ (fx + 1j * fy) @ vectors
    amplitudes = rho_eig * detect.T  # [k, l] = ρ_kl · D_lk, oscillating at (E_l − E_k)/2π
    frequencies = (energies[None, :] - energies[:, None]) / two_pi
    return frequencies.ravel(), amplitudes.ravel()


def press_lines(system: SpinSystem, field_mhz: float, te1_ms: float = PRESS_TE1_MS,
                te2_ms: float = PRESS_TE2_MS, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Lines of ``system`` after an ideal PRESS echo (see the module docstring).

    Returns:
        ``(frequency_hz, amplitude)``: frequencies from 0 ppm, ascending; complex amplitudes
        scaled so that one uncoupled proton gives one line of amplitude 1 (a spin of weight
        ``w``: ``w``); degenerate lines (within 1 mHz) are merged and lines below ``tol`` of
        the largest dropped.
    """
    if te1_ms < 0 or te2_ms < 0:
        raise ValueError(f"echo times must be >= 0, got TE1 {te1_ms}, TE2 {te2_ms}")
    freq, amp = _echo_lines(system, field_mhz, te1_ms, te2_ms)
    _, reference = _echo_lines(SpinSystem((0.0,)), field_mhz, te1_ms, te2_ms)
    # traces over 2ⁿ states: each further spin doubles every one-spin amplitude
    n = len(system.shifts_ppm)
    scale = system.weight / (reference[np.abs(reference).argmax()] * 2 ** (n - 1))
    # degenerate transitions (equivalent spins) are one line; numerical zeros are dropped
    merged_freq, merged_amp = merge_lines(freq, amp * scale, resolution_hz=1e-3,
                                          min_amplitude=1e-12)
    strong = np.abs(merged_amp) > tol * np.abs(merged_amp).max()
    return merged_freq[strong], merged_amp[strong]


def _aspartyl(a: float, b: float, c: float, jab: float, jac: float, jbc: float) -> SpinSystem:
    """An AMX / ABX group: three spins, three couplings."""
    return SpinSystem((a, b, c), ((0, 1, jab), (0, 2, jac), (1, 2, jbc)))


def _glutamyl(shifts: tuple[float, ...], j: tuple[float, ...]) -> SpinSystem:
    """α-CH, β-CH₂, γ-CH₂ (5 spins): J(2,3), J(2,3'), J(3,3'), J(3,4), J(3,4'), J(3',4),
    J(3',4'), J(4,4')."""
    pairs = ((0, 1), (0, 2), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))
    return SpinSystem(shifts, tuple((i, k, v) for (i, k), v in zip(pairs, j, strict=True)))


def _methyl_coupled(methyl: float, partner: float, j_hz: float) -> SpinSystem:
    """A CH₃ (three spins) coupled to one CH: lactate's A₃X."""
    return SpinSystem((methyl,) * 3 + (partner,), tuple((k, 3, j_hz) for k in range(3)))


SPIN_SYSTEMS: dict[str, tuple[SpinSystem, ...]] = {
    # Shifts and couplings: Govindaraju, Young & Maudsley, NMR Biomed 13:129 (2000), Table 2
    # (Cho's CH₂ couplings and 2HG's from Choi et al., Nat Med 18:624 (2012), rounded).
    "NAA": (SpinSystem((2.008,), weight=3.0),
            _aspartyl(4.3817, 2.6727, 2.4863, 3.861, 9.821, -15.592)),
    "Cr": (SpinSystem((3.027,), weight=3.0), SpinSystem((3.913,), weight=2.0)),
    "Cho": (SpinSystem((3.185,), weight=9.0),
            SpinSystem((4.054, 4.054, 3.501, 3.501),
                       ((0, 2, 3.140), (0, 3, 6.979), (1, 2, 6.979), (1, 3, 3.140)))),
    "mI": (SpinSystem((3.5217, 4.0538, 3.5217, 3.6144, 3.2690, 3.6144),
                      ((0, 1, 2.889), (1, 2, 3.006), (2, 3, 9.997), (3, 4, 9.485),
                       (4, 5, 9.482), (5, 0, 9.998))),),
    "Glu": (_glutamyl((3.7433, 2.0375, 2.1200, 2.3378, 2.3520),
                      (7.331, 4.651, -14.849, 8.406, 6.875, 6.413, 8.478, -15.915)),),
    "Gln": (_glutamyl((3.7530, 2.1290, 2.1090, 2.4320, 2.4540),
                      (5.847, 6.500, -14.504, 9.165, 6.347, 6.324, 9.209, -15.371)),),
    "Lac": (_methyl_coupled(1.3142, 4.0974, 6.933),),
    "Gly": (SpinSystem((3.548,), weight=2.0),),
    "2HG": (_glutamyl((4.022, 1.826, 1.974, 2.236, 2.265),
                      (7.6, 4.1, -14.0, 5.6, 10.4, 10.6, 5.5, -15.0)),),
    "Lip09": (SpinSystem((0.90,), weight=3.0),),
    "Lip13": (SpinSystem((1.30,), weight=2.0),),
    "Lip20": (SpinSystem((2.02,), weight=1.0),),
}
"""Each metabolite as spin systems for :func:`press_lines` (the same metabolites, protons and
shifts as the multiplet basis, :data:`fastinfluence.datasets.mrs.METABOLITES`)."""


@cache
def metabolite_lines(name: str, field_mhz: float, te1_ms: float = PRESS_TE1_MS,
                     te2_ms: float = PRESS_TE2_MS) -> tuple[np.ndarray, np.ndarray]:
    """All lines of metabolite ``name`` (:data:`SPIN_SYSTEMS`) after PRESS, merged
    (:func:`merge_lines`) and cached: ``(frequency_hz, complex amplitude)``; for TE → 0 the
    amplitudes sum to the molecule's protons."""
    parts = [press_lines(system, field_mhz, te1_ms, te2_ms) for system in SPIN_SYSTEMS[name]]
    return merge_lines(np.concatenate([f for f, _ in parts]), np.concatenate([a for _, a in parts]))
