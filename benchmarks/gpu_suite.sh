#!/usr/bin/env bash
# One call on a fresh GPU machine (torch + triton installed, no internet, repo copied without a venv):
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# prints the environment, measures the copy and matmul ceilings, builds the CUDA extension (just in time, via
# llmkernels.cuda_ext), runs the GPU tests (those of the paths new since the last GPU run first), runs the quick
# benchmark sweep, and leaves suite.log, results.json,
# ceilings.json, tests.xml and plots/ in OUTDIR. Every step runs under `timeout`, so a hung step costs its own
# budget only. The whole suite ends within TOTAL seconds (7 min 50 s; the H200 session allows 8 min): the tests
# get what the earlier steps left, minus the sweep's share. Without a GPU it still runs end to end: the GPU
# steps say there is no GPU and the sweep is the small CPU one.
#
# Environment: PYTHON (default python3), LLMKERNELS_GIT_COMMIT (the commit, for copies without .git),
# MAX_JOBS (parallel nvcc jobs for the build, default: all cores).
set -u
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}

# seconds: the whole suite, and the most each step may take
TOTAL=470 T_ENV=20 T_CEIL=45 T_BUILD=150 T_SWEEP=165

exec > >(tee -a "$OUT/suite.log") 2>&1
SUMMARY=()
SUITE_START=$(date +%s)
DEADLINE=$((SUITE_START + TOTAL))
left() { echo $((DEADLINE - $(date +%s))); }

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2 start rc cmd
    shift 2
    cmd=$(echo "$*" | tr -s ' \n' ' ')
    echo
    echo "=== [$name] (limit ${limit} s) ${cmd:0:150}"
    start=$(date +%s)
    timeout -k 5 "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "=== [$name] TIMED OUT after ${limit} s"
    SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - start ))")")
}

skip() {  # skip NAME REASON
    echo
    echo "=== [$1] skipped: $2"
    SUMMARY+=("$(printf '%-10s skipped: %s' "$1" "$2")")
}

echo "llmkernels GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, output $OUT"
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_GPU=1
else
    HAS_GPU=0
    echo "NO GPU: torch sees no CUDA device; the GPU steps are skipped and the sweep is the CPU one."
fi

step env "$T_ENV" bash -c "
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo 'nvidia-smi: not found'; fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo 'nvcc: not found'
    $PY -m benchmarks.run env
    $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"| cuDNN\", torch.backends.cudnn.version())'
    $PY -m pytest --version
    $PY -c 'import pytest_benchmark; print(\"pytest-benchmark\", pytest_benchmark.__version__)' 2>/dev/null || echo 'pytest-benchmark: not installed'
"

step ceilings "$T_CEIL" $PY -m benchmarks.run ceilings --out "$OUT"

if [ $HAS_GPU -eq 1 ]; then
    step build-cuda "$T_BUILD" $PY -m benchmarks.build_cuda
else
    skip build-cuda "no GPU (the build is compile-checked on CPU by tests/test_cuda_backend.py)"
fi

# The tests of the paths new since the last GPU run go first, so that a short session still checks them on
# the GPU: the descriptor (TMA) forward and its warp-specialized candidates, each config of them launched
# directly (tests/test_forward_tma.py), then the rest of the suite.
NEW_PATH_TESTS="tests/test_forward_tma.py"
T_NEW=120
if [ $HAS_GPU -eq 1 ]; then
    step new-paths "$T_NEW" $PY -m pytest $NEW_PATH_TESTS -x -q -p no:cacheprovider --junitxml="$OUT/tests-new.xml"
else
    skip new-paths "no GPU (CI runs $NEW_PATH_TESTS in Triton's interpreter)"
fi

if [ $HAS_GPU -eq 1 ]; then
    # The newest paths first (the fused backward and its deterministic flag, issue 13), so a short budget still
    # covers them; the full run below repeats them.
    step tests-new 60 $PY -m pytest tests/test_backward_fused.py -q -p no:cacheprovider
    # test_static_compile.py compiles every Triton config on the CPU: no GPU involved, and CI runs it already.
    T_TESTS=$(( $(left) - T_SWEEP - 5 ))
    [ $T_TESTS -lt 30 ] && T_TESTS=30
    step tests "$T_TESTS" $PY -m pytest tests/ -x -q -p no:cacheprovider --ignore=tests/test_static_compile.py \
        $(printf -- '--ignore=%s ' $NEW_PATH_TESTS) --junitxml="$OUT/tests.xml"
else
    skip tests "no GPU (CI runs the test suite on CPU: pytest)"
fi

T_SWEEP=$(( $(left) < T_SWEEP ? $(left) : T_SWEEP ))
[ $T_SWEEP -lt 60 ] && T_SWEEP=60
# the sweep stops starting measurements 45 s before its limit, leaving time for the table and the plots
step sweep "$T_SWEEP" $PY -m benchmarks.run --out "$OUT" --time-budget $((T_SWEEP - 45)) --no-static

echo
echo "=== summary ($(( $(date +%s) - SUITE_START )) s in all; GPU: $([ $HAS_GPU -eq 1 ] && echo yes || echo no))"
printf '  %s\n' "${SUMMARY[@]}"
echo "files in $OUT:"
(cd "$OUT" && find . -type f | sort | sed 's/^/  /')
