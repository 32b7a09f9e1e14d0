"""The MR spectra simulator, its loader, the class-mean figure and the patient folds."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fastinfluence.datasets import (
    load_mrs_spectra,
    make_mrs,
    patient_folds,
    save_mrs_class_means,
    standardise,
)
from fastinfluence.datasets.mrs import (
    FIELD_MHZ,
    METABOLITES,
    N_POINTS,
    metabolite_spectrum,
    multiplet,
    ppm_axis,
    voigt,
    voigt_fwhm,
)

FINE = np.linspace(4.3, 0.4, 39_001)  # 0.0001 ppm = 0.012 Hz steps


@pytest.fixture(scope="module")
def spectra():
    return make_mrs(300, 24, seed=3)


def local_maxima(values: np.ndarray, ppm: np.ndarray, low: float, high: float) -> np.ndarray:
    inside = (ppm >= low) & (ppm <= high)
    v, p = values[inside], ppm[inside]
    peaks = (v[1:-1] > v[:-2]) & (v[1:-1] > v[2:])
    return p[1:-1][peaks]


@pytest.mark.parametrize(("name", "expected"), [
    ("NAA", 2.008), ("Cr", 3.027), ("Cho", 3.185), ("Gly", 3.548), ("Lip13", 1.30),
])
def test_singlets_peak_at_their_shifts(name, expected):
    absorption = metabolite_spectrum(name, FINE, lorentz_hz=1.0, gauss_hz=1.0).real
    window = np.abs(FINE - expected) < 0.1
    assert FINE[window][np.argmax(absorption[window])] == pytest.approx(expected, abs=2e-4)


def test_creatine_has_both_singlets_and_lactate_is_a_doublet():
    cr = metabolite_spectrum("Cr", FINE, lorentz_hz=1.0, gauss_hz=1.0).real
    assert local_maxima(cr, FINE, 3.85, 3.95) == pytest.approx([3.913], abs=2e-4)
    lac = metabolite_spectrum("Lac", FINE, lorentz_hz=0.5, gauss_hz=0.5).real
    split = 6.93 / FIELD_MHZ / 2
    assert sorted(local_maxima(lac, FINE, 1.2, 1.4)) == pytest.approx(
        [1.313 - split, 1.313 + split], abs=2e-4)


def test_multiplets_are_binomial_with_unit_intensity():
    triplet = multiplet((7.0, 2))
    assert [o for o, _ in triplet] == [-7.0, 0.0, 7.0]
    assert [w for _, w in triplet] == [0.25, 0.5, 0.25]
    assert sum(w for _, w in multiplet((15.9, 1), (3.9, 1))) == pytest.approx(1.0)
    assert len(multiplet((6.93, 3))) == 4


@pytest.mark.parametrize(("lorentz", "gauss"), [(2.0, 0.3), (0.3, 3.0), (2.5, 3.0)])
def test_voigt_width_and_area(lorentz, gauss):
    hz = np.linspace(-400, 400, 160_001)
    line = voigt(hz, lorentz, gauss)
    absorption = line.real
    above = hz[absorption >= absorption.max() / 2]
    assert above[-1] - above[0] == pytest.approx(voigt_fwhm(lorentz, gauss), rel=2e-3)
    # unit area (the Lorentzian's tails beyond ±400 Hz hold ~2γ/(π·400) of it)
    tails = 2 * lorentz / (np.pi * 400)
    assert np.trapezoid(absorption, hz) == pytest.approx(1.0, abs=tails + 1e-3)
    # the dispersion part is odd
    np.testing.assert_allclose(line.imag, -line.imag[::-1], atol=1e-12)


def test_a_singlet_in_the_spectrum_has_the_voigt_width():
    absorption = metabolite_spectrum("NAA", FINE, lorentz_hz=3.0, gauss_hz=4.0).real
    window = np.abs(FINE - 2.008) < 0.2
    peak = absorption[window]
    above = FINE[window][peak >= peak.max() / 2]
    assert (above.max() - above.min()) * FIELD_MHZ == pytest.approx(voigt_fwhm(3.0, 4.0), rel=5e-3)


def test_structure_labels_and_noise_fraction(spectra):
    assert spectra.spectra.shape == (300, N_POINTS) and spectra.spectra.dtype == torch.float32
    np.testing.assert_array_equal(spectra.ppm, ppm_axis())
    assert spectra.ppm[0] > spectra.ppm[-1]
    ids, counts = np.unique(spectra.patient_ids, return_counts=True)
    assert len(ids) == 24 and counts.min() >= 2 and counts.max() >= 3 * counts.min()
    for patient in ids:  # one label per patient: the group (the hemisphere's label)
        assert len(set(spectra.labels[spectra.patient_ids == patient].tolist())) == 1
    healthy_group = spectra.labels == 0
    # the label noise is one-sided: only tumour labels can be wrong
    assert not spectra.mislabelled[healthy_group].any()
    wrong = spectra.mislabelled[~healthy_group].float().mean()
    assert 0.1 < wrong < 0.6
    assert torch.equal(spectra.tissue_labels, (spectra.tumour_fraction > 0).long())
    none = make_mrs(40, 6, seed=3, healthy_fraction=0.0)
    assert not none.mislabelled.any()


def test_tumour_tissue_changes_in_the_documented_direction(spectra):
    data = spectra
    x = standardise(data.spectra)[:, 0]
    tumour, healthy = data.tissue_labels == 1, data.tissue_labels == 0

    def height(ppm: float) -> torch.Tensor:
        return x[:, int(np.argmin(np.abs(data.ppm - ppm)))]

    for ppm, direction in ((3.185, 1), (1.30, 1), (0.90, 1), (2.008, -1)):
        difference = height(ppm)[tumour].mean() - height(ppm)[healthy].mean()
        assert direction * difference > 0, ppm
    # Cho/NAA rises in tumour tissue; and the classes overlap (some tumour below the median)
    ratio = height(3.185) - height(2.008)
    assert ratio[tumour].median() > ratio[healthy].quantile(0.9)
    assert (ratio[tumour] < ratio[healthy].median()).any()


def test_seeded_and_sized():
    a, b = make_mrs(40, 6, seed=5), make_mrs(40, 6, seed=5)
    assert torch.equal(a.spectra, b.spectra) and torch.equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.patient_ids, b.patient_ids)
    assert not torch.equal(a.spectra, make_mrs(40, 6, seed=6).spectra)
    assert (a.labels == 1).sum() == round(40 * 4054 / 7442)
    with pytest.raises(ValueError, match="n_spectra"):
        make_mrs(10, 8)
    with pytest.raises(ValueError, match="healthy_fraction"):
        make_mrs(100, 10, healthy_fraction=1.0)


def test_standardise_and_subset(spectra):
    x = standardise(spectra.spectra)
    assert x.shape == (300, 1, N_POINTS)
    torch.testing.assert_close(x.mean(-1), torch.zeros(300, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(-1), torch.ones(300, 1), atol=1e-5, rtol=0)
    part = spectra.subset([5, 1])
    assert torch.equal(part.spectra, spectra.spectra[[5, 1]])
    assert list(part.patient_ids) == [spectra.patient_ids[5], spectra.patient_ids[1]]
    assert torch.equal(part.mislabelled, spectra.mislabelled[[5, 1]])


def test_csv_and_npy_round_trip(tmp_path, spectra):
    part = spectra.subset(range(7))
    path = tmp_path / "spectra.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", *[f"p{k}" for k in range(N_POINTS)], "patient_id"])
        for row, label, patient in zip(part.spectra.tolist(), part.labels.tolist(),
                                       part.patient_ids, strict=True):
            writer.writerow([label, *[repr(v) for v in row], patient])
    loaded = load_mrs_spectra(path)
    assert torch.equal(loaded.spectra, part.spectra)
    assert torch.equal(loaded.labels, part.labels)
    np.testing.assert_array_equal(loaded.patient_ids, part.patient_ids)
    assert loaded.tissue_labels is None and loaded.mislabelled is None
    table = np.column_stack([np.arange(7) // 3 + 100, part.labels.numpy(),
                             part.spectra.numpy().astype(np.float64)])
    np.save(tmp_path / "spectra.npy", table)
    loaded = load_mrs_spectra(tmp_path / "spectra.npy")
    assert torch.equal(loaded.spectra, part.spectra)
    assert list(loaded.patient_ids) == ["100", "100", "100", "101", "101", "101", "102"]
    np.save(tmp_path / "short.npy", table[:, :50])
    with pytest.raises(ValueError, match="pass ppm"):
        load_mrs_spectra(tmp_path / "short.npy")
    assert len(load_mrs_spectra(tmp_path / "short.npy", ppm=np.linspace(4, 1, 48)).ppm) == 48
    table[0, 1] = 2
    np.save(tmp_path / "bad.npy", table)
    with pytest.raises(ValueError, match="labels"):
        load_mrs_spectra(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="subject"):
        load_mrs_spectra(path, patient_column="subject")


def test_class_mean_figure_plots_each_group_s_mean(tmp_path, spectra, monkeypatch):
    figure_module = pytest.importorskip("matplotlib.figure")
    saved = []
    save = figure_module.Figure.savefig

    def recorded(figure, *args, **kwargs):
        saved.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(figure_module.Figure, "savefig", recorded)
    path = save_mrs_class_means(spectra, tmp_path / "means.png", dpi=30)
    assert path.stat().st_size > 5000 and len(saved) == 1
    x = standardise(spectra.spectra)[:, 0].numpy()
    labels, tissue = spectra.labels.numpy(), spectra.tissue_labels.numpy()
    groups = [  # panel by label, then by tissue (simulated data have it)
        [labels == 0, labels == 1],
        [(tissue == 0) & (labels == 0), (tissue == 0) & (labels == 1), tissue == 1],
    ]
    axes = saved[0].axes
    assert len(axes) == 2
    for axis, members in zip(axes, groups, strict=True):
        lines, names = axis.get_legend_handles_labels()
        assert len(lines) == len(members)
        for line, name, member in zip(lines, names, members, strict=True):
            assert name.endswith(f"(n={member.sum()})")
            np.testing.assert_allclose(line.get_xdata(), spectra.ppm)
            np.testing.assert_allclose(line.get_ydata(), x[member].mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_patient_folds_keep_patients_whole_and_balance_classes(seed, spectra):
    folds = patient_folds(spectra.patient_ids, spectra.labels, 4, seed=seed)
    everything = np.concatenate(folds)
    assert sorted(everything.tolist()) == list(range(len(spectra)))
    patients = [set(spectra.patient_ids[fold]) for fold in folds]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not patients[a] & patients[b]
    tumour_patients = [len(set(spectra.patient_ids[fold][spectra.labels[fold] == 1]))
                       for fold in folds]
    assert max(tumour_patients) - min(tumour_patients) <= 1
    with pytest.raises(ValueError, match="n_folds"):
        patient_folds(spectra.patient_ids, spectra.labels, 25)


def test_every_metabolite_has_signal_in_the_window():
    ppm = ppm_axis()
    for name in METABOLITES:
        assert np.abs(metabolite_spectrum(name, ppm)).max() > 0, name
