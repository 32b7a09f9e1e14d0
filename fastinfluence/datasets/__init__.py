"""Data for the papers: an embedded brain-tumour generator built on the MNI152 template, an
embedded dermoscopy generator drawn from the ABCD cues, an embedded chest X-ray generator
projected from a real chest CT, an embedded 1H MR spectra simulator, real-format loaders
(figshare brain tumour, ISIC 2017/2018, RSNA pneumonia, spectra tables), image and label
noise, and patient-level splits and cross-validation folds. See
``docs/papers/data.md``."""

from fastinfluence.datasets.brain_tumour import BrainTumourData, make_brain_tumour
from fastinfluence.datasets.chest_xray import ChestXrayData, make_chest_xray
from fastinfluence.datasets.dermoscopy import DermoscopyData, make_dermoscopy
from fastinfluence.datasets.figshare import load_figshare_brain_tumour
from fastinfluence.datasets.isic import SkinLesionData, load_isic2017, load_isic2018
from fastinfluence.datasets.label_noise import flip_labels_by_loss, flip_labels_symmetric
from fastinfluence.datasets.mrs import MRSData, load_mrs_spectra, make_mrs, standardise
from fastinfluence.datasets.noise import add_noise, add_noise_to_fraction, rice_moments
from fastinfluence.datasets.plotting import (
    save_brain_tumour_grid,
    save_chest_xray_grid,
    save_dermoscopy_grid,
    save_mrs_bases,
    save_mrs_class_means,
)
from fastinfluence.datasets.rsna import load_rsna_pneumonia
from fastinfluence.datasets.splits import PatientSplit, patient_folds, split_by_patient

__all__ = [
    "BrainTumourData",
    "ChestXrayData",
    "DermoscopyData",
    "MRSData",
    "PatientSplit",
    "SkinLesionData",
    "add_noise",
    "add_noise_to_fraction",
    "flip_labels_by_loss",
    "flip_labels_symmetric",
    "load_figshare_brain_tumour",
    "load_isic2017",
    "load_isic2018",
    "load_mrs_spectra",
    "load_rsna_pneumonia",
    "make_brain_tumour",
    "make_chest_xray",
    "make_dermoscopy",
    "make_mrs",
    "patient_folds",
    "rice_moments",
    "save_brain_tumour_grid",
    "save_chest_xray_grid",
    "save_dermoscopy_grid",
    "save_mrs_bases",
    "save_mrs_class_means",
    "split_by_patient",
    "standardise",
]
