"""Every public module, class, function, method and property of the package has a docstring;
the design document the code cites exists with the sections it cites; the README stays short,
the README's and the docs site's relative links resolve, and the site's generated layer table
covers the registry."""

from __future__ import annotations

import importlib
import importlib.util
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


SOURCE_SUFFIXES = {".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".txt", ".sh", ".toml", ".yml",
                   ".cfg", ".in"}
OUTSIDE_REFERENCES = re.compile(r"(shared/(papers|research)/|DESIGN\.md)")


def project_sources() -> list[Path]:
    """Every text source of the project: the package, the native code and its CMake project,
    examples, benchmarks, scripts, tests, docs and the top-level files."""
    folders = ("fastinfluence", "csrc", "examples", "benchmarks", "scripts", "tests", "docs")
    found = [path for folder in folders for path in (ROOT / folder).rglob("*")
             if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts]
    top = [ROOT / name for name in ("README.md", "setup.py", "pyproject.toml", "CMakeLists.txt",
                                    "MANIFEST.in", "mkdocs.yml", ".ci/run")]
    return [path for path in [*found, *top] if path.is_file()]


def test_no_file_cites_a_file_outside_the_repository():
    """Users have the repository only: papers are cited by author and title."""
    citing = [f"{path.relative_to(ROOT)}:{number}"
              for path in project_sources()
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if OUTSIDE_REFERENCES.search(line) and path != Path(__file__).resolve()]
    assert citing == []


def test_the_cited_design_sections_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", design, flags=re.MULTILINE))
    cited = set()
    for path in project_sources():
        cited.update(re.findall(r"docs/design\.md §(\d+(?:\.\d+)?)", path.read_text()))
    assert cited, "nothing cites docs/design.md"
    assert cited <= sections, f"cited sections missing from docs/design.md: {cited - sections}"


README_MAX_LINES = 200
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", flags=re.MULTILINE | re.DOTALL)


def documentation_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of a Markdown page's relative links, anchors dropped, code blocks skipped."""
    text = FENCED_CODE.sub("", page.read_text())
    targets = [m.group(1).split("#", 1)[0] for m in MARKDOWN_LINK.finditer(text)]
    return [t for t in targets if t and "://" not in t and not t.startswith(("/", "mailto:"))]


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_every_relative_link_of_the_readme_and_the_docs_resolves_in_the_repository():
    broken = []
    for page in documentation_pages():
        for target in relative_links(page):
            path = (page.parent / target).resolve()
            if not (path.is_file() and path.is_relative_to(ROOT)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_site_navigation_lists_every_page_of_docs():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s*- (?:[^:\n]+: )?([\w/.-]+\.md)\s*$", config, flags=re.MULTILINE))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert "design.md" in nav
    assert nav == pages, f"in nav only: {nav - pages}; in docs/ only: {pages - nav}"


def test_the_generated_layer_table_lists_every_registered_layer():
    """The docs' table, read from the source without torch, says what the live registry
    holds: every key, whether it has a tangent rule, its K-FAC cell and its fold."""
    from fastinfluence.layers import NotCovered, registered
    from fastinfluence.layers.huggingface import CONV1D_MODULE

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts/docs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    rows = hooks.registry_rows(ROOT)
    # transformers' Conv1D is registered once transformers is loaded (another test may have
    # loaded it); the page names it in a note, not in the table of torch's layers.
    entries = {key: entry for key, entry in registered().items()
               if getattr(key, "__module__", None) != CONV1D_MODULE}
    assert len(rows) == len(entries)
    assert len(hooks.layer_registry_table(ROOT).splitlines()) == len(entries) + 2
    methods = {key.strip("'\"") for key, row in rows.items() if row["kind"] == "tensor method"}
    assert methods == {key for key in entries if isinstance(key, str)}
    for key, entry in entries.items():
        if not isinstance(key, type):
            continue
        # torch's modules are written nn.X; a family's own module type by its name
        row = rows[f"nn.{key.__name__}" if key.__module__.startswith("torch.nn")
                   else key.__name__]
        assert (row["tangent"] != "—") == (entry.tangent is not None), key
        if isinstance(entry.kfac, NotCovered):
            assert row["kfac"] == f"not covered: {entry.kfac.reason}", key
        elif entry.kfac is not None:
            assert row["kfac"] == f"yes (`{type(entry.kfac).__name__}`)", key
        else:
            assert row["kfac"] == "—", key
        folds = ", ".join(f"`nn.{kind.__name__}`" for kind in entry.folds_into)
        assert row["fold"] == (f"into {folds}" if folds else "—"), key


PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.MULTILINE | re.DOTALL)


def test_the_readmes_code_runs_on_a_small_network():
    """The README's Python blocks run as written, in order, given the names a reader brings:
    a CNN and its data as ``(X, y)`` pairs."""
    import torch
    from problems import make_problem

    blocks = PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    assert blocks, "the README has no Python example"
    model, train, val = make_problem("cnn", n_train=24, n_val=6)
    names = {"model": model, "train": train, "val": val, "X_train": train[0],
             "y_train": train[1], "X_val": val[0], "y_val": val[1], "x": train[0][:3],
             "y": train[1][:3], "test": (val[0][:2], val[1][:2])}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), names)
    assert names["inf"].report.path == "head-closed-form"
    # fi.score's defaults (the last layer, λ = 0.01) against the float64 oracle
    from fastinfluence import reference

    head = list([m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].parameters())
    expected = reference.influence_scores(model, head, train, val, 0.01)
    torch.testing.assert_close(names["scores"], expected, rtol=1e-8, atol=1e-10)
