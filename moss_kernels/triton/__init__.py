"""Triton backend: the MOSS linear forward and backward, decomposed as docs/design.md section 3
lays out.

Forward (``C = R_T + K*K*R_I``; shapes per token row; s the adapter scales; u the adapters'
input, ``x_adapter`` when given, else x):

    P  = u A_all^T                      gemm.py, ROUTE_SKIP    [N, C]     rank dtype
    z  = s * route + convolve P         route.py               [N, R]     fp32 (saved)
    y  = x W^T + z Bcat^T + b           pack.py, gemm.py fused [N, D_out] one pass over y

Backward:

    dz   = dy Bcat                      cuBLAS / gemm.py       [N, R]     fp32
    dBcat = dy^T z                      cuBLAS / gemm.py       [D_out, R] fp32
    dP   = s * gather dz through nbr_t  route.py               [N, C]     rank dtype
    dA_all = dP^T u                     cuBLAS (fp16: gemm.py) [C, D_in]
    dx   = dy W + dP A_all              pack.py, gemm.py fused [N, D_in]  one pass over dx
    dW   = dy^T x,  db = sum dy         cuBLAS (only when they require grad)

With an ``x_adapter`` the two terms of dx are two gradients: ``dx = dy W`` (cuBLAS) and
``dx_adapter = dP A_all`` (pack.py, gemm.py: a reduction over C, poisoned like the fused one).

Triton does what needs fusing or routing; the plain GEMMs whose shape cuBLAS already serves
at its roofline (the reductions over N in particular, where cuBLAS picks split-K
deterministically) stay with ``torch.matmul``. No step does a host sync, and nothing is
accumulated with atomics, so results are deterministic. Launches run with the tensors' GPU as
the current device (the caller's may be another).

Range and rounding. The scales are applied in fp32 to z and dz (route.py), never folded into a
half-precision B; dz and dBcat come out of their GEMMs in fp32 and are rounded once. The
rank-space intermediates P and dP are kept in the input dtype, except for fp16 inputs, where
they are fp32 (:func:`rank_dtype`): fp16 tops out at 65504, and a tap product or routed sum
passes that while the layer's outputs still fit (large ``x A``, small ``B``; or large
``dy B``, small ``A``). They are ``N * C`` values against ``N * D`` for x, and transient. bf16
has fp32's exponent range and keeps its own dtype. Products with an fp32 operand or result run
in the Triton GEMM, which converts in registers (gemm.py), where ``torch.matmul`` would need an
fp32 copy of dy or x. Unmeasured on a GPU so far: the reductions over N in the Triton GEMM have
no split-K (cuBLAS's edge); their FLOPs are R / D of the layer's.

Non-finite weights. The fused expands run on the finite part of Bcat / A_all and their epilogue
puts NaN on exactly the rows of the route that reads a bad column (pack.py), so a NaN in one
route's adapter never reaches another route's rows.

On CPU tensors this backend runs only under the Triton interpreter (``TRITON_INTERPRET=1`` in
the environment before this module is imported), which is how the tests exercise it without a
GPU; there it refuses bf16, which the interpreter computes wrongly (docs/design.md section 8).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..backends import Backend, Grads, LinearInputs, Needs
from ..reference import split_down, stack_down
from .decode import decode
from .gemm import INTERPRET, launch_gemm
from .pack import pack_down, pack_up
from .route import route_backward, route_forward


def rank_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-space intermediates P, dP for ``dtype`` inputs (see Range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _matmul(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``out_dtype``: cuBLAS when all three dtypes agree, else the Triton GEMM."""
    if a.dtype == b.dtype == out_dtype:
        return a @ b
    return launch_gemm(a, b, out_dtype=out_dtype)


def _on_device(fn):
    """Run ``fn(inputs, ...)`` with the inputs' GPU current: Triton launches on the current
    device, which may not be the tensors' (as the CUDA extension's device guard ensures)."""
    @functools.wraps(fn)
    def guarded(a: LinearInputs, *args):
        device = a.weight.device  # x may be absent in the backward
        if device.type != "cuda":
            return fn(a, *args)
        with torch.cuda.device(device):
            return fn(a, *args)

    return guarded


@_on_device
def forward(a: LinearInputs) -> tuple[Tensor, Tensor]:
    x, r_t, r_i = a.x, a.text_A.shape[0], a.image_A.shape[0]
    p = launch_gemm(a.adapter_input, stack_down(a.text_A, a.image_A).t(), route=a.route,
                    r_t=r_t, out_dtype=rank_dtype(x.dtype))
    z = route_forward(p, a.route, a.nbr, r_t, r_i, a.text_scale, a.image_scale)
    b_cat, bad = pack_up(a.text_B, a.image_B)
    y = launch_gemm(x, a.weight.t(), a2=z, b2=b_cat.t(), bias=a.bias, poison=(a.route, bad))
    return y, z


@_on_device
def backward(a: LinearInputs, dy: Tensor, z: Tensor, needs: Needs) -> Grads:
    u, r_t, r_i = a.adapter_input, a.text_A.shape[0], a.image_A.shape[0]
    fp32 = torch.float32
    # dz reads B as it is: a non-finite entry reaches dz columns only its route's rows read.
    dz = _matmul(dy, torch.cat([a.text_B, a.image_B], dim=1), fp32)  # [N, R], unscaled
    d_b_cat = _matmul(dy.t(), z, fp32)  # [D_out, R]: z carries the scales
    # (Copies: custom-op outputs may not share memory.)
    d_text_B = d_b_cat[:, :r_t].to(a.text_B.dtype, copy=True, memory_format=torch.contiguous_format)
    d_image_B = d_b_cat[:, r_t:].to(a.image_B.dtype, copy=True,
                                    memory_format=torch.contiguous_format)
    rank = rank_dtype(dy.dtype)
    dp = route_backward(dz, a.route, a.nbr_t, r_t, r_i, a.text_scale, a.image_scale, rank)
    d_all = _matmul(dp.t(), u, rank).to(u.dtype)  # [C, D_in]
    d_text_A, d_image_A = split_down(d_all, r_t, a.image_A.shape)
    dx, dx_adapter = dy.new_empty(0), dy.new_empty(0)
    if needs.x and a.x_adapter is not None:
        dx = dy @ a.weight
    elif needs.x:  # the adapters read x: their input gradient is dx's second reduction
        a_all, bad = pack_down(a.text_A, a.image_A)
        dx = launch_gemm(dy, a.weight, a2=dp, b2=a_all, poison=(a.route, bad))
    if needs.x_adapter:
        a_all, bad = pack_down(a.text_A, a.image_A)
        dx_adapter = launch_gemm(dp, a_all, out_dtype=dy.dtype, poison=(a.route, bad))
    dw = dy.t() @ a.x if needs.weight else dy.new_empty(0)
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if needs.bias else dy.new_empty(0)
    return Grads(dx, dw, db, dx_adapter, d_text_A, d_text_B, d_image_A, d_image_B)


# Under the interpreter (CPU tensors) it is correct but slow, so `auto` and moss bench skip it,
# and it refuses bf16, which the interpreter's dot computes wrongly (docs/design.md section 8).
BACKEND = Backend("triton", forward, backward, decode,
                  devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                  dtypes=(torch.float16, torch.float32) if INTERPRET else (
                      torch.float16, torch.bfloat16, torch.float32),
                  preference=2, emulated=INTERPRET)
