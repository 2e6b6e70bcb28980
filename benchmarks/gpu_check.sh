#!/usr/bin/env bash
# The one call on a lent GPU: versions; install vlfast (and peer wheels from .whl/); the GPU-marked
# tests; the full benchmark with peers. Logs and JSON go to $OUT. Run from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh
# Each section has its own timeout and a failure does not stop the next; the whole script ends
# within TOTAL_S seconds (default 350, under the 6 minutes a device check is sized for).
set -uo pipefail

OUT=${OUT:-$PWD/bench-out}
TOTAL_S=${TOTAL_S:-350}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait $TEE_PID' EXIT  # the log is complete before the machine hands $OUT back
DEADLINE=$((SECONDS + TOTAL_S))
FAILED=()

# run NAME SECONDS CMD...: one section under `timeout`, never past the deadline; keeps going on failure.
run() {
    local name=$1 want=$2 left rc
    shift 2
    left=$((DEADLINE - SECONDS - 5))
    ((want > left)) && want=$left
    if ((want < 10)); then
        echo "=== $name: skipped, the ${TOTAL_S}s budget is spent"
        FAILED+=("$name(no time)")
        return
    fi
    echo "=== $name (limit ${want}s, $(date -u +%H:%M:%S) UTC)"
    timeout --kill-after=10 "$want" "$@"
    rc=$?
    ((rc == 124)) && echo "=== $name: timed out after ${want}s"
    echo "=== $name: exit $rc"
    ((rc == 0)) || FAILED+=("$name($rc)")
}

run versions 30 bash -c 'nvidia-smi; python3 --version; command -v nvcc >/dev/null && nvcc --version | tail -n 2
python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)"'

# Peers that the GPU image lacks travel as wheels in .whl/ (see the device README).
if compgen -G ".whl/*.whl" >/dev/null; then
    run peer-wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "=== peer-wheels: no .whl/ folder; inf-cl, liger and cut-cross-entropy rows are skipped unless installed"
fi

# No network there: no build isolation, no dependency resolution. Builds vlfast._C where nvcc is.
run install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
if ! python3 -c "import vlfast" 2>/dev/null; then
    echo "=== install: vlfast does not import after pip; using the source tree on PYTHONPATH"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

run info 60 bash -c "python3 -m vlfast info && python3 -m vlfast info --json >'$OUT/info.json'"

# pytest exits 5 when nothing is marked gpu yet: that is not a failure of this script.
run gpu-tests 120 bash -c "python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee '$OUT/pytest_gpu.log';
    rc=\${PIPESTATUS[0]}; ((rc == 5)) && echo 'no GPU-marked tests collected' && rc=0; exit \$rc"

# Rows are written to the JSON as they are measured, so a timeout still leaves the finished ones.
# VLFAST_AUTOTUNE=1: the Triton kernels try their config lists (the tests use the first config only).
run bench 600 bash -c "set -o pipefail; VLFAST_AUTOTUNE=\${VLFAST_AUTOTUNE:-1} python3 -m vlfast bench clip_loss --json '$OUT/bench_clip_loss.json' \
    --plot '$OUT/bench.png' 2>&1 | tee '$OUT/bench.log'"

echo "=== done in ${SECONDS}s; files in $OUT:"
ls -l "$OUT"
if ((${#FAILED[@]})); then
    echo "=== failed sections: ${FAILED[*]}"
    exit 1
fi
echo "=== all sections passed"
