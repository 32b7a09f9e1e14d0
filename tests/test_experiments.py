"""The examples' resumable records: loading saved runs against the settings of a command."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from fastinfluence.experiments import (
    ExperimentCLI,
    format_markdown_table,
    load_saved,
    save_json,
    setting,
)


@dataclass
class Settings:
    alpha: float
    folds: list[int]


def test_missing_file_or_fresh_gives_nothing(tmp_path):
    path = tmp_path / "runs.json"
    assert load_saved(path, Settings(0.5, [0]), fresh=False) == {}
    save_json(path, {"settings": {"alpha": 0.5, "folds": [0]}, "runs": [{"k": 1}]})
    assert load_saved(path, Settings(0.5, [0]), fresh=True) == {}
    assert load_saved(path, Settings(0.5, [0]), fresh=False)["runs"] == [{"k": 1}]


def test_other_settings_are_refused_by_name_except_the_extendable(tmp_path):
    path = tmp_path / "runs.json"
    save_json(path, {"settings": {"alpha": 0.5, "folds": [0]}, "runs": [], "meta": {"m": 1}})
    with pytest.raises(SystemExit, match=r"other settings: alpha \(0.5 there, 0.3 here\)\. pass"):
        load_saved(path, Settings(0.3, [0]), fresh=False)
    with pytest.raises(SystemExit, match=r"folds \(\[0\] there, \[1\] here\)"):
        load_saved(path, Settings(0.5, [1]), fresh=False)
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
    assert load_saved(path, LaterSettings(0.5, [0]), fresh=False)["runs"] == [{"k": 1}]
    with pytest.raises(SystemExit, match=r"basis \('multiplet' there, 'density' here\)"):
        load_saved(path, LaterSettings(0.5, [0], basis="density"), fresh=False)


@dataclass
class Declared:
    epochs: int = setting(12, 40, type=int, help="T")
    folds: list[int] = setting([0, 1], lambda s: list(range(s.epochs // 10)), type=int,
                               nargs="+")
    recalibrate: bool = setting(True, flag="--no-recalibrate")
    paper_size: bool = setting(lambda s: s.full, flag=None)
    name: str = setting("a", flag="--the-name", choices=["a", "b"])


CLI = ExperimentCLI(Declared, "Doc.\n\nMore.", "examples/x.py", Path("out"),
                    check=lambda s: "epochs must be >= 1" if s.epochs < 1 else None)


def test_declared_settings_generate_the_flags_and_resolve_default_full_and_given():
    resolve = lambda *argv: CLI.settings_from(CLI.parse_args(list(argv)))  # noqa: E731
    assert resolve() == Declared(12, [0, 1], True, False, "a")
    assert resolve("--full") == Declared(40, [0, 1, 2, 3], True, True, "a")
    # a given flag wins over --full; a derived value follows the values above it; lists are
    # de-duplicated; a bool's flag stores the opposite of its default
    assert resolve("--full", "--epochs", "20", "--folds", "1", "1", "0", "--no-recalibrate",
                   "--the-name", "b") == Declared(20, [1, 0], False, True, "b")
    assert resolve("--full", "--epochs", "20").folds == [0, 1]
    help_text = CLI.parser().format_help()
    assert "T (default 12; --full 40)" in help_text and "--paper-size" not in help_text
    for shared in ("--out", "--fresh", "--no-train", "--shard", "--merge", "--threads",
                   "--device", "--progress"):
        assert shared in help_text
    with pytest.raises(SystemExit, match="epochs must be >= 1"):
        CLI.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        CLI.parse_args(["--shard", "2/2"])
    assert CLI.parse_args([]).out == Path("out")


def test_extendable_settings_take_the_union_of_lists_and_the_larger_number():
    cli = ExperimentCLI(Declared, "Doc.", "examples/x.py", Path("out"),
                        extendable=("epochs", "folds"))
    settings = Declared(12, [2, 0], True, False, "a")
    first = {**asdict(settings), "epochs": 30, "folds": [0, 1]}
    assert cli.extend(settings, first, asdict(settings)) == Declared(
        30, [0, 1, 2], True, False, "a")


def test_saved_lists_of_numbers_stay_on_one_line(tmp_path):
    path = tmp_path / "runs.json"
    payload = {"runs": [{"first": [1, 2, 3], "nested": [[1], {"a": 1}]}], "empty": {}}
    save_json(path, payload)
    assert json.loads(path.read_text()) == payload
    assert '"first": [1, 2, 3]' in path.read_text()


def test_the_engine_never_imports_the_experiment_harness():
    code = ("import sys, fastinfluence, fastinfluence.scoring, fastinfluence.hessian; "
            "print('fastinfluence.experiments' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_markdown_tables_have_a_separator_and_one_line_per_row():
    assert format_markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == (
        "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |")
