"""The compiled extension's backends: ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda).

Both are reached through the ops ``moss::_ext_linear_fwd`` / ``moss::_ext_linear_bwd``, which
dispatch on the tensors' device: on CPU the base GEMM is ATen's (MKL) and the adapter runs in
hand-vectorised route-aware kernels (csrc/cpu/rank_kernels.h); on CUDA the adapter rides in
cuBLAS GEMMs around two routing kernels (csrc/cuda/linear_cuda.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompiledBackend:
    DEVICE_TYPES: tuple[str, ...]
    DTYPES: tuple[torch.dtype, ...]

    @staticmethod
    def forward(x, weight, bias, text_A, text_B, image_A, image_B, route, nbr, text_scale,
                image_scale):
        return torch.ops.moss._ext_linear_fwd(x, weight, bias, text_A, text_B, image_A,
                                              image_B, route, nbr, text_scale, image_scale)

    @staticmethod
    def backward(dy, x, weight, text_A, text_B, image_A, image_B, z, route, nbr_t, text_scale,
                 image_scale, need_dx, need_dweight, need_dbias):
        return torch.ops.moss._ext_linear_bwd(dy, x, weight, text_A, text_B, image_A, image_B,
                                              z, route, nbr_t, text_scale, image_scale, need_dx,
                                              need_dweight, need_dbias)


CPU = CompiledBackend(("cpu",), (torch.float32, torch.float64, torch.bfloat16))
CUDA = CompiledBackend(("cuda",), (torch.float16, torch.bfloat16, torch.float32))
