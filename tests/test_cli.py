"""The ``moss`` command line: ``moss info`` and ``moss bench`` on this machine (bad arguments:
tests/test_bad_inputs_*.py)."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

from moss.cli import main
from moss_kernels import backends

from helpers import CPU_BACKENDS


def test_info_reports_versions_extension_and_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("moss-kernels", "torch", "triton", "transformers", "hardware",
                   "extension moss_kernels._C", "default backend:", "cpu tensors -> "):
        assert needle in out
    for name in backends.BACKENDS:
        reason = backends.backend(name).unavailable
        assert (f"{name:<14} available" if reason is None else f"unavailable: {reason}") in out


SMALL = ["bench", "--case", "cpu-quick", "--tokens", "300", "--d-in", "48", "--d-out", "40",
         "--rank", "4", "--grid", "5", "3", "--reps", "2", "--warmup", "1"]


def test_bench_checks_then_times_every_provider_and_reports(tmp_path, capsys):
    assert main(SMALL + ["--sweep", "rank", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "WRONG" not in out
    ours = [f"moss:{n}" for n in CPU_BACKENDS if not backends.backend(n).emulated]
    for provider in ["F.linear", "eager", "peft"] + ours:
        assert provider in out
    rows = list(csv.DictReader((tmp_path / "moss_bench_cpu.csv").open()))
    assert {r["mode"] for r in rows} == {"forward", "backward", "forward+backward"}
    assert {int(r["rank"]) for r in rows} == {4, 16, 64, 256}
    assert all(r["hardware"] and r["date"] and float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["ratio_to_floor"]) == 1.0 for r in rows if r["provider"] == "F.linear")
    assert all(float(r["x_eager"]) > 0 for r in rows if r["provider"].startswith("moss:"))
    assert (tmp_path / "cpu_ratio_vs_rank.png").stat().st_size > 10_000
    assert main(SMALL + ["--sweep", "--no-compile", "--modes", "forward",
                         "--out", str(tmp_path)]) == 0
    assert len(list(csv.DictReader((tmp_path / "moss_bench_cpu.csv").open()))) > len(rows)


def test_bench_compiled_providers(tmp_path, capsys):
    assert main(SMALL + ["--sweep", "--modes", "forward+backward", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "compile:eager" in out and "compile:reference" in out and "WRONG" not in out


def test_bench_leaves_out_a_wrong_provider(tmp_path, capsys, monkeypatch):
    from moss.bench import providers as prov

    real = prov._eager
    monkeypatch.setattr(prov, "_eager", lambda p: (lambda t: real(p)(t) * 1.01))
    assert main(SMALL + ["--sweep", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eager: WRONG, not timed: y off by" in out
    rows = list(csv.DictReader((tmp_path / "moss_bench_cpu.csv").open()))
    assert rows and not any(r["provider"] == "eager" for r in rows)


def test_pytest_benchmark_runs_the_same_cases():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", str(root / "bench"), "-q",
                           "--benchmark-disable", "-k", "img0.5 and R16 and not compile"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


def test_console_script_and_module_entry_point():
    exe = shutil.which("moss")
    assert exe, "the `moss` console script is not installed"
    for cmd in ([exe, "info"], [sys.executable, "-m", "moss", "info"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "backends:" in done.stdout
