#!/usr/bin/env bash
# The one call on a lent GPU: versions; install vlfast, building its CUDA extension vlfast._C (and
# peer wheels from .whl/); the GPU-marked tests; compute-sanitizer over the CUDA kernels; the full
# benchmark with peers. Logs and JSON go to $OUT. Run from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh
# Each section has its own timeout and a failure does not stop the next; the whole script ends
# within TOTAL_S seconds (default 480).
# SECTIONS picks sections (default all: versions peer-wheels install info gpu-tests memcheck
# racecheck bench), so a session can spread the work over calls, e.g.
#     SECTIONS="versions install gpu-tests memcheck racecheck"   then   SECTIONS="install bench"
# One more section runs only when SECTIONS names it: tune (the bench with VLFAST_AUTOTUNE=1, below).
# GPU_TESTS narrows the tests (pytest paths or -k expressions), BENCH_OPS / BENCH_SIZE the bench.
set -uo pipefail

OUT=${OUT:-$PWD/bench-out}
TOTAL_S=${TOTAL_S:-480}
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
    if [[ -n "${SECTIONS:-}" && " $SECTIONS " != *" $name "* ]]; then
        return
    fi
    left=$((DEADLINE - SECONDS - 5))
    ((want > left)) && want=$left
    if ((want < 10)); then
        echo "=== $name: skipped, the ${TOTAL_S}s budget is spent"
        FAILED+=("$name(no time)")
        return
    fi
    echo "=== $name (limit ${want}s, $(date -u +%H:%M:%S) UTC)"
    SECTION_LIMIT_S=$want timeout --kill-after=10 "$want" "$@"  # a section may pace itself by SECTION_LIMIT_S
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

# No network there: no build isolation, no dependency resolution. VLFAST_BUILD_CUDA=1: a broken
# CUDA build is a failure here (the compiler's output ends this log); vlfast is then installed
# without it, so that the Triton tests and rows still run. ($OUT keeps at most 8 files: the long
# logs stay in /tmp and their ends come here.)
run install 240 bash -c "VLFAST_BUILD_CUDA=1 MAX_JOBS=\${MAX_JOBS:-16} python3 -m pip install -v --no-deps \
    --no-build-isolation -e . >/tmp/vlfast-install.log 2>&1; rc=\$?; grep -E '^ *vlfast:' /tmp/vlfast-install.log
    if ((rc)); then tail -n 80 /tmp/vlfast-install.log; echo 'installing without vlfast._C';
        VLFAST_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e .; fi; exit \$rc"
if ! python3 -c "import vlfast" 2>/dev/null; then
    echo "=== install: vlfast does not import after pip; using the source tree on PYTHONPATH"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

run info 60 bash -c "python3 -m vlfast info && python3 -m vlfast info --json >'$OUT/info.json'"

# pytest exits 5 when nothing is marked gpu yet: that is not a failure of this script. With pytest-xdist
# (in the lent machines' image) the tests run in GPU_TEST_WORKERS processes (default 8; the 364 GPU tests
# took 85 s so on an H100, 2026-12-05): the Triton compiles are CPU-bound, and a test that breaks the CUDA
# context takes only its worker down.
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-8}")
run gpu-tests 180 bash -c "python3 -m pytest -m gpu -q -p no:cacheprovider ${XDIST} \${GPU_TESTS:-} 2>&1 | tee '$OUT/pytest_gpu.log';
    rc=\${PIPESTATUS[0]}; ((rc == 5)) && echo 'no GPU-marked tests collected' && rc=0; exit \$rc"

# compute-sanitizer over every CUDA kernel variant on small shapes (benchmarks/cuda_smoke.py). With
# PyTorch's caching allocator off, each tensor is its own allocation, so memcheck sees overruns.
# Some machines' runtimes do not support the sanitizer: that is reported, not counted as a failure.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
sanitize() {  # sanitize TOOL ARGS...: the smoke script under one compute-sanitizer tool
    local tool=$1 log=/tmp/vlfast-$1.log
    shift
    [[ -n $SANITIZER ]] || { echo "compute-sanitizer not found: $tool NOT RUN"; return 0; }
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 3 "$@" \
        python3 benchmarks/cuda_smoke.py ${SMOKE_ARGS:-} >"$log" 2>&1
    local rc=$?
    grep -E "^========= (ERROR|.*SUMMARY)|^(ok|BAD) |non-finite" "$log" | tail -n 60
    tail -n 5 "$log"
    if grep -qiE "device not supported|not supported on this (platform|device)" "$log"; then
        echo "compute-sanitizer does not support this machine: $tool NOT RUN"
        return 0
    fi
    return $rc
}
export -f sanitize
export SANITIZER
run memcheck 120 bash -c "sanitize memcheck"
run racecheck 120 bash -c "SMOKE_ARGS=--tiny sanitize racecheck"

# Rows are written to the JSON as they are measured, so a timeout still leaves the finished ones.
# The bench measures what users get: default configs (VLFAST_AUTOTUNE=0 unless the caller sets it;
# with 1, attention alone times ~5-7 candidates per pass and shape class, a compile each: the `tune`
# section below). BENCH_OPS (default: every op) and BENCH_SIZE (--quick for a shorter run) fit the
# bench to the budget.
run bench 600 bash -c "set -o pipefail; VLFAST_AUTOTUNE=\${VLFAST_AUTOTUNE:-0} python3 -m vlfast bench \${BENCH_OPS:-} \
    \${BENCH_SIZE:-} --json '$OUT/bench.json' --plot '$OUT/bench.png' 2>&1 | tee '$OUT/bench.log'"

# Opt-in (only when SECTIONS names it; not part of the default run): the bench with VLFAST_AUTOTUNE=1
# (vlfast/_launch_configs.py): every Triton kernel times its candidate configs on the first call of
# each key, and each row's "config" records the winner and every candidate's ms. Evidence for
# changing a kernel's default in the code; there is no table to fill. TUNE_OPS (default: attention
# clip_loss codebook_lookup similarity_topk) and BENCH_SIZE fit it to the budget; how much fits one call is not yet measured.
if [[ " ${SECTIONS:-} " == *" tune "* ]]; then
    run tune 540 bash -c "set -o pipefail; VLFAST_AUTOTUNE=1 python3 -m vlfast bench \${TUNE_OPS:-attention clip_loss codebook_lookup similarity_topk} \
        \${BENCH_SIZE:-} --json '$OUT/bench-autotune.json' 2>&1 | tee '$OUT/bench-autotune.log'"
fi

echo "=== done in ${SECONDS}s; files in $OUT:"
ls -l "$OUT"
if ((${#FAILED[@]})); then
    echo "=== failed sections: ${FAILED[*]}"
    exit 1
fi
echo "=== all sections passed"
