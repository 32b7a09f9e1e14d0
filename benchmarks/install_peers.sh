#!/usr/bin/env bash
# Installs the peer libraries benchmarked by bench_peers.py (captum, pyDVL, Kronfluence) and
# bench_lds.py (also TRAK and dattri's LDS metric) into
# the benchmark environment, against its pinned torch: every package goes in with --no-deps,
# so pip never resolves (and never replaces) torch; the non-torch dependencies they import are
# listed explicitly below (found from each wheel's Requires-Dist and by trying the imports).
# Not runtime dependencies of fastinfluence.
#
#   FASTINFLUENCE_VENV=/path/to/venv bash benchmarks/install_peers.sh   # default: .venv
#   bash benchmarks/install_peers.sh --download DIR                     # wheels only, see below
#
# --download DIR fetches the wheels of the pinned packages (the peers and what only they need)
# for another machine's Python (PEERS_PYTHON_VERSION, default 3.12; x86-64 Linux) and installs
# nothing: an offline GPU machine that has the common packages installs them from DIR
# (scripts/gpu_check.sh does).
set -euo pipefail

# The peers and what only they need, pinned to the versions of the committed runs (dask and
# distributed must be the same release).
PINNED=(
    captum==0.9.0 pyDVL==0.10.0 kronfluence==1.0.1
    # pyDVL; it imports dask and distributed (its "influence" extra) at import time
    pyDeprecate==0.14.0 more-itertools==11.2.1 cloudpickle==3.1.3 psutil==7.2.2
    dask==2026.8.0 distributed==2026.8.0 click==8.5.1 partd==1.4.2 locket==1.0.0 toolz==1.2.0
    msgpack==1.2.4 sortedcontainers==2.4.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
    lazy-importer==0.1.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    # Kronfluence (torchvision is declared but not imported by the modules used) and accelerate
    accelerate==1.16.0 einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0 safetensors==0.8.0
    huggingface_hub==2.4.0
    # bench_lds.py: TRAK (its CPU projector) and dattri (its LDS metric, the test's oracle)
    traker==0.3.2 dattri==0.3.0
)
# Common packages they also import: kept at the environment's versions, installed if missing.
# With --no-deps nothing comes in by itself, so this is the whole closure of what the peers
# import, checked by installing into a fresh venv that holds only torch: matplotlib's own
# dependencies (captum.influence imports matplotlib), pandas' and scikit-learn's (pyDVL).
# Declared by a peer but not imported by the modules bench_peers.py uses, so left out:
# torchvision (Kronfluence), cvxpy (pyDVL), hf-xet and httpx2 (huggingface_hub), pretty_midi
# (dattri's music data sets).
COMMON=(
    matplotlib numpy packaging tqdm pandas scikit-learn scipy joblib typing-extensions jinja2
    markupsafe urllib3 zipp importlib-metadata pyyaml filelock fsspec
    # matplotlib
    pillow python-dateutil six tzdata pyparsing cycler kiwisolver fonttools contourpy
    # scikit-learn
    threadpoolctl narwhals
)

if [[ "${1:-}" == "--download" ]]; then
    [[ $# -eq 2 ]] || { echo "usage: install_peers.sh --download DIR" >&2; exit 2; }
    python3 -m pip download --no-deps --only-binary=:all: --implementation cp \
        --python-version "${PEERS_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$2" "${PINNED[@]}"
    exit 0
fi

VENV="${FASTINFLUENCE_VENV:-.venv}"
PYTHON="$VENV/bin/python"
if [[ ! -x "$PYTHON" ]]; then
    echo "install_peers.sh: no python at $PYTHON (set FASTINFLUENCE_VENV)" >&2
    exit 1
fi

torch_version() { "$PYTHON" -c "import torch; print(torch.__version__)"; }
TORCH_BEFORE="$(torch_version)"
echo "torch before: $TORCH_BEFORE"

"$PYTHON" -m pip install --no-deps "${PINNED[@]}" "${COMMON[@]}"

TORCH_AFTER="$(torch_version)"
echo "torch after: $TORCH_AFTER"
if [[ "$TORCH_AFTER" != "$TORCH_BEFORE" ]]; then
    echo "install_peers.sh: torch changed from $TORCH_BEFORE to $TORCH_AFTER" >&2
    exit 1
fi
if [[ "$TORCH_AFTER" != "${FASTINFLUENCE_TORCH:-2.13.0+cpu}" ]]; then
    echo "install_peers.sh: torch is $TORCH_AFTER, expected ${FASTINFLUENCE_TORCH:-2.13.0+cpu}" >&2
    exit 1
fi

"$PYTHON" - <<'PY'
import importlib

failed = []
# Every peer module bench_peers.py and bench_lds.py import.
for module in ("captum.influence", "captum.influence._core.arnoldi_influence_function",
               "pydvl.influence", "pydvl.influence.torch", "kronfluence.analyzer",
               "kronfluence.arguments", "kronfluence.task", "trak", "dattri.metric"):
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as error:  # report every failing import, then fail
        failed.append(module)
        print(f"import {module}: FAILED: {type(error).__name__}: {error}")
if failed:
    raise SystemExit(f"install_peers.sh: imports failed: {failed}")
PY
