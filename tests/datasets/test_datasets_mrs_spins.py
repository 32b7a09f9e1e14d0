"""The density-matrix PRESS basis of the MRS simulator, against closed forms and the
first-order multiplet basis."""

from __future__ import annotations

import numpy as np
import pytest

from fastinfluence.datasets import make_mrs
from fastinfluence.datasets.mrs import (
    FIELD_MHZ,
    METABOLITES,
    _Basis,
    metabolite_spectrum,
    ppm_axis,
    voigt,
)
from fastinfluence.datasets.mrs_spins import (
    SPIN_SYSTEMS,
    SpinSystem,
    merge_lines,
    metabolite_lines,
    press_lines,
)


@pytest.mark.parametrize("te", [0.0, 30.0, 97.0])
def test_an_uncoupled_proton_refocuses_to_one_line_of_amplitude_one(te):
    frequency, amplitude = press_lines(SpinSystem((2.5,)), FIELD_MHZ, te / 2, te / 2)
    assert frequency == pytest.approx([2.5 * FIELD_MHZ], abs=1e-9)
    assert amplitude == pytest.approx([1.0], abs=1e-12)


@pytest.mark.parametrize("name", list(SPIN_SYSTEMS))
def test_without_evolution_every_proton_gives_unit_real_signal(name):
    _, amplitude = metabolite_lines(name, FIELD_MHZ, 0.0, 0.0)
    protons = sum(system.weight * len(system.shifts_ppm) for system in SPIN_SYSTEMS[name])
    # the same protons as the multiplet basis, but NAA's aspartyl CH at 4.38 ppm (outside the
    # window, so left out of the multiplets) is simulated: it shapes its partners' lines
    window_protons = sum(group.protons for group in METABOLITES[name])
    assert protons == window_protons + (1 if name == "NAA" else 0)
    assert amplitude.sum() == pytest.approx(protons, abs=1e-3)  # MIN_AMPLITUDE drops ≤ 1e-4
    assert np.abs(amplitude.imag).max() < 1e-9


def test_weak_coupling_gives_the_first_order_doublet_modulated_by_cos_pi_j_te():
    """An AX pair 20 ppm apart: lines at ν ± J/2, each cos(πJ·TE)/2 in phase (the two 180°
    pulses refocus the shifts, not the coupling)."""
    j_hz = 7.0
    system = SpinSystem((1.0, 21.0), ((0, 1, j_hz),))  # Δν ≫ J: first order
    for te_ms in (0.0, 30.0, 1e3 / j_hz):
        frequency, amplitude = press_lines(system, FIELD_MHZ, te_ms / 2, te_ms / 2)
        a_lines = np.abs(frequency - FIELD_MHZ) < 20
        assert frequency[a_lines] == pytest.approx(
            [FIELD_MHZ - j_hz / 2, FIELD_MHZ + j_hz / 2], abs=0.02)
        expected = np.cos(np.pi * j_hz * te_ms / 1e3) / 2
        assert amplitude[a_lines].real == pytest.approx([expected] * 2, abs=2e-3)


def test_lactate_inverts_at_te_144_and_returns_at_te_288():
    """The classic lactate check: its methyl doublet is inverted at TE = 1/J."""
    j_hz = 6.933
    for te_ms, sign in ((1e3 / j_hz, -1), (2e3 / j_hz, 1)):
        frequency, amplitude = metabolite_lines("Lac", FIELD_MHZ, te_ms / 2, te_ms / 2)
        methyl = np.abs(frequency / FIELD_MHZ - 1.314) < 0.1
        assert amplitude[methyl].real.sum() == pytest.approx(3 * sign, abs=0.05)


def test_strongly_coupled_spectra_differ_from_first_order_where_they_should():
    ppm = ppm_axis()
    for name in ("Cr", "Gly", "Lip13"):  # singlets: the two bases agree
        exact = metabolite_spectrum(name, ppm, basis="multiplet")
        simulated = metabolite_spectrum(name, ppm, basis="density-matrix")
        assert np.abs(simulated - exact).max() < 1e-4 * np.abs(exact).max()
    mi_first = metabolite_spectrum("mI", ppm, basis="multiplet")
    mi_sim = metabolite_spectrum("mI", ppm, basis="density-matrix")
    assert np.linalg.norm(mi_sim - mi_first) > 0.05 * np.linalg.norm(mi_first)


def test_merging_keeps_the_total_and_sorts():
    frequency = np.array([5.0, 1.0, 1.05, 3.0, 1.08])
    amplitude = np.array([1, 2, 2j, 1e-9, 1], dtype=np.complex128)
    merged_f, merged_a = merge_lines(frequency, amplitude, resolution_hz=0.1,
                                     min_amplitude=1e-6)
    assert merged_f == pytest.approx([(1.0 * 2 + 1.05 * 2 + 1.08) / 5, 5.0])
    assert merged_a == pytest.approx([3 + 2j, 1])


def test_voigt_tail_series_matches_wofz():
    offsets = np.linspace(-500, 500, 40_001)
    for lorentz, gauss in ((1.5, 2.0), (21.5, 6.5), (1.0, 0.3)):
        exact = voigt(offsets, lorentz, gauss)
        series = voigt(offsets, lorentz, gauss, tail_z=6.0)
        assert np.max(np.abs(series - exact) / np.abs(exact)) < 5e-5


@pytest.mark.parametrize("basis", ["multiplet", "density-matrix"])
def test_the_generator_basis_equals_the_spectra_one_by_one(basis):
    ppm = ppm_axis()
    together = _Basis(ppm, basis).spectra(2.0, 3.5, 0.013)
    one_by_one = np.stack([metabolite_spectrum(name, ppm, lorentz_hz=2.0, gauss_hz=3.5,
                                               shift_ppm=0.013, basis=basis)
                           for name in METABOLITES])
    assert np.abs(together - one_by_one).max() < 1e-12 * np.abs(one_by_one).max()


def test_make_mrs_with_the_density_matrix_basis():
    data = make_mrs(24, 4, seed=1, basis="density-matrix")
    again = make_mrs(24, 4, seed=1, basis="density-matrix")
    first_order = make_mrs(24, 4, seed=1)
    assert np.array_equal(data.spectra.numpy(), again.spectra.numpy())
    assert np.array_equal(data.labels.numpy(), first_order.labels.numpy())
    assert not np.allclose(data.spectra.numpy(), first_order.spectra.numpy())
    with pytest.raises(ValueError, match="basis must be one of"):
        make_mrs(24, 4, basis="lcmodel")


def test_basis_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from fastinfluence.datasets import save_mrs_bases

    path = save_mrs_bases(tmp_path / "bases.png", ("Cr", "Lac"), dpi=30)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="names is empty"):
        save_mrs_bases(tmp_path / "none.png", ())
