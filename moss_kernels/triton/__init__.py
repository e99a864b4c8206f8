"""Triton backend: the MOSS linear forward and backward, decomposed as docs/design.md section 3
lays out.

Forward (``C = R_t + K*K*R_i``; shapes per token row):

    P  = x A_all^T                      gemm.py, ROUTE_SKIP    [N, C]     rank dtype
    z  = route + convolve P             route.py               [N, R]     fp32 (saved)
    y  = x W^T + z Bcat^T + b           gemm.py, fused         [N, D_out] one pass over y

Backward:

    dz   = dy Bcat                      cuBLAS (fp16: gemm.py) [N, R]     rank dtype
    dBcat = dy^T z  (scaled per block)  cuBLAS (fp16: gemm.py) [D_out, R]
    dP   = gather dz through nbr_t      route.py               [N, C]     rank dtype
    dA_all = dP^T x                     cuBLAS (fp16: gemm.py) [C, D_in]
    dx   = dy W + dP A_all              gemm.py, fused         [N, D_in]  one pass over dx
    dW   = dy^T x,  db = sum dy         cuBLAS (only when they require grad)

Triton does what needs fusing or routing; the plain GEMMs whose shape cuBLAS already serves
at its roofline (the reductions over N in particular, where cuBLAS picks split-K
deterministically) stay with ``torch.matmul``. No step does a host sync, and nothing is
accumulated with atomics, so results are deterministic.

Range. The rank-space intermediates P, dz and dP are kept in the input dtype, except for fp16
inputs, where they are fp32 (:func:`rank_dtype`): fp16 tops out at 65504, and a tap product or
routed sum passes that while the layer's outputs still fit (large ``x A``, small ``B``; or large
``dy B``, small ``A``), which fp16 intermediates turned into inf and NaN (issue #9). They are
``N * C`` values against ``N * D`` for x, and transient (only z is saved). bf16 has fp32's
exponent range and keeps its own dtype. The fp16 products with an fp32 operand or result (dz,
dBcat, dA_all) run in the Triton GEMM, which upcasts in registers (tf32, see gemm.py), where
``torch.matmul`` would need an fp32 copy of dy or x. Unmeasured on a GPU so far: two of them
reduce over N, where the GEMM has no split-K (cuBLAS's edge); their FLOPs are R / D of the
layer's.

On CPU tensors this backend runs only under the Triton interpreter (``TRITON_INTERPRET=1`` in
the environment before this module is imported), which is how the tests exercise it without a
GPU; bf16 is tested on GPUs only (the interpreter's bf16 dot is wrong, docs/design.md
section 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import Backend, Grads, LinearInputs, Needs
from ..reference import split_down, stack_down
from .gemm import INTERPRET, launch_gemm
from .route import route_backward, route_forward


def _b_cat(a: LinearInputs) -> Tensor:
    return torch.cat([a.text_B * a.text_scale, a.image_B * a.image_scale], dim=1)  # [D_out, R]


def rank_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-space intermediates P, dz, dP for ``dtype`` inputs (see Range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _matmul(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``out_dtype``: cuBLAS when all three dtypes agree, else the Triton GEMM."""
    if a.dtype == b.dtype == out_dtype:
        return a @ b
    return launch_gemm(a, b, out_dtype=out_dtype)


def forward(a: LinearInputs) -> tuple[Tensor, Tensor]:
    x, r_t, r_i = a.x, a.text_A.shape[0], a.image_A.shape[0]
    p = launch_gemm(x, stack_down(a.text_A, a.image_A).t(), route=a.route, r_t=r_t,
                    out_dtype=rank_dtype(x.dtype))
    z = route_forward(p, a.route, a.nbr, r_t, r_i)
    y = launch_gemm(x, a.weight.t(), a2=z, b2=_b_cat(a).t(), bias=a.bias)
    return y, z


def backward(a: LinearInputs, dy: Tensor, z: Tensor, needs: Needs) -> Grads:
    x, r_t, r_i = a.x, a.text_A.shape[0], a.image_A.shape[0]
    rank = rank_dtype(dy.dtype)
    dz = _matmul(dy, _b_cat(a), rank)  # [N, R]
    d_b_cat = _matmul(dy.t(), z.to(rank), rank)  # [D_out, R], unscaled
    d_text_B = (d_b_cat[:, :r_t] * a.text_scale).to(a.text_B.dtype)
    d_image_B = (d_b_cat[:, r_t:] * a.image_scale).to(a.image_B.dtype)
    dp = route_backward(dz, a.route, a.nbr_t, r_t, r_i)
    a_all = stack_down(a.text_A, a.image_A)
    d_all = _matmul(dp.t(), x, rank).to(x.dtype)  # [C, D_in]
    d_text_A, d_image_A = split_down(d_all, r_t, a.image_A.shape)
    dx = launch_gemm(dy, a.weight, a2=dp, b2=a_all) if needs.x else x.new_empty(0)
    dw = dy.t() @ x if needs.weight else x.new_empty(0)
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if needs.bias else x.new_empty(0)
    return Grads(dx, dw, db, d_text_A, d_text_B, d_image_A, d_image_B)


# Under the interpreter (CPU tensors) it is correct but slow: `auto` and moss bench skip it.
BACKEND = Backend("triton", forward, backward,
                  devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                  dtypes=(torch.float16, torch.bfloat16, torch.float32), preference=2,
                  interpreted=INTERPRET)
