#!/usr/bin/env bash
# The README's test command: sets up the environment (scripts/setup.sh), then lints, builds
# the documentation site (every page, link and API docstring must build cleanly: --strict) and
# runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FASTINFLUENCE_VENV:-.venv}"
"$VENV/bin/ruff" check fastinfluence tests benchmarks examples scripts
"$VENV/bin/python" -m fastinfluence info
DOCS_SITE="$(mktemp -d)"
trap 'rm -rf "$DOCS_SITE"' EXIT
# Not --quiet: it hides the warnings that --strict counts, and the build would pass.
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict -d "$DOCS_SITE"
"$VENV/bin/python" -m pytest -q "$@"
