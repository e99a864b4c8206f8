#!/usr/bin/env bash
# One prepared run for a lent GPU (the device tool): build the CUDA extension, run the GPU
# tests, run the GPU benchmark; logs, CSV and plots land in $OUT (7 files, within the tool's 8).
# Budget: under 8 minutes on an H200. Run from the repository root:
#     bash bench/gpu_check.sh            (OUT defaults to a fresh temporary folder)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
status=0
{ python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build (CUDA + CPU kernels)"
if ! (time python3 setup.py build_ext --inplace) > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; echo "build failed"; exit 1
fi
tail -n 3 "$OUT/build.log"
python3 -m moss info | tee -a "$OUT/env.txt"

echo "== GPU tests"
timeout 200 python3 -m pytest -q -x tests/test_backends.py tests/test_ops.py 2>&1 | tee "$OUT/tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark: every provider on Chameleon-7B's projection, then rank / image-fraction sweeps"
{ timeout 150 python3 -m moss bench --sweep --reps 10 --out "$OUT"
  timeout 150 python3 -m moss bench --no-compile --modes forward forward+backward --reps 10 --out "$OUT"
  timeout 60 python3 -m moss bench --case emu2-mlp-up --sweep --no-compile --reps 10 --out "$OUT"
} 2>&1 | tee "$OUT/bench.log" | grep -v "^rounds"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
ls -la "$OUT"
exit $status
