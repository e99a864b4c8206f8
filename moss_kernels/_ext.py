"""Loading the compiled extension ``moss_kernels._C``, once.

A failed load is kept, not swallowed: :func:`load_error` says why (missing because the package
was installed with ``MOSS_BUILD_EXT=0`` or never compiled, an undefined symbol from a torch
mismatch, ...), and ``moss info`` shows it beside the versions the extension was built for.
The import itself registers the extension's ops under the ``torch.ops.moss`` namespace.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import torch

_state: dict = {}


def _scan_binary() -> dict[str, str] | None:
    """What the extension was built with, read from its file without loading it.

    csrc/moss_ops.cpp keeps these as string literals (``torch=2.13.0;``), so a binary that
    cannot be loaded (an undefined symbol after a torch upgrade) still tells what it needs.
    """
    here = Path(__file__).parent
    paths = sorted(here.glob("_C*.so")) + sorted(here.glob("_C*.pyd"))
    if not paths:
        return None
    data = paths[0].read_bytes()
    found = {key: m.group(1).decode() for key in ("torch", "cuda")
             if (m := re.search(rb"%s=([0-9A-Za-z.+]+);" % key.encode(), data))}
    return {**found, "path": str(paths[0])} if found else None


def _load() -> dict:
    if _state:
        return _state
    try:
        module = importlib.import_module("moss_kernels._C")
        info = dict(
            item.split("=", 1) for item in torch.ops.moss._C_build_info().split(";") if item
        )
    except Exception as exc:  # noqa: BLE001 -- any failure is reported, never raised at import
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "moss_kernels._C":
            error += (" (installed with MOSS_BUILD_EXT=0, or never compiled: run "
                      "`pip install --no-build-isolation -e .`)")
        _state.update(module=None, info=_scan_binary(), error=error)
        return _state
    built, running = info.get("torch"), torch.__version__.split("+")[0]
    if built != running:
        error = (f"moss_kernels._C was built against torch {built} but torch {running} is "
                 f"running; reinstall with `pip install --no-build-isolation -e .`")
        _state.update(module=None, info=info, error=error)
    else:
        _state.update(module=module, info=info, error=None)
    return _state


def loaded() -> bool:
    """True when ``moss_kernels._C`` imported and matches the running torch."""
    return _load()["module"] is not None


def load_error() -> str | None:
    """Why the extension is not usable, or None when it is."""
    return _load()["error"]


def build_info() -> dict[str, str] | None:
    """What the extension was compiled with (torch, compiler, OpenMP, CUDA, path)."""
    info = _load()["info"]
    if info is None:
        return None
    module = _load()["module"]
    return {**info, "path": getattr(module, "__file__", "?")} if module else dict(info)
