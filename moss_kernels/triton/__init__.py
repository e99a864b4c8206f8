"""Triton backend: the MOSS linear forward and backward as DESIGN section 3 decomposes it.

Forward (``C = R_t + K*K*R_i``; shapes per token row):

    P  = x A_all^T                      gemm.py, ROUTE_SKIP    [N, C]     x dtype
    z  = route + convolve P             route.py               [N, R]     fp32 (saved)
    y  = x W^T + z Bcat^T + b           gemm.py, fused         [N, D_out] one pass over y

Backward:

    dz   = dy Bcat                      cuBLAS                 [N, R]
    dBcat = dy^T z  (scaled per block)  cuBLAS                 [D_out, R]
    dP   = gather dz through nbr_t      route.py               [N, C]
    dA_all = dP^T x                     cuBLAS                 [C, D_in]
    dx   = dy W + dP A_all              gemm.py, fused         [N, D_in]  one pass over dx
    dW   = dy^T x,  db = sum dy         cuBLAS (only when they require grad)

Triton does what needs fusing or routing; the plain GEMMs whose shape cuBLAS already serves
at its roofline (the reductions over N in particular, where cuBLAS picks split-K
deterministically) stay with ``torch.matmul``. No step does a host sync, and nothing is
accumulated with atomics, so results are deterministic.

On CPU tensors this backend runs only under the Triton interpreter (``TRITON_INTERPRET=1`` in
the environment before this module is imported), which is how the tests exercise it without a
GPU; bf16 is tested on GPUs only (the interpreter's bf16 dot is wrong, DESIGN section 7).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import split_down, stack_down
from .gemm import INTERPRET, launch_gemm
from .route import route_backward, route_forward

DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETED = INTERPRET  # timings of an interpreter mean nothing: moss bench leaves it out


def _b_cat(text_B: Tensor, image_B: Tensor, text_scale: float, image_scale: float) -> Tensor:
    return torch.cat([text_B * text_scale, image_B * image_scale], dim=1)  # [D_out, R]


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, text_A: Tensor, text_B: Tensor,
    image_A: Tensor, image_B: Tensor, route: Tensor, nbr: Tensor,
    text_scale: float, image_scale: float,
) -> tuple[Tensor, Tensor]:
    r_t, r_i = text_A.shape[0], image_A.shape[0]
    p = launch_gemm(x, stack_down(text_A, image_A).t(), route=route, r_t=r_t)
    z = route_forward(p, route, nbr, r_t, r_i)
    b_cat = _b_cat(text_B, image_B, text_scale, image_scale)
    y = launch_gemm(x, weight.t(), a2=z, b2=b_cat.t(), bias=bias)
    return y, z


def backward(
    dy: Tensor, x: Tensor, weight: Tensor, text_A: Tensor, text_B: Tensor,
    image_A: Tensor, image_B: Tensor, z: Tensor, route: Tensor, nbr_t: Tensor,
    text_scale: float, image_scale: float, need_dx: bool, need_dweight: bool, need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r_t, r_i = text_A.shape[0], image_A.shape[0]
    b_cat = _b_cat(text_B, image_B, text_scale, image_scale)
    dz = dy @ b_cat  # [N, R]
    d_b_cat = dy.t() @ z.to(dy.dtype)  # [D_out, R], unscaled
    d_text_B = d_b_cat[:, :r_t] * text_scale
    d_image_B = d_b_cat[:, r_t:] * image_scale
    dp = route_backward(dz, route, nbr_t, r_t, r_i)
    a_all = stack_down(text_A, image_A)
    d_text_A, d_image_A = split_down(dp.t() @ x, r_t, image_A.shape)
    dx = launch_gemm(dy, weight, a2=dp, b2=a_all) if need_dx else x.new_empty(0)
    dw = dy.t() @ x if need_dweight else x.new_empty(0)
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_dbias else x.new_empty(0)
    return dx, dw, db, d_text_A, d_text_B, d_image_A, d_image_B
