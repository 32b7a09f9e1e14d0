#!/usr/bin/env bash
# Installs the peer libraries benchmarked by bench_peers.py (captum, pyDVL, Kronfluence) into
# the benchmark environment, against its pinned torch: every package goes in with --no-deps,
# so pip never resolves (and never replaces) torch; the non-torch dependencies they import are
# listed explicitly below (found from each wheel's Requires-Dist and by trying the imports).
# Not runtime dependencies of fastinfluence.
#
#   FASTINFLUENCE_VENV=/path/to/venv bash benchmarks/install_peers.sh   # default: .venv
set -euo pipefail

VENV="${FASTINFLUENCE_VENV:-.venv}"
PYTHON="$VENV/bin/python"
if [[ ! -x "$PYTHON" ]]; then
    echo "install_peers.sh: no python at $PYTHON (set FASTINFLUENCE_VENV)" >&2
    exit 1
fi

torch_version() { "$PYTHON" -c "import torch; print(torch.__version__)"; }
TORCH_BEFORE="$(torch_version)"
echo "torch before: $TORCH_BEFORE"

PEERS=(captum pyDVL kronfluence)
# Requires-Dist of the peers (and of theirs) minus torch/torchvision, restricted to what the
# imports of the benchmarked modules need: captum.influence, pydvl.influence.torch, kronfluence.
DEPENDENCIES=(
    # captum: matplotlib numpy packaging tqdm (usually present already)
    matplotlib numpy packaging tqdm
    # pyDVL: its numpy<2 pin is metadata only; the torch influence modules run on numpy 2
    pyDeprecate more-itertools pandas scikit-learn scipy joblib cloudpickle psutil
    typing-extensions
    # pydvl.influence imports dask and distributed (its "influence" extra) at import time
    dask distributed click partd locket toolz jinja2 markupsafe msgpack sortedcontainers tblib
    tornado urllib3 zict importlib-metadata lazy-importer zipp zarr numcodecs donfig google-crc32c
    # kronfluence (torchvision is declared but not imported by the modules used)
    accelerate einops einconv opt-einsum safetensors
    # accelerate
    pyyaml huggingface_hub filelock fsspec
)

"$PYTHON" -m pip install --no-deps "${PEERS[@]}" "${DEPENDENCIES[@]}"

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
for module in ("captum.influence", "pydvl.influence.torch", "kronfluence"):
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as error:  # report every failing import, then fail
        failed.append(module)
        print(f"import {module}: FAILED: {type(error).__name__}: {error}")
if failed:
    raise SystemExit(f"install_peers.sh: imports failed: {failed}")
PY
