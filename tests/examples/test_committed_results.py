"""The committed tables regenerate byte for byte from the committed runs, and the committed
runs are those of the default commands' settings (so those commands resume them)."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
from example_loader import EXAMPLES, load_example

from fastinfluence.experiments import regenerate_table

RESULTS = EXAMPLES / "results"
COMMITTED = {
    "isr_isp_table1": ("isr_isp_table1", "isr_isp_ablation_direction"),
    "ousm_table1": ("ousm_table1", "ousm_table1_symmetric"),
    "mrs_table2": ("mrs_table2",),
    "denoising_cnn_tables": ("denoising_cnn_tables", "denoising_cnn_tables_chest"),
}


@pytest.mark.parametrize(("example", "folder"), [
    (example, folder) for example, folders in COMMITTED.items() for folder in folders])
def test_committed_table_regenerates_identical_from_its_runs(example: str, folder: str):
    module = load_example(example)
    out: Path = RESULTS / folder
    table = regenerate_table(out, module.Settings, module.render_table)
    assert table == (out / "table.md").read_text()


def test_every_committed_results_folder_is_checked():
    assert {path.parent.name for path in RESULTS.glob("*/runs.json")} == {
        folder for folders in COMMITTED.values() for folder in folders}


@pytest.mark.parametrize(("example", "folder"), [
    (example, folder) for example, folders in COMMITTED.items() for folder in folders])
def test_committed_runs_have_the_settings_of_their_command(example: str, folder: str):
    """The generated command line resolves the saved command to the saved settings (the
    extendable ones aside: the command extended a folder that held more)."""
    module = load_example(example)
    saved = json.loads((RESULTS / folder / "runs.json").read_text())
    flags = shlex.split(saved["meta"]["command"])[2:]
    settings = asdict(module.CLI.settings_from(module.CLI.parse_args(flags)))
    for name in module.CLI.extendable:
        settings[name] = saved["settings"][name]
    assert settings == saved["settings"]
