"""The examples' resumable records: loading saved runs against the settings of a command."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from fastinfluence.experiments import load_runs, load_saved, save_json


@dataclass
class Settings:
    alpha: float
    folds: list[int]


def test_missing_file_or_fresh_gives_nothing(tmp_path):
    path = tmp_path / "runs.json"
    assert load_saved(path, Settings(0.5, [0]), fresh=False) == {}
    save_json(path, {"settings": {"alpha": 0.5, "folds": [0]}, "runs": [{"k": 1}]})
    assert load_saved(path, Settings(0.5, [0]), fresh=True) == {}
    assert load_runs(path, Settings(0.5, [0]), fresh=False) == [{"k": 1}]


def test_other_settings_are_refused_by_name_except_the_extendable(tmp_path):
    path = tmp_path / "runs.json"
    save_json(path, {"settings": {"alpha": 0.5, "folds": [0]}, "runs": [], "meta": {"m": 1}})
    with pytest.raises(SystemExit, match=r"other settings: alpha \(0.5 there, 0.3 here\)\. pass"):
        load_runs(path, Settings(0.3, [0]), fresh=False)
    with pytest.raises(SystemExit, match=r"folds \(\[0\] there, \[1\] here\)"):
        load_runs(path, Settings(0.5, [1]), fresh=False)
    saved = load_saved(path, Settings(0.5, [1]), fresh=False, extendable=("folds",))
    assert saved == json.loads(path.read_text())
    with pytest.raises(SystemExit, match=r"alpha .*\. Only --folds can extend it; pass --fresh"):
        load_saved(path, Settings(0.3, [1]), fresh=False, extendable=("folds",))


@dataclass
class LaterSettings:
    alpha: float
    folds: list[int]
    basis: str = "multiplet"


def test_a_setting_added_later_counts_as_its_default_in_older_files(tmp_path):
    path = tmp_path / "runs.json"
    save_json(path, {"settings": {"alpha": 0.5, "folds": [0]}, "runs": [{"k": 1}]})
    assert load_runs(path, LaterSettings(0.5, [0]), fresh=False) == [{"k": 1}]
    with pytest.raises(SystemExit, match=r"basis \('multiplet' there, 'density' here\)"):
        load_runs(path, LaterSettings(0.5, [0], basis="density"), fresh=False)
