"""``moss info``: versions, hardware, the compiled extension, and every backend (or why not)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

import moss_kernels
from moss_kernels import _ext, backends


def version(dist: str) -> str:
    """A distribution's installed version, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def hardware() -> str:
    """A one-line description of the machine, for reports and CSV rows."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def report() -> str:
    lines = [
        f"moss-kernels {moss_kernels.__version__}",
        f"  python        {sys.version.split()[0]} ({platform.platform()})",
        f"  torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"  triton        {version('triton')}",
        f"  transformers  {version('transformers')}",
        f"  hardware      {hardware()}",
        "",
    ]
    error, info = _ext.load_error(), _ext.build_info()
    if error is None:
        lines.append("extension moss_kernels._C: loaded, built with")
    else:
        lines.append(f"extension moss_kernels._C: NOT USABLE: {error}")
        if info:
            lines.append(f"  (the file says it was built for; running torch {torch.__version__})")
    if info:
        lines += [f"  {key:<12}  {value}" for key, value in info.items()]
    lines += ["", "backends:"]
    for name in backends.BACKENDS:
        record = backends.backend(name)
        if record.unavailable is None:
            where = ", ".join(record.devices) if record.devices else "any device"
            test = "; a test backend: emulated, never chosen by auto" if record.emulated else ""
            lines.append(f"  {name:<14} available ({where}{test})")
        else:
            lines.append(f"  {name:<14} unavailable: {record.unavailable}")
    lines += ["", "default backend:"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            chosen = backends.resolve(None, device)
        except (backends.BackendUnavailableError, ValueError) as exc:
            chosen = f"none ({exc})"
        lines.append(f"  {device} tensors -> {chosen}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    """``moss info`` takes no arguments."""


def main(args) -> int:
    print(report())
    return 0
