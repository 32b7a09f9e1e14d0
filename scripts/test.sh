#!/usr/bin/env bash
# The README's test command: sets up the environment (scripts/setup.sh), then lints and runs
# the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FASTINFLUENCE_VENV:-.venv}"
"$VENV/bin/ruff" check fastinfluence tests benchmarks examples
"$VENV/bin/python" -m fastinfluence info
"$VENV/bin/python" -m pytest -q "$@"
