"""The backend contract, the registry, and selection (docs/design.md section 4).

A backend is one :class:`Backend` record: its name, the device types and dtypes it runs,
why it cannot run here (if so), and its entry points; the full op's two take the layer's inputs
as one :class:`LinearInputs` (the custom ops' flat schemas stop at moss_kernels/linear.py):

    forward(inputs)                   -> (y [N, D_out] in x's dtype, z [N, R_t + R_i] in the
                                          accumulation dtype, which the backward reads)
    backward(inputs, dy, z, needs)    -> Grads(x, weight, bias, x_adapter, text_A, ...,
                                          image_B); a gradient ``needs`` does not ask for is an
                                          empty tensor
    decode(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size)
                                      -> y [B, D_out] (x [B, D_in]) or [B, 1, D_out] (x [B, 1,
                                         D_in]); one incremental decode step, the ring updated
                                         in place, no autograd (moss_kernels/decode.py)

The adapters read :attr:`LinearInputs.adapter_input`: ``x_adapter`` when given, ``x`` through
LoRA dropout's ``dropout_mask`` when that is given, else ``x``. The base GEMM always reads ``x``,
the down-projection the adapter input, so dropout costs no second base GEMM (docs/design.md
section 3). A backend whose kernels read the mask themselves (``fuses_dropout``: ``cpu``) gets
it as it is; every other one gets the masked input materialised as ``x_adapter``, and its
``dx_adapter`` masked back onto ``dx``, by :func:`forward` / :func:`backward` below.

Each backend module builds its own record; :data:`_LOADERS` below says how to reach it and, when
that fails (not built, no GPU, an import error), returns a record that says why. Selection, in
order: the ``backend=`` argument, the ``MOSS_KERNELS_BACKEND`` environment variable (``auto`` or
unset: no preference), then the available backend with the highest ``preference`` that runs on
the tensors' device and dtype (emulated backends never: their timings mean nothing). A
backend that is asked for and cannot run raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from . import _ext

ENV_VAR = "MOSS_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class LinearInputs:
    """One MOSS linear layer's inputs, as every backend's forward and backward read them."""

    # [N, D_in]; None in a backward that reads it for nothing (no dW, and x_adapter given)
    x: Tensor | None
    weight: Tensor  # [D_out, D_in]
    bias: Tensor | None  # [D_out]; None in the backward (db = sum dy needs no bias)
    x_adapter: Tensor | None  # [N, D_in] like x: what the adapters read; None: they read x
    text_A: Tensor  # [R_t, D_in]
    text_B: Tensor  # [D_out, R_t]
    image_A: Tensor  # [R_i, D_in, K, K], nn.Conv2d's weight layout
    image_B: Tensor  # [D_out, R_i]
    route: Tensor  # [N] int8: -1 padding, 0 text, 1 image
    nbr: Tensor | None  # [N, K*K] int32, read by the forward (None in the backward)
    nbr_t: Tensor | None  # [N, K*K] int32, read by the backward
    text_scale: float
    image_scale: float
    # LoRA dropout (only with x_adapter None), packed in bits as moss_kernels/dropout.py says
    # ([N, 8 * ceil(D_in / 64)] uint8): the adapters read x * keep * dropout_scale
    dropout_mask: Tensor | None = None
    dropout_scale: float = 1.0

    @property
    def adapter_input(self) -> Tensor:
        """What the down-projection reads: ``x_adapter``, or ``x`` through the dropout mask
        (materialised here, rounded once to x's dtype), or ``x``."""
        if self.x_adapter is not None:
            return self.x_adapter
        if self.dropout_mask is None:
            return self.x
        return _masked(self.x, self.dropout_mask, self.dropout_scale)


class Needs(NamedTuple):
    """Which of the frozen layer's gradients the backward computes (adapters' always).

    ``x``: ``dy W``, plus the adapters' input gradient ``dP A_all`` when ``x_adapter`` is None;
    ``x_adapter``: that input gradient on its own (only with an ``x_adapter``)."""

    x: bool
    weight: bool
    bias: bool
    x_adapter: bool


def _masked(t: Tensor, bits: Tensor, scale: float) -> Tensor:
    """``t * keep * scale`` for the packed mask ``bits``, computed in the accumulation dtype
    (a dropped NaN is 0)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    keep = importlib.import_module("moss_kernels.dropout").unpack(bits, t.shape[1])
    return torch.where(keep, t.to(acc) * scale, 0.0).to(t.dtype)


class Grads(NamedTuple):
    x: Tensor
    weight: Tensor
    bias: Tensor
    x_adapter: Tensor
    text_A: Tensor
    text_B: Tensor
    image_A: Tensor
    image_B: Tensor


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable[[LinearInputs], tuple[Tensor, Tensor]] | None = None
    backward: Callable[[LinearInputs, Tensor, Tensor, Needs], Grads] | None = None
    decode: Callable[..., Tensor] | None = None
    devices: tuple[str, ...] | None = None  # device types; None: any device torch supports
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any floating dtype
    preference: int = 0  # what `auto` picks among those that run: the highest
    # Runs GPU kernels on the CPU (Triton's interpreter, the cuda-emulated test backend): correct,
    # but slow, so `auto` never picks it and moss bench never times it.
    emulated: bool = False
    # Its kernels read LinearInputs.dropout_mask themselves (else forward() materialises it).
    fuses_dropout: bool = False
    unavailable: str | None = None  # why it cannot run here; None: it can

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def supports(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes


def _reference() -> Backend:
    return importlib.import_module("moss_kernels.reference").BACKEND


def _extension_error(name: str) -> Backend | None:
    if _ext.loaded():
        return None
    return Backend(name, unavailable=f"the extension moss_kernels._C is not usable: "
                                     f"{_ext.load_error()}")


def _cpu() -> Backend:
    return _extension_error("cpu") or importlib.import_module("moss_kernels.compiled").CPU


def _cuda() -> Backend:
    if (missing := _extension_error("cuda")) is not None:
        return missing
    if _ext.build_info().get("cuda", "no") == "no":
        return Backend("cuda", unavailable="moss_kernels._C was built without CUDA (torch without "
                                           "CUDA, or no CUDA toolkit found at build time)")
    if not torch.cuda.is_available():
        return Backend("cuda", unavailable="moss_kernels._C has CUDA kernels but no CUDA GPU is "
                                           "visible")
    return importlib.import_module("moss_kernels.compiled").CUDA


def _cuda_emulated() -> Backend:
    return (_extension_error("cuda-emulated")
            or importlib.import_module("moss_kernels.compiled").EMULATED)


def _triton() -> Backend:
    try:
        import triton
    except ImportError as exc:
        return Backend("triton", unavailable=f"triton is not installed ({exc})")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return Backend("triton", unavailable=(
            f"triton {triton.__version__} is installed but no CUDA GPU is visible (with "
            f"TRITON_INTERPRET=1 set before import, the kernels run slowly in Triton's CPU "
            f"interpreter)"))
    try:
        return importlib.import_module("moss_kernels.triton").BACKEND
    except Exception as exc:  # noqa: BLE001 -- reported as the reason, with its type
        return Backend("triton", unavailable=f"importing the Triton kernels failed: "
                                             f"{type(exc).__name__}: {exc}")


#: How to reach each backend's record, in the contract's order (the order users see).
_LOADERS: dict[str, Callable[[], Backend]] = {
    "reference": _reference,
    "cpu": _cpu,
    "cuda": _cuda,
    "triton": _triton,
    "cuda-emulated": _cuda_emulated,  # the CUDA backend's source on CPU tensors, for tests
}
#: Every backend name.
BACKENDS = tuple(_LOADERS)
#: What this process found: backend records by name, and resolve's answers by its arguments.
_cache: dict = {}


def backend(name: str) -> Backend:
    """The record of backend ``name``, available or not (``unavailable`` says why not)."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} (or None), got {name!r}")
    if name not in _cache:
        _cache[name] = _LOADERS[name]()
    return _cache[name]


def implementation(name: str) -> Backend:
    """The record of backend ``name``; raises why it is unavailable."""
    found = backend(name)
    if found.unavailable is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {found.unavailable}")
    return found


def forward(b: Backend, a: LinearInputs) -> tuple[Tensor, Tensor]:
    """``b``'s forward on ``a``; a dropout mask ``b`` does not read becomes its x_adapter."""
    if a.dropout_mask is None or b.fuses_dropout:
        return b.forward(a)
    return b.forward(replace(a, x_adapter=a.adapter_input, dropout_mask=None))


def backward(b: Backend, a: LinearInputs, dy: Tensor, z: Tensor, needs: Needs) -> Grads:
    """``b``'s backward on ``a``; through a dropout mask ``b`` does not read, the adapters'
    input gradient comes back as dx_adapter and goes onto dx through the mask."""
    if a.dropout_mask is None or b.fuses_dropout:
        return b.backward(a, dy, z, needs)
    g = b.backward(replace(a, x_adapter=a.adapter_input, dropout_mask=None), dy, z,
                   needs._replace(x_adapter=needs.x))
    if not needs.x:
        return g
    return g._replace(x=g.x + _masked(g.x_adapter, a.dropout_mask, a.dropout_scale),
                      x_adapter=dy.new_empty(0))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here (on ``device``'s type, when given)."""
    found = [backend(n) for n in BACKENDS]
    return [b.name for b in found if b.unavailable is None
            and (device is None or b.runs_on(torch.device(device).type))]


@torch.compiler.assume_constant_result
def resolve(name: str | None, device_type: str, dtype: torch.dtype = torch.float32) -> str:
    """The backend to run for ``dtype`` tensors on ``device_type``.

    A constant for torch.compile: it reads the environment and probes imports, neither of
    which belongs in a traced graph. Answers are cached per (name, environment variable,
    device, dtype): a decode step calls this per layer per token, and the search cost 6 us.
    """
    key = (name, os.environ.get(ENV_VAR) if name is None else None, device_type, dtype)
    if not (name is None or isinstance(name, str)):  # unhashable, perhaps: _resolve says why
        return _resolve(*key)
    if key not in _cache:
        _cache[key] = _resolve(*key)
    return _cache[key]


def _resolve(name: str | None, env: str | None, device_type: str, dtype: torch.dtype) -> str:
    if name is None:
        name = (env or "auto").strip() or "auto"
        source = f"{ENV_VAR}={name!r}"
        if name == "auto":
            runs = [b for b in map(backend, BACKENDS) if b.unavailable is None and not b.emulated
                    and b.runs_on(device_type) and b.supports(dtype)]
            if not runs:
                raise BackendUnavailableError(f"no backend runs on {device_type!r} {dtype} tensors")
            return max(runs, key=lambda b: b.preference).name
    else:
        source = f"backend={name!r}"
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}")
    chosen = implementation(name)
    if not chosen.runs_on(device_type):
        raise BackendUnavailableError(f"backend {name!r} does not run on {device_type!r} tensors "
                                      f"(it runs on {', '.join(chosen.devices)})")
    if not chosen.supports(dtype):
        raise TypeError(
            f"backend {name!r} does not support {dtype} (it supports "
            f"{', '.join(map(str, chosen.dtypes))}; backend='reference' runs any floating dtype)")
    return name
