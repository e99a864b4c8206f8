"""The compiled extension's backends: ``cpu`` (csrc/cpu), ``cuda`` (csrc/cuda) and the test
backend ``cuda-emulated`` (csrc/emulated).

``cpu`` and ``cuda`` are reached through the ops ``moss::_ext_linear_fwd`` / ``_ext_linear_bwd``
(flat schemas, csrc/moss_ops.cpp), which dispatch on the tensors' device: on CPU the base GEMM is
ATen's (MKL) and the adapter runs in hand-vectorised route-aware kernels
(csrc/cpu/rank_kernels.h); on CUDA the adapter rides in cuBLAS GEMMs around the routing kernels
(csrc/cuda/linear_impl.h). The decode step is ``moss::_ext_decode`` on both devices: on CUDA the
composition of csrc/cuda/decode_impl.h around the decode_taps kernel, on CPU the base GEMV and a
rank space of its own (csrc/cpu/decode_cpu.cpp), called straight (``_C._decode_cpu``: the op's
dispatch cost as much as the step's adapters; csrc/moss_ops.cpp). ``cuda-emulated`` runs the
CUDA source on CPU tensors, through ``moss::_emulated_linear_fwd`` / ``_bwd`` / ``_decode``, so
that CI executes it without a GPU.
moss_kernels/backends.py loads this module only once the extension has loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C
from .backends import Backend, Grads, LinearInputs, Needs


def _entry_points(fwd, bwd, masks: bool):
    """A backend's forward and backward through the extension ops ``fwd`` / ``bwd``; ``masks``:
    their schemas take the dropout mask (``_ext_*``; on CUDA it is always None, see
    Backend.fuses_dropout)."""
    def drop(a: LinearInputs) -> tuple:
        return (a.dropout_mask, a.dropout_scale) if masks else ()

    def forward(a: LinearInputs) -> tuple[Tensor, Tensor]:
        return fwd(a.x, a.weight, a.bias, a.x_adapter, *drop(a), a.text_A, a.text_B, a.image_A,
                   a.image_B, a.route, a.nbr, a.text_scale, a.image_scale)

    def backward(a: LinearInputs, dy: Tensor, z: Tensor, needs: Needs) -> Grads:
        return Grads(*bwd(dy, a.x, a.weight, a.x_adapter, *drop(a), a.text_A, a.text_B,
                          a.image_A, a.image_B, z, a.route, a.nbr_t, a.text_scale,
                          a.image_scale, *needs))

    return forward, backward


_EXT = _entry_points(torch.ops.moss._ext_linear_fwd, torch.ops.moss._ext_linear_bwd, True)
_HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)

CPU = Backend("cpu", *_EXT, _C._decode_cpu, devices=("cpu",),
              dtypes=(torch.float32, torch.float64, torch.bfloat16), preference=1,
              fuses_dropout=True)
CUDA = Backend("cuda", *_EXT, torch.ops.moss._ext_decode, devices=("cuda",),
               dtypes=_HALF_AND_SINGLE, preference=1)
EMULATED = Backend("cuda-emulated", *_entry_points(torch.ops.moss._emulated_linear_fwd,
                                                   torch.ops.moss._emulated_linear_bwd, False),
                   torch.ops.moss._emulated_decode, devices=("cpu",), dtypes=_HALF_AND_SINGLE,
                   emulated=True)


def configure_emulation(max_blocks: int, threads: int, check_writes: bool = False) -> tuple:
    """The ``cuda-emulated`` launch shape: at most ``max_blocks`` blocks of ``threads``
    threads, and whether each launch checks that every output element is written by exactly
    one (block, thread). Returns the previous settings, to pass back."""
    return tuple(torch.ops.moss._emulated_configure(max_blocks, threads, check_writes))
