"""Every public module, class, function, method and property of the package has a docstring,
and the design document the code cites exists with the sections it cites."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import fastinfluence

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list:
    names = [info.name for info in pkgutil.walk_packages(fastinfluence.__path__,
                                                         "fastinfluence.")]
    names = [n for n in names if not any(p.startswith("_") for p in n.split(".")[1:])]
    return [fastinfluence, *(importlib.import_module(n) for n in names)]


def undocumented() -> list[str]:
    missing = []
    for module in public_modules():
        if not inspect.getdoc(module):
            missing.append(module.__name__)
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            where = f"{module.__name__}.{name}"
            if not inspect.getdoc(value):
                missing.append(where)
            if inspect.isclass(value):
                for member, attribute in vars(value).items():
                    if member.startswith("_"):
                        continue
                    if inspect.isfunction(attribute) or isinstance(attribute, property):
                        if not inspect.getdoc(getattr(value, member)):
                            missing.append(f"{where}.{member}")
    return missing


def test_every_public_name_has_a_docstring():
    assert undocumented() == []


def test_the_cited_design_sections_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", design, flags=re.MULTILINE))
    cited = set()
    for path in [*ROOT.glob("fastinfluence/**/*.py"), *ROOT.glob("fastinfluence/**/*.md"),
                 ROOT / "README.md", ROOT / "setup.py"]:
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md, outside the repository"
        cited.update(re.findall(r"docs/design\.md §(\d+(?:\.\d+)?)", text))
    assert cited, "nothing cites docs/design.md"
    assert cited <= sections, f"cited sections missing from docs/design.md: {cited - sections}"
