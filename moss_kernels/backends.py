"""Backend registry and selection.

Every backend implements the same two functions behind the shared ``moss`` custom ops
(``forward`` and ``backward`` with the signatures of :mod:`moss_kernels.reference`) and states
the device types (``DEVICE_TYPES``) and dtypes (``DTYPES``) it runs on; None means any. Selection, in order: the ``backend=`` argument, the
``MOSS_KERNELS_BACKEND`` environment variable (``auto`` or unset: no preference), then the
fastest available backend for the tensors' device. A backend that is asked for and cannot run
raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from . import _ext

#: Every backend name, in the contract's order.
BACKENDS = ("reference", "cpu", "cuda", "triton")
#: Preference per device type when nothing is asked for (fastest first).
DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
ENV_VAR = "MOSS_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _probe_reference() -> Any:
    return importlib.import_module("moss_kernels.reference")


def _probe_compiled(device_type: str):
    if not _ext.loaded():
        raise BackendUnavailableError(f"the extension moss_kernels._C is not usable: "
                                      f"{_ext.load_error()}")
    from . import compiled

    if device_type == "cpu":
        return compiled.CPU
    if _ext.build_info().get("cuda", "no") == "no":
        raise BackendUnavailableError(
            "moss_kernels._C was built without CUDA (torch without CUDA, or no CUDA toolkit "
            "found at build time)")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("moss_kernels._C has CUDA kernels but no CUDA GPU is visible")
    return compiled.CUDA


def _probe_triton() -> Any:
    try:
        import triton
    except ImportError as exc:
        raise BackendUnavailableError(f"triton is not installed ({exc})") from None
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"triton {triton.__version__} is installed but no CUDA GPU is visible (with "
            f"TRITON_INTERPRET=1 set before import, the kernels run slowly in Triton's CPU "
            f"interpreter)"
        )
    try:
        return importlib.import_module("moss_kernels.triton")
    except Exception as exc:  # noqa: BLE001 -- reported as the reason, with its type
        raise BackendUnavailableError(
            f"importing the Triton kernels failed: {type(exc).__name__}: {exc}") from None


_PROBES = {
    "reference": _probe_reference,
    "cpu": lambda: _probe_compiled("cpu"),
    "cuda": lambda: _probe_compiled("cuda"),
    "triton": _probe_triton,
}
_cache: dict[str, Any | BackendUnavailableError] = {}


def _probe(name: str) -> Any | BackendUnavailableError:
    if name not in _cache:
        try:
            _cache[name] = _PROBES[name]()
        except BackendUnavailableError as exc:
            _cache[name] = exc
    return _cache[name]


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} (or None), got {name!r}")


def implementation(name: str) -> Any:
    """The module implementing backend ``name``; raises why it is unavailable."""
    _check_name(name)
    found = _probe(name)
    if isinstance(found, BackendUnavailableError):
        raise BackendUnavailableError(f"backend {name!r} is not available: {found}")
    return found


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run (on some device), else why not."""
    _check_name(name)
    found = _probe(name)
    return str(found) if isinstance(found, BackendUnavailableError) else None


def runs_on(name: str, device_type: str) -> bool:
    types = getattr(implementation(name), "DEVICE_TYPES", None)
    return types is None or device_type in types


def supports(name: str, dtype: torch.dtype) -> bool:
    dtypes = getattr(implementation(name), "DTYPES", None)
    return dtypes is None or dtype in dtypes


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here (on ``device``'s type, when given)."""
    names = [n for n in BACKENDS if unavailable_reason(n) is None]
    if device is not None:
        names = [n for n in names if runs_on(n, torch.device(device).type)]
    return names


@torch.compiler.assume_constant_result
def resolve(name: str | None, device_type: str, dtype: torch.dtype = torch.float32) -> str:
    """The backend to run for ``dtype`` tensors on ``device_type``.

    A constant for torch.compile: it reads the environment and probes imports, neither of
    which belongs in a traced graph.
    """
    if name is None:
        name = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        source = f"{ENV_VAR}={name!r}"
        if name == "auto":
            for candidate in DEFAULT_ORDER.get(device_type, ("reference",)):
                if (unavailable_reason(candidate) is None and runs_on(candidate, device_type)
                        and supports(candidate, dtype)):
                    return candidate
            raise BackendUnavailableError(f"no backend runs on {device_type!r} {dtype} tensors")
    else:
        source = f"backend={name!r}"
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}")
    implementation(name)
    if not runs_on(name, device_type):
        raise BackendUnavailableError(
            f"backend {name!r} does not run on {device_type!r} tensors (it runs on "
            f"{', '.join(implementation(name).DEVICE_TYPES)})"
        )
    if not supports(name, dtype):
        raise TypeError(
            f"backend {name!r} does not support {dtype} (it supports "
            f"{', '.join(map(str, implementation(name).DTYPES))}; backend='reference' runs any "
            f"floating dtype)"
        )
    return name
