"""bench/gpu_check.sh, the one prepared run for a lent GPU, in its CPU dry run: every step's
logic runs (smoke test on the CPU's fused backends, a test subset under xdist and timeouts, a
small benchmark with its roofline, the model benchmark), and the summary closes the output."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"env": "pass", "build": "pass", "smoke": "pass", "smoke-memcheck": "skipped",
         "smoke-large": "skipped", "tests": "pass", "bench": "pass", "model": "pass"}


def test_the_dry_run_passes_every_step_and_ends_with_the_summary(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("== summary (dry run"):].splitlines()
    steps = {line.split()[0]: line.split()[1] for line in summary[1:1 + len(STEPS)]}
    assert steps == STEPS, summary
    assert "checks passed" in done.stdout and "x roofline" in done.stdout
    assert summary[-1] == "verdict: every step passed"
    assert (tmp_path / "summary.txt").read_text().splitlines() == summary[1:]
    # At most 8 files: what the device tool brings back.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.log", "build.log", "env.txt", "moss_bench_cpu.csv", "moss_bench_model_cpu.csv",
        "smoke.log", "summary.txt", "tests.log"]
