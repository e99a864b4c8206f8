"""The compiled extension's backends: ``cpu`` (csrc/cpu) and ``cuda`` (csrc/cuda).

Both run the same C++ composition (csrc/linear.cpp: ATen GEMMs with the adapter riding in the
base GEMM's accumulator, plus the device's routing kernels) through the ops
``moss::_ext_linear_fwd`` / ``moss::_ext_linear_bwd``, which dispatch on the tensors' device.
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
