#!/usr/bin/env bash
# Creates the virtual env (default .venv) with torch==2.13.0 and fastinfluence installed in
# editable mode with its dev extras. Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTINFLUENCE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
# Pin torch first so that nothing below can resolve another (CUDA) build of it.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q --no-build-isolation -e ".[dev]"
echo "fastinfluence: environment ready in $VENV"
