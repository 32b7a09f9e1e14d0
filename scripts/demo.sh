#!/usr/bin/env bash
# The README's main job: sets up the environment (scripts/setup.sh), then runs the demo —
# train the paper's CNN on a small noisy image set, score every training sample, save a PNG.
# Extra arguments go to `python -m fastinfluence demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FASTINFLUENCE_VENV:-.venv}"
"$VENV/bin/python" -m fastinfluence demo "$@"
