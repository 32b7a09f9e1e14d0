"""The committed tables regenerate byte for byte from the committed runs, and the committed
runs are those of the default commands' settings (so those commands resume them)."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import pytest
from example_loader import EXAMPLES, load_example

from fastinfluence.experiments import regenerate_table

RESULTS = EXAMPLES / "results"
COMMITTED = {
    "isr_isp_table1": ("isr_isp_table1", "isr_isp_ablation_direction", "isr_isp_sweeps",
                       "isr_isp_figure1_head"),
    "ousm_table1": ("ousm_table1", "ousm_table1_symmetric"),
    "mrs_table2": ("mrs_table2", "mrs_table2_theta", "mrs_table2_smote", "mrs_table2_pool"),
    "denoising_cnn_tables": ("denoising_cnn_tables", "denoising_cnn_tables_chest"),
    "denoising_cw_budget": ("denoising_cw_budget",),
    "gpt2_influence": ("gpt2_influence",),
    "vit_brain_tumour": ("vit_brain_tumour",),
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
    extendable ones aside: the command extended a folder that held more; a setting added
    after the runs were saved counts as its ``absent`` value, as when they are resumed)."""
    module = load_example(example)
    saved = json.loads((RESULTS / folder / "runs.json").read_text())
    flags = shlex.split(saved["meta"]["command"])[2:]
    settings = asdict(module.CLI.settings_from(module.CLI.parse_args(flags)))
    for name in module.CLI.extendable:
        settings[name] = saved["settings"][name]
    absent = {f.name: f.default for f in fields(module.Settings) if f.default is not MISSING}
    assert settings == json.loads(json.dumps(absent)) | saved["settings"]


def redraw(example: str, folder: str, tmp_path: Path) -> tuple[Path, dict]:
    """``--no-train`` with the saved command's flags on a copy of the committed folder
    without its figures: the table and the figures as that command writes them."""
    module = load_example(example)
    out = tmp_path / folder
    shutil.copytree(RESULTS / folder, out, ignore=shutil.ignore_patterns("*.png"))
    flags = shlex.split(json.loads((out / "runs.json").read_text())["meta"]["command"])[2:]
    return out, module.main([*flags, "--no-train", "--no-progress", "--out", str(out)])


@pytest.mark.parametrize(("example", "folder", "figures"), [
    ("ousm_table1", "ousm_table1", True),
    pytest.param("mrs_table2", "mrs_table2", True, marks=pytest.mark.slow),
    # drawn before the runs saved their figure inputs: only a rerun of trial 0 redraws them
    pytest.param("isr_isp_table1", "isr_isp_table1", False, marks=pytest.mark.slow),
    pytest.param("isr_isp_table1", "isr_isp_sweeps", True, marks=pytest.mark.slow),
    pytest.param("isr_isp_table1", "isr_isp_figure1_head", True, marks=pytest.mark.slow),
    pytest.param("denoising_cw_budget", "denoising_cw_budget", True, marks=pytest.mark.slow),
])
def test_no_train_redraws_the_committed_table_and_figures(example: str, folder: str,
                                                          figures: bool, tmp_path: Path):
    out, _ = redraw(example, folder, tmp_path)
    assert (out / "table.md").read_text() == (RESULTS / folder / "table.md").read_text()
    assert (out / "runs.json").read_text() == (RESULTS / folder / "runs.json").read_text()
    if figures:
        drawn = {path.name for path in out.glob("*.png") if path.stat().st_size > 0}
        assert drawn == {path.name for path in (RESULTS / folder).glob("*.png")}
