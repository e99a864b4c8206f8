"""The compiled extension's backends: ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda).

Both are reached through the ops ``moss::_ext_linear_fwd`` / ``moss::_ext_linear_bwd`` (flat
schemas, csrc/moss_ops.cpp), which dispatch on the tensors' device: on CPU the base GEMM is
ATen's (MKL) and the adapter runs in hand-vectorised route-aware kernels
(csrc/cpu/rank_kernels.h); on CUDA the adapter rides in cuBLAS GEMMs around two routing
kernels (csrc/cuda/linear_cuda.cpp). moss_kernels/backends.py loads this module only once the
extension has loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import Backend, Grads, LinearInputs, Needs


def forward(a: LinearInputs) -> tuple[Tensor, Tensor]:
    return torch.ops.moss._ext_linear_fwd(a.x, a.weight, a.bias, a.text_A, a.text_B, a.image_A,
                                          a.image_B, a.route, a.nbr, a.text_scale, a.image_scale)


def backward(a: LinearInputs, dy: Tensor, z: Tensor, needs: Needs) -> Grads:
    return Grads(*torch.ops.moss._ext_linear_bwd(
        dy, a.x, a.weight, a.text_A, a.text_B, a.image_A, a.image_B, z, a.route, a.nbr_t,
        a.text_scale, a.image_scale, *needs))


CPU = Backend("cpu", forward, backward, devices=("cpu",),
              dtypes=(torch.float32, torch.float64, torch.bfloat16), preference=1)
CUDA = Backend("cuda", forward, backward, devices=("cuda",),
               dtypes=(torch.float16, torch.bfloat16, torch.float32), preference=1)
