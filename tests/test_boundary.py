"""The engine and the applications stay apart: nothing that ``score`` and the ``score`` command
use imports ``fastinfluence.robust``, ``datasets`` or ``models``, nor what only their extras
install (docs/design.md §4)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLICATIONS = ("fastinfluence.robust", "fastinfluence.datasets", "fastinfluence.models")
EXTRAS_ONLY = ("nilearn", "h5py", "PIL", "nibabel", "pydicom", "matplotlib", "sklearn", "art",
               "transformers")  # the last: the Hugging Face tests' (K-FAC reads it if loaded)
ENGINE_ENTRY_POINTS = ("fastinfluence.scoring", "fastinfluence.score_command")


@pytest.mark.slow
def test_scoring_and_the_score_command_load_no_application():
    """A whole run of ``score`` on a network, in a fresh interpreter, loads no application
    module and no package of the applications' extras."""
    program = f"""
import sys, torch
import fastinfluence as fi, fastinfluence.score_command
model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
data = (torch.randn(12, 4), torch.randint(0, 3, (12,)))
fi.score(model, data, data, params="all")
fi.score(model, data, data)
fi.score(model, data, data, params="all", hessian="kfac")
loaded = [m for m in sys.modules
          if m.startswith({APPLICATIONS!r}) or m.split(".")[0] in {EXTRAS_ONLY!r}]
print(sorted(loaded))
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_engine_module_imports_an_application():
    """Also the imports inside functions, which the run above may not reach."""
    package = ROOT / "fastinfluence"
    applications = {package / name.split(".")[1] for name in APPLICATIONS}
    offending = []
    for path in package.rglob("*.py"):
        if any(folder in path.parents for folder in applications):
            continue
        if path.name in ("cli.py", "demo.py", "experiments.py"):
            continue  # the command-line front ends of the applications
        for name in imported_modules(path):
            if name.startswith(APPLICATIONS) or name.split(".")[0] in EXTRAS_ONLY:
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offending == []
