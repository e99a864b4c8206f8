#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): a complete verdict inside one call.
#     bash bench/gpu_check.sh            on the H200 (OUT: where the logs, CSV and summary go)
#     bash bench/gpu_check.sh --dry-run  the same logic on a CPU, small (CI runs it)
#
# Steps and their budgets, set on paper for the H200 (16 cores; no package registry there, so
# nothing is installed) and enforced with `timeout`; 370 s in all, inside a 10-minute call:
#   env            10 s  versions, gcc, nvcc, the GPU
#   build          90 s  MAX_JOBS=16: route_cuda.cu (nvcc, sm_90) beside the CPU and emulated
#                        C++ TUs, in parallel; fails loudly if no CUDA kernels were built
#   smoke-memcheck 50 s  bench/gpu_smoke.py --size tiny under compute-sanitizer memcheck: every
#                        GPU backend x fp32/fp16/bf16 x K 1-3 vs float64, NaN-poisoned outputs
#   smoke          20 s  the same, Chameleon-sized rows, plainly
#   tests          90 s  the backend and op tests on the GPU, 8 workers, 60 s per test, one
#                        Triton config (MOSS_TRITON_AUTOTUNE=0: the tests check, not tune)
#   bench         110 s  bf16, Chameleon-7B's q/k/v/o (N 16k, D 4096), K 2: the paper's R 256
#                        without torch.compile (no compile time: its rows are sure to come), then
#                        R 16 with every provider; each case's CSV rows written as it finishes,
#                        each time beside its roofline
# The summary (one line per step: pass / FAIL / skipped, seconds, headline) is printed last and
# kept in summary.txt. Files under OUT: env.txt build.log smoke.log tests.log bench.log
# moss_bench_<device>.csv summary.txt (7, within the tool's 8).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOSS_KERNELS_POISON=1 MOSS_TRITON_AUTOTUNE=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
SUMMARY=()
FAILED=0

# step NAME BUDGET LOG HEADLINE-COMMAND -- COMMAND...: run COMMAND under `timeout BUDGET`,
# appending to LOG; record its status, time and the headline command's output.
step() {
  local name=$1 budget=$2 log=$3 headline=$4 start status
  shift 5
  echo "== $name (budget ${budget} s)"
  start=$(date +%s)
  timeout "$budget" "$@" >> "$OUT/$log" 2>&1
  case $? in
    0) status=pass ;;
    124) status="FAIL (over its ${budget} s budget)"; FAILED=1 ;;
    *) status=FAIL; FAILED=1 ;;
  esac
  tail -n 4 "$OUT/$log"
  SUMMARY+=("$(printf '%-15s %-28s %4s s  %s' "$name" "$status" "$(( $(date +%s) - start ))" \
    "$(eval "$headline" 2>/dev/null | tail -n 1)")")
}

skip() {  # skip NAME WHY
  echo "== $1: skipped ($2)"
  SUMMARY+=("$(printf '%-15s %-28s %4s    %s' "$1" "skipped" "-" "$2")")
}

{ $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
  gcc --version | head -n 1; nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null \
    || echo "nvidia-smi: not found"
  command -v compute-sanitizer || echo "compute-sanitizer: not found"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
SUMMARY+=("$(printf '%-15s %-28s %4s    %s' env pass - "$(head -n 1 "$OUT/env.txt")")")

CUDA_BUILT="$PY -c \"from moss_kernels import _ext; i = _ext.build_info() or {}; \
print('extension:', _ext.load_error() or 'loaded', '| cuda kernels:', i.get('cuda', 'none'))\""
if [ $DRY = 1 ]; then
  step build 60 build.log "$CUDA_BUILT" -- $PY -c "from moss_kernels import _ext; \
assert _ext.loaded(), _ext.load_error(); print('dry run: the installed extension, not rebuilt')"
else
  step build 90 build.log "$CUDA_BUILT" -- env MAX_JOBS=16 $PY setup.py build_ext --inplace
  if ! $PY -c "from moss_kernels import _ext; import sys; \
sys.exit(0 if _ext.loaded() and _ext.build_info().get('cuda', 'no') != 'no' else 1)"; then
    echo "!! the extension was built without CUDA kernels (or does not load): the cuda backend \
cannot be checked; see $OUT/build.log" | tee -a "$OUT/build.log"
    FAILED=1
  fi
fi

SMOKE="grep '^smoke' $OUT/smoke.log"
if [ $DRY = 1 ]; then
  step smoke-memcheck 120 smoke.log "$SMOKE" -- $PY bench/gpu_smoke.py --size tiny --device cpu
  step smoke 120 smoke.log "$SMOKE" -- $PY bench/gpu_smoke.py --size tiny --device cpu
elif command -v compute-sanitizer > /dev/null; then
  step smoke-memcheck 50 smoke.log "$SMOKE" -- compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 $PY bench/gpu_smoke.py --size tiny
  step smoke 20 smoke.log "$SMOKE" -- $PY bench/gpu_smoke.py --size large
else
  skip smoke-memcheck "no compute-sanitizer on this machine"
  step smoke 20 smoke.log "$SMOKE" -- $PY bench/gpu_smoke.py --size large
fi

TESTS="grep -E '(passed|failed|error)' $OUT/tests.log"
if [ $DRY = 1 ]; then
  step tests 240 tests.log "$TESTS" -- $PY -m pytest -q -n 2 --timeout 120 -p no:cacheprovider \
    tests/test_ops.py -k "opcheck_forward and reference"
else
  step tests 90 tests.log "$TESTS" -- $PY -m pytest -q -n 8 --timeout 60 -p no:cacheprovider \
    tests/test_backends.py tests/test_ops.py
fi

HEADLINE="$PY bench/gpu_summary.py $OUT/moss_bench_*.csv | head -n 1"
if [ $DRY = 1 ]; then
  step bench 240 bench.log "$HEADLINE" -- $PY -m moss bench --case cpu-quick --tokens 256 \
    --d-in 64 --d-out 48 --rank 4 --grid 4 4 --reps 1 --warmup 0 --sweep --no-compile \
    --modes forward forward+backward --roofline --out "$OUT"
else
  step bench 110 bench.log "$HEADLINE" -- bash -c "$PY -m moss bench --case chameleon-7b-qkvo \
--rank 256 --sweep --no-compile --modes forward forward+backward --reps 10 --out '$OUT' && \
$PY -m moss bench --case chameleon-7b-qkvo --sweep --modes forward forward+backward --reps 10 \
--out '$OUT'"
fi

{ echo
  echo "== summary ($([ $DRY = 1 ] && echo 'dry run on the CPU' || echo 'GPU check'), $(date -u +%F))"
  printf '%s\n' "${SUMMARY[@]}"
  echo "bench, per case and mode (time / F.linear, / roofline, vs compile:eager):"
  $PY bench/gpu_summary.py "$OUT"/moss_bench_*.csv 2>/dev/null || echo "  (no bench rows)"
  echo "verdict: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'FAILED (see above)')"
} | tee "$OUT/summary.txt"
exit $FAILED
