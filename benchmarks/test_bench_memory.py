"""``bench_memory.py`` at a tiny size (each ``n`` in its own process, as the benchmark runs),
and the docs page's table against the committed JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from bench_memory import NpyImages, main, table, write_images

ROOT = Path(__file__).resolve().parents[1]


def test_the_images_are_read_back_by_either_reader(tmp_path):
    path = tmp_path / "images.npy"
    write_images(path, 5)
    whole = np.load(path)
    for reader in ("file", "memmap"):
        dataset = NpyImages(path, reader)
        assert len(dataset) == 5
        for index in (0, 4):
            image, label = dataset[index]
            assert np.array_equal(image.numpy(), whole[index]) and 0 <= int(label) < 3


@pytest.mark.slow
def test_a_tiny_run_measures_every_size_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    report = main(["--sizes", "6", "12", "--n-val", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [run["n"] for run in report["runs"]] == [6, 12]
    for run in report["runs"]:
        assert run["finite"] and run["cg_iterations"] == 1
        assert run["peak_rss_mib"] >= run["start_rss_mib"] > 0
    assert "| 12 |" in table(report)


@pytest.mark.parametrize("name", ["memory_cpu.json", "memory_cpu_paper.json"])
def test_the_docs_page_quotes_the_committed_measurement(name):
    report = json.loads((ROOT / "benchmarks/results" / name).read_text())
    page = (ROOT / "docs/guide/scaling.md").read_text()
    assert table(report) in page and report["target_met"]
    assert report["config"]["command"] in page
    assert re.search(rf"\*\*Measured\*\* {report['config']['date']} \([^)]*`{name}`", page)
