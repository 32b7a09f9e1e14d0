"""fastinfluence.info(), `python -m fastinfluence info`, and the warned twin fallback."""

import subprocess
import sys
import warnings

import pytest
import torch

from fastinfluence import _extension, ops
from fastinfluence.cli import main


def test_info_reports_extension_versions_and_ops():
    report = _extension.info()
    assert report["torch"] == torch.__version__
    assert report["torch_cuda"] == torch.version.cuda
    assert set(report["ops"]) == set(_extension.OPS)
    assert report["extension_loaded"] == (_extension.LOAD_ERROR is None)
    if report["extension_loaded"]:
        assert "cpu" in report["native_devices"]
        assert all("cpu" in devices for devices in report["ops"].values())


def test_cli_info_prints_the_report(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "fastinfluence._C:" in text and "head_lissa" in text


def test_python_m_fastinfluence_info_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fastinfluence", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"extension_loaded"' in result.stdout


def test_missing_extension_runs_twins_and_warns_once(monkeypatch):
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_extension, "_warned", set())
    v, g, hv = torch.ones(3), torch.ones(3), torch.ones(3)
    with pytest.warns(RuntimeWarning, match="not loaded .*simulated.*twins"):
        ops.lissa_update_(v, g, hv, 0.0, 1.0)
    torch.testing.assert_close(v, torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.lissa_update_(v, g, hv, 0.0, 1.0)
