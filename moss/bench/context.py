"""Where a benchmark runs and what its CSV rows say about it: the device it was asked for, and
the date, git sha, hardware and versions every row carries (``moss bench`` and
``moss bench --model`` alike)."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import torch

from ..info import hardware, version


def device(name: str | None) -> torch.device:
    """``--device``: cuda when present by default; a message and exit for anything else."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"moss bench: --device must be cpu or cuda[:index], got {name!r}"
                         ) from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"moss bench: --device must be cpu or cuda[:index], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moss bench: --device cuda: no CUDA GPU is visible to torch "
                         f"{torch.__version__}")
    return dev


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_context(dev: torch.device, packages: tuple[str, ...] = ()) -> dict:
    """The columns every CSV row of a run starts with; ``packages``: distributions whose
    versions matter to the run besides torch's."""
    gpu = dev.type == "cuda"
    return {"date": datetime.date.today().isoformat(), "git": git_sha(),
            "hardware": hardware(), "torch": torch.__version__,
            **{name: version(name) for name in packages}, "device": dev.type,
            "threads": torch.get_num_threads() if not gpu else os.cpu_count()}

