#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): a complete verdict inside one call.
#     bash bench/gpu_check.sh            on the H200 (OUT: where the logs, CSV and summary go)
#     bash bench/gpu_check.sh --dry-run  the same logic on a CPU, small (CI runs it)
#
# Steps and their budgets, set on paper for the H200 (16 cores; no package registry there, so
# nothing is installed) and enforced with `timeout`; 480 s in all, inside a 10-minute call:
#   env            10 s  versions, gcc, nvcc, the GPU
#   build          90 s  MAX_JOBS=16: route_cuda.cu (nvcc, sm_90) beside the CPU and emulated
#                        C++ TUs, in parallel; fails loudly if no CUDA kernels were built
#   smoke          40 s  bench/gpu_smoke.py --size tiny: every GPU backend x fp32/fp16/bf16 x
#                        K 1-3 vs float64, NaN-poisoned outputs, NaN routing; it also compiles
#                        the Triton kernels (~45 specialisations) into the on-disk cache
#   smoke-memcheck 40 s  the same under compute-sanitizer memcheck (cache warm; skipped where
#                        the sanitizer cannot attach, as under gVisor)
#   smoke-large    30 s  the same on Chameleon-sized rows (the aligned specialisations)
#   tests          90 s  the backend, op and decode tests on the GPU (the decode step captured
#                        in a CUDA graph included), 8 workers, 60 s per test
#   bench         100 s  bf16, Chameleon-7B's q/k/v/o (N 16k, D 4096), K 2: the paper's R 256
#                        without torch.compile (its rows are sure to come), then R 16 with every
#                        provider; each case's CSV rows written as it finishes, each time beside
#                        its roofline; as a user runs it (autotuning on, outputs not poisoned).
#                        Over budget it is "partial": the rows measured so far stand
#   model          80 s  moss bench --model on the GPU (bf16): a training step and greedy decode
#                        per token inside an image, frozen / PEFT LoRA / MOSS on triton and
#                        cuda; its CSV only (the plot stays behind: 8 files at most)
# Correctness steps run with MOSS_KERNELS_POISON=1 (outputs start as NaN) and one Triton config
# (MOSS_TRITON_AUTOTUNE=0: they check, not tune). Each step's summary line is appended to
# summary.txt as it ends, so a call cut short keeps the lines so far; the summary is printed
# last. Files under OUT: env.txt build.log smoke.log tests.log bench.log moss_bench_<device>.csv
# moss_bench_model_<device>.csv summary.txt (8, the tool's limit).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
# The checkout itself is the package (built in place, not installed): scripts find it here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MOSS_KERNELS_POISON=1 MOSS_TRITON_AUTOTUNE=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
FAILED=0

line() {  # line NAME STATUS SECONDS HEADLINE: one summary line, kept in summary.txt at once
  printf '%-15s %-34s %4s s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt" > /dev/null
}

# step NAME BUDGET LOG HEADLINE SOFT -- COMMAND...: run COMMAND under `timeout BUDGET` (killed 10 s
# after that if it ignores the signal), appending to LOG; record its status, time and the
# headline command's last line. SOFT=soft: over budget is "partial", not a failure.
step() {
  local name=$1 budget=$2 log=$3 headline=$4 soft=$5 start status
  shift 6
  echo "== $name (budget ${budget} s)"
  start=$(date +%s)
  timeout -k 10 "$budget" "$@" >> "$OUT/$log" 2>&1
  case $? in
    0) status=pass ;;
    124|137) if [ "$soft" = soft ]; then status="partial (over its ${budget} s)"
             else status="FAIL (over its ${budget} s budget)"; FAILED=1; fi ;;
    *) status=FAIL; FAILED=1 ;;
  esac
  tail -n 4 "$OUT/$log"
  line "$name" "$status" "$(( $(date +%s) - start ))" "$(eval "$headline" 2>/dev/null | tail -n 1)"
}

{ $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
  gcc --version | head -n 1; nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null \
    || echo "nvidia-smi: not found"
  command -v compute-sanitizer || echo "compute-sanitizer: not found"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
line env pass - "$(head -n 1 "$OUT/env.txt")"

BUILT="$PY -c \"from moss_kernels import _ext; i = _ext.build_info() or {}; \
print('extension:', _ext.load_error() or 'loaded', '| cuda kernels:', i.get('cuda', 'none'))\""
if [ $DRY = 1 ]; then
  step build 60 build.log "$BUILT" hard -- $PY -c "from moss_kernels import _ext; \
assert _ext.loaded(), _ext.load_error(); print('dry run: the installed extension, not rebuilt')"
else
  step build 90 build.log "$BUILT" hard -- bash -c "MAX_JOBS=16 $PY setup.py build_ext --inplace \
&& $PY -c \"from moss_kernels import _ext; assert _ext.loaded(), _ext.load_error(); \
assert _ext.build_info().get('cuda', 'no') != 'no', 'the extension was built WITHOUT CUDA \
kernels: the cuda backend cannot be checked'\""
fi

SMOKE="grep '^smoke' $OUT/smoke.log"
DEVICE=$([ $DRY = 1 ] && echo cpu || echo cuda)
step smoke $([ $DRY = 1 ] && echo 120 || echo 40) smoke.log "$SMOKE" hard -- \
  $PY bench/gpu_smoke.py --size tiny --device $DEVICE
# The sanitizer must be able to attach to a CUDA context here (under gVisor it cannot).
PROBE="import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
if [ $DRY = 0 ] && compute-sanitizer --tool memcheck --error-exitcode 1 $PY -c "$PROBE" \
    > /dev/null 2>&1; then
  # Without the caching allocator every tensor is its own allocation, so an access past one is
  # outside any allocation and memcheck sees it.
  step smoke-memcheck 40 smoke.log "$SMOKE" hard -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    $PY bench/gpu_smoke.py --size tiny
else
  line smoke-memcheck skipped - "$([ $DRY = 1 ] && echo 'dry run' || \
    echo 'compute-sanitizer cannot attach to a CUDA context here')"
fi
if [ $DRY = 0 ]; then
  step smoke-large 30 smoke.log "$SMOKE" hard -- $PY bench/gpu_smoke.py --size large
else
  line smoke-large skipped - "dry run (Chameleon-sized rows take minutes on a CPU)"
fi

TESTS="grep -E '(passed|failed|error)' $OUT/tests.log"
if [ $DRY = 1 ]; then
  step tests 240 tests.log "$TESTS" hard -- $PY -m pytest -q -n 2 --timeout 120 \
    -p no:cacheprovider tests/test_ops.py -k "opcheck_forward and reference"
else
  step tests 90 tests.log "$TESTS" hard -- $PY -m pytest -q -n 8 --timeout 60 \
    -p no:cacheprovider tests/test_backends.py tests/test_ops.py tests/test_decode.py
fi

HEADLINE="$PY bench/gpu_summary.py $OUT/moss_bench_*.csv | head -n 1"
AS_USERS_RUN="env -u MOSS_KERNELS_POISON MOSS_TRITON_AUTOTUNE=1"
if [ $DRY = 1 ]; then
  step bench 240 bench.log "$HEADLINE" soft -- $AS_USERS_RUN $PY -m moss bench --case cpu-quick \
    --tokens 256 --d-in 64 --d-out 48 --rank 4 --grid 4 4 --reps 1 --warmup 0 --sweep \
    --no-compile --modes forward forward+backward --roofline --out "$OUT"
else
  step bench 100 bench.log "$HEADLINE" soft -- $AS_USERS_RUN bash -c "$PY -m moss bench \
--case chameleon-7b-qkvo --rank 256 --sweep --no-compile --modes forward forward+backward \
--reps 10 --out '$OUT' && $PY -m moss bench --case chameleon-7b-qkvo --sweep \
--modes forward forward+backward --reps 10 --out '$OUT'"
fi

MODEL="grep -E 'decode|train' $OUT/bench.log | tail -n 1"
MODEL_OUT=$(mktemp -d)  # the plot stays here; only the CSV goes to OUT
if [ $DRY = 1 ]; then
  step model 240 bench.log "$MODEL" soft -- $AS_USERS_RUN bash -c "$PY -m moss bench --model \
--quick --reps 1 --warmup 0 --out '$MODEL_OUT' && cp '$MODEL_OUT'/*.csv '$OUT'/"
else
  step model 80 bench.log "$MODEL" soft -- $AS_USERS_RUN bash -c "$PY -m moss bench --model \
--device cuda --dtype bfloat16 --reps 5 --backends triton cuda --out '$MODEL_OUT'; \
cp '$MODEL_OUT'/*.csv '$OUT'/"
fi

{ echo
  echo "bench, per case and mode (time / F.linear, / roofline, vs compile:eager):"
  $PY bench/gpu_summary.py "$OUT"/moss_bench_*.csv 2>/dev/null || echo "  (no bench rows)"
  echo "verdict: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'FAILED (see above)')"
} >> "$OUT/summary.txt"
echo
echo "== summary ($([ $DRY = 1 ] && echo 'dry run on the CPU' || echo 'GPU check'), $(date -u +%F))"
cat "$OUT/summary.txt"
exit $FAILED
