#!/usr/bin/env bash
# The GPU checks and benchmarks in one script, for a machine with a CUDA GPU, nvcc and a
# Python whose torch is built with CUDA (it uses that Python as it is: no virtual env).
#
#   bash scripts/gpu_check.sh [STEP...]      # default: build tests ops influence peers scale
#   bash scripts/gpu_check.sh build scale    # the 50k-image ResNet-18 alone (~10 min budget)
#
# Steps (each with its own time limit, STEP_TIMEOUT seconds, default 420; a failed step does
# not stop the next; the exit status is 1 when any failed):
#   build      fastinfluence._C in place with the CUDA kernels (TORCH_CUDA_ARCH_LIST, default
#              9.0), against this machine's torch; every later step imports it or fails
#              (FASTINFLUENCE_REQUIRE_NATIVE=1)
#   tests      pytest tests/ops (the CUDA kernels against the CPU kernels and the twins) and
#              tests/test_cuda.py (the engine on CUDA against the CPU)
#   ops        benchmarks/bench_ops.py --device cuda (float32 and float64)
#   influence  benchmarks/bench_influence.py --device cuda, the CPU settings of docs/benchmarks.md
#   peers      benchmarks/bench_peers.py --device cuda on the peers tasks of docs/benchmarks.md; the peers'
#              wheels are installed from .whl/ first when it exists (on a machine that
#              cannot reach PyPI: `bash benchmarks/install_peers.sh --download .whl` beforehand)
#   scale      benchmarks/bench_scale.py --device cuda on CIFAR-size data: ResNet-18 (width 64,
#              11.2M parameters, 3x32x32 inputs, 10 classes) trained briefly on synthetic
#              images, then every Linear/Conv2d parameter's scores of 50,000 training images
#              through the gradient store and exact Gauss-Newton CG, each timed (goals: store
#              <= 60 s, exact <= 10 min); its own limit SCALE_TIMEOUT (default 900 s), each
#              run capped at SCALE_CAP (default 660 s)
# Results and one log go to RESULTS (default $OUT when set, else gpu_results/): gpu_check.log,
# pytest.xml, ops_cuda.md, influence_cuda.json, peers_cuda.json, peers_cuda.png and
# scale_cuda.json (with its plot scale_cuda.png).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-${OUT:-gpu_results}}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
PYTHON="${PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-420}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASTINFLUENCE_REQUIRE_NATIVE=1
STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(build tests ops influence peers scale)

build() {
    FASTINFLUENCE_CUDA="${FASTINFLUENCE_CUDA:-1}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py -q build_ext --inplace \
        && "$PYTHON" -m fastinfluence info
}

tests() {
    "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/pytest.xml" \
        tests/ops tests/test_cuda.py || return 1
    # On this machine a skipped CUDA test is a failure: it means the GPU or its kernels are missing.
    "$PYTHON" - "$RESULTS/pytest.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

skipped = [f"{case.get('classname')}::{case.get('name')}"
           for case in ET.parse(sys.argv[1]).iter("testcase")
           if case.find("skipped") is not None and "cuda" in case.get("classname", "")]
if skipped:
    sys.exit(f"{len(skipped)} CUDA tests skipped, e.g. {skipped[0]}")
print("no CUDA test skipped")
PY
}

ops() {
    for dtype in float32 float64; do
        "$PYTHON" benchmarks/bench_ops.py --device cuda --dtype "$dtype" || return 1
    done > "$RESULTS/ops_cuda.md"
    cat "$RESULTS/ops_cuda.md"
}

influence() {
    "$PYTHON" benchmarks/bench_influence.py --device cuda --sizes 64 128 --params last all \
        --repeats 5 --baseline-repeats 5 --cg-max-iter 3 --out "$RESULTS/influence_cuda.json"
}

peers() {
    if [[ -d .whl ]]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers-site \
            .whl/*.whl || return 1
        export PYTHONPATH="$PYTHONPATH:/tmp/peers-site"
    fi
    "$PYTHON" benchmarks/bench_peers.py --device cuda --sizes 64 128 --n-train 512 --n-val 64 \
        --tasks cnn64-last cnn128-last resnet64-last resnet64-all cnn64-all cnn128-all \
        --fi-all cg5 cg10 kfac ekfac --method-cap "${PEERS_METHOD_CAP:-60}" \
        --naive-max-params 4000 --out "$RESULTS/peers_cuda.json" --plot "$RESULTS/peers_cuda.png"
}

scale() {
    "$PYTHON" benchmarks/bench_scale.py --device cuda --models resnet18-cifar --sizes 50000 \
        --methods store cg --batch-size 512 --cap "${SCALE_CAP:-660}" \
        --out "$RESULTS/scale_cuda.json" --cache "$RESULTS/scale_cache"
}

{
    echo "gpu_check: $(date -u +%FT%TZ), steps: ${STEPS[*]}, commit $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi -L 2>&1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

# A step runs in a subshell under `timeout`, so a hung step cannot eat the others' time.
export -f build tests ops influence peers scale
export PYTHON RESULTS
failed=()
for step in "${STEPS[@]}"; do
    case "$step" in
        build|tests|ops|influence|peers|scale) ;;
        *) echo "gpu_check: unknown step $step (build tests ops influence peers scale)" >&2
           exit 2 ;;
    esac
    start=$SECONDS
    echo "=== $step" | tee -a "$LOG"
    limit=$STEP_TIMEOUT
    [[ $step != scale ]] || limit=${SCALE_TIMEOUT:-900}
    timeout --kill-after=10 "$limit" bash -c "$step" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    echo "=== $step: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
    [[ $status -eq 0 ]] || failed+=("$step")
done
echo "gpu_check: failed steps: ${failed[*]:-none}" | tee -a "$LOG"
[[ ${#failed[@]} -eq 0 ]]
