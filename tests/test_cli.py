"""The ``moss`` command line: ``moss info`` and ``moss bench`` on this machine."""

import csv
import shutil
import subprocess
import sys

import pytest

from moss.cli import main
from moss_kernels import backends


def test_info_reports_versions_extension_and_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("moss-kernels", "torch", "triton", "transformers", "hardware",
                   "extension moss_kernels._C", "default backend:", "cpu tensors -> "):
        assert needle in out
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        assert (f"{name:<10} available" if reason is None else f"unavailable: {reason}") in out


def test_bench_checks_then_times_and_appends_csv(tmp_path, capsys):
    path = tmp_path / "results.csv"
    args = ["bench", "--tokens", "300", "--d-in", "48", "--d-out", "40", "--rank", "4",
            "--grid", "5", "3", "--reps", "2", "--warmup", "1", "--csv", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "match the float64 reference" in out
    assert "F.linear" in out and "moss/reference" in out and "x floor" in out
    rows = list(csv.DictReader(path.open()))
    assert {(r["provider"], r["mode"]) for r in rows} >= {
        ("F.linear", "forward"), ("moss/reference", "forward+backward")}
    assert all(float(r["ratio_to_floor"]) > 0 and r["hardware"] for r in rows)
    floors = [r for r in rows if r["provider"] == "F.linear"]
    assert all(float(r["ratio_to_floor"]) == 1.0 for r in floors)
    assert main(args) == 0  # appending keeps one header
    assert len(list(csv.DictReader(path.open()))) == 2 * len(rows)


@pytest.mark.parametrize("arg,match", [("--tokens=0", "--tokens must be >= 1"),
                                       ("--image-fraction=2", "--image-fraction must be in")])
def test_bench_rejects_bad_arguments(arg, match):
    with pytest.raises(SystemExit, match=match):
        main(["bench", arg])


def test_console_script_and_module_entry_point():
    exe = shutil.which("moss")
    assert exe, "the `moss` console script is not installed"
    for cmd in ([exe, "info"], [sys.executable, "-m", "moss", "info"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "backends:" in done.stdout
