"""fastinfluence.info(), `python -m fastinfluence info`, the warned twin fallback, the
build-time torch check and FASTINFLUENCE_REQUIRE_NATIVE."""

import json
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastinfluence as fi
from fastinfluence import _extension, ops
from fastinfluence.cli import main

# the native ops (fastinfluence.ops, less its switches)
NATIVE_OPS = set(ops.__all__) - {"NATIVE_DEFAULT", "twins", "use_native"}


def test_info_reports_extension_versions_and_ops():
    report = fi.info()
    assert report["torch"] == torch.__version__
    assert report["torch_cuda"] == torch.version.cuda
    assert set(report["ops"]) == set(NATIVE_OPS)
    assert report["extension_loaded"] == (report["extension_error"] is None)
    if report["extension_loaded"]:
        assert "cpu" in report["native_devices"]
        assert all("cpu" in devices for devices in report["ops"].values())
        assert all(hasattr(torch.ops.fastinfluence, op) for op in NATIVE_OPS)


def test_cli_info_prints_the_report(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = fi.info()
    state = "loaded" if report["extension_loaded"] else "NOT loaded"
    assert lines[0].startswith(f"fastinfluence._C: {state}")
    for op, devices in report["ops"].items():  # one line per op: where it runs natively
        (line,) = [line for line in lines if line.split()[:1] == [op]]
        assert line.split()[1:] == ([f"{d}," for d in devices[:-1]] + devices[-1:]
                                    or ["twin", "only"])


@pytest.mark.slow
def test_python_m_fastinfluence_info_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fastinfluence", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == json.loads(json.dumps(fi.info()))


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


def test_extension_built_for_another_torch_release_is_not_loaded_and_says_why(monkeypatch,
                                                                             capsys):
    running = torch.__version__
    reason = _extension._load_native("2.0.1")
    assert reason == f"built against torch 2.0.1, running torch {running}"
    # Another local build (+cpu / +cu130) of the running release is the same release.
    same_release = running.split("+")[0] + "+cu130"
    assert _extension._load_native(same_release) == _extension._load_native(running)

    monkeypatch.setitem(sys.modules, "fastinfluence._build_info",
                        types.SimpleNamespace(TORCH_VERSION="2.0.1"))
    assert _extension._build_torch_version() == "2.0.1"
    monkeypatch.setitem(sys.modules, "fastinfluence._build_info", None)
    assert _extension._build_torch_version() is None

    monkeypatch.setattr(_extension, "LOAD_ERROR", reason)
    monkeypatch.setattr(_extension, "BUILT_AGAINST_TORCH", "2.0.1")
    monkeypatch.setattr(_extension, "_warned", set())
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"NOT loaded (built against torch 2.0.1, running torch {running})" in text
    with pytest.warns(RuntimeWarning, match=re.escape(reason)):
        ops.lissa_update_(torch.ones(3), torch.ones(3), torch.ones(3), 0.0, 1.0)


@pytest.mark.slow
def test_require_native_turns_an_unloadable_extension_into_an_import_error():
    # A fresh interpreter in which `import fastinfluence._C` fails.
    code = (
        "import sys; sys.modules['fastinfluence._C'] = None\n"
        "import fastinfluence; print(fastinfluence.info()['extension_error'])\n"
    )
    outcomes = {}
    for value in ("0", "1", "yes"):
        env = {**os.environ, "FASTINFLUENCE_REQUIRE_NATIVE": value}
        outcomes[value] = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env
        )
    halted = "ModuleNotFoundError: import of fastinfluence._C halted"
    assert outcomes["0"].returncode == 0 and outcomes["0"].stdout.startswith(halted)
    assert outcomes["1"].returncode != 0
    assert (f"ImportError: FASTINFLUENCE_REQUIRE_NATIVE=1, but fastinfluence._C is not loaded "
            f"({halted}") in outcomes["1"].stderr
    assert outcomes["yes"].returncode != 0
    assert "FASTINFLUENCE_REQUIRE_NATIVE must be 0 or 1, got 'yes'" in outcomes["yes"].stderr


@pytest.mark.skipif(os.environ.get("FASTINFLUENCE_REQUIRE_NATIVE") != "1",
                    reason="CI's check (FASTINFLUENCE_REQUIRE_NATIVE=1) of the installed build")
def test_ci_build_loaded_and_recorded_the_torch_it_was_built_against():
    report = fi.info()
    assert report["extension_loaded"]
    assert report["extension_built_against_torch"] == torch.__version__
