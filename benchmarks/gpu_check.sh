#!/usr/bin/env bash
# One-shot validation of the kernels on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; logs go to $OUT/ if OUT is set
#
# Needs python3 with torch, triton, transformers, pytest, hypothesis and gguf (the engine's GGUF
# reader; on a machine without it, install its wheel first); nothing is installed and nothing is
# downloaded. Steps run in separate processes with their own time limits (and a global
# deadline keeping the whole run under 9 minutes), so a crash or a hang in one kernel cannot stop
# the others from being tested and measured. The summary table is printed last; the exit status is
# non-zero if any step failed.
set -u

cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOG_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
DEADLINE=$(($(date +%s) + 540))

declare -a NAMES=()
declare -A STATUS=()
FAILED=0

# step NAME LIMIT_SECONDS COMMAND...: run with a timeout, tee the log, record the exit status.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    NAMES+=("$name")
    if ((limit < 10)); then
        echo "=== $name: skipped, global deadline reached" | tee "$LOG_DIR/$name.log"
        STATUS[$name]="not run"
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - start))
    if ((rc == 0)); then
        STATUS[$name]="ok (${took}s)"
    elif ((rc == 124 || rc == 137)); then
        STATUS[$name]="TIMEOUT (${took}s)"
        FAILED=1
    else
        STATUS[$name]="FAIL rc=$rc (${took}s)"
        FAILED=1
    fi
}

pytest_counts() {
    grep -Eo '[0-9]+ (passed|failed|errors?|skipped)' "$LOG_DIR/$1.log" 2>/dev/null | tail -4 |
        paste -sd ' ' -
}

target() {
    grep -ho "TARGET $1 [a-z_]*=[-0-9.]*" "$LOG_DIR"/bench_*.log 2>/dev/null | tail -1 |
        sed 's/.*=//'
}

step versions 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
\"triton\", triton.__version__, torch.cuda.get_device_name(0))'"

export TOKENMILL_TEST_DEVICE=cuda
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning)
# Most of the kernel tests' time on a GPU is Triton compiling specialisations: spread it over
# CPU cores with pytest-xdist when it is installed (each worker is also its own CUDA context, so
# a kernel fault poisons only that worker's remaining tests).
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step test_kernels 150 "${PYTEST[@]}" "${XDIST[@]}" tests/kernels
step test_parity 90 "${PYTEST[@]}" tests/test_model_parity.py
# The whole engine on CUDA (scheduler, runner, sampler, Triton kernels): greedy parity with
# transformers under staggered arrivals, chunked prefill, preemption and prefix hits.
step test_engine 120 "${PYTEST[@]}" tests/test_engine.py
unset TOKENMILL_TEST_DEVICE

step bench_decode 60 "$PY" benchmarks/bench_kernels.py --only decode
step bench_prefill 50 "$PY" benchmarks/bench_kernels.py --only prefill
step bench_pointwise 40 "$PY" benchmarks/bench_kernels.py --only pointwise
step bench_engine 150 "$PY" benchmarks/bench_gpu_engine.py

{
    echo
    echo "==================== gpu_check summary ===================="
    for name in "${NAMES[@]}"; do
        counts=""
        [[ $name == test_* ]] && counts=$(pytest_counts "$name")
        printf '%-18s %-22s %s\n' "$name" "${STATUS[$name]}" "$counts"
    done
    printf '%-18s %s\n' "decode b64 ctx4k" "$(target decode_llama3-8b_b64_ctx4096)% of copy bandwidth (goal >= 70)"
    printf '%-18s %s\n' "prefill 4k" "$(target prefill_llama3-8b_4096)% of flash SDPA throughput (goal >= 70)"
    grep -h '^|' "$LOG_DIR/bench_engine.log" 2>/dev/null
    echo "logs: $LOG_DIR"
    [[ $FAILED == 0 ]] && echo "RESULT: all steps passed" || echo "RESULT: some steps FAILED"
} | tee "$LOG_DIR/summary.txt"
exit $FAILED
