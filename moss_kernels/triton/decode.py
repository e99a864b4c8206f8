"""The decode step (moss_kernels/decode.py) on the Triton backend.

Three cuBLAS products and one Triton kernel per layer per step:

    y = x W^T + b;  P = x A_all^T            cuBLAS (P in the rank dtype: fp32 for fp16)
    z, ring's new slots = taps(P, ring)      _decode_taps_kernel, one program per sequence
    y += z Bcat^T                            cuBLAS

Why cuBLAS for the products: a decode step has one row per sequence, and what it costs is
reading W; cuBLAS's small-M kernels spread that read over every SM, where gemm.py's tiles
(BLOCK_M >= 16 rows) would give one program per BLOCK_N columns and leave most SMs idle. The
kernel does what needs routing: per sequence, its new tap products into the ring slot of its
position, and the K x K causal window's sum from the ring (the token's own tap straight from P:
no program reads a slot this launch writes, so there is no ordering to rely on). Nothing here
reads the data on the host: a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemm import empty
from .route import block_r


@triton.jit
def _decode_taps_kernel(
    p_ptr,      # [B, R_T + K*K*R_I] tap products (the ring's dtype)
    ring_ptr,   # [B, S, K*K*R_I], contiguous; slots of image tokens written
    kind_ptr,   # [B] int8: 0 text, 1 image, -1 neither
    pos_ptr,    # [B] int64: an image token's position in its image, row-major
    width_ptr,  # [B] int64: its image's width
    z_ptr,      # [B, R_T + R_I] fp32, written
    R_T, R_I, S, stride_p, stride_z,
    K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_R)
    # kind and pos as vectors (one value repeated): masks built from them combine with column
    # masks (a scalar condition does not, in the interpreter)
    kind = tl.load(kind_ptr + t + 0 * offs)
    pos = tl.load(pos_ptr + t + 0 * offs)
    W = tl.maximum(tl.load(width_ptr + t + 0 * offs), 1)
    for r0 in range(0, R_T, BLOCK_R):
        cols = r0 + offs
        ok = cols < R_T
        v = tl.load(p_ptr + t * stride_p + cols, mask=ok & (kind == 0), other=0.0)
        tl.store(z_ptr + t * stride_z + cols, v.to(tl.float32), mask=ok)
    is_image = (kind == 1) & (0 * offs + S > 0)
    slots = tl.maximum(S, 1)  # S == 0 (no image layout): every image read is masked off
    row, col = pos // W, pos % W
    c = K * K * R_I
    ring_t = ring_ptr + t * S * c
    for r0 in range(0, R_I, BLOCK_R):
        cols = r0 + offs
        ok = cols < R_I
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for tap in tl.static_range(K * K):  # row and column offsets -(K-1)..0
            dr, dc = tap // K - (K - 1), tap % K - (K - 1)
            mine = tl.load(p_ptr + t * stride_p + R_T + tap * R_I + cols, mask=ok & is_image,
                           other=0.0)
            tl.store(ring_t + (pos % slots) * c + tap * R_I + cols, mine, mask=ok & is_image)
            if tap == K * K - 1:
                acc += mine.to(tl.float32)
            else:
                inside = is_image & (row + dr >= 0) & (col + dc >= 0)
                src = tl.where(inside, pos + dr * W + dc, 0) % slots
                acc += tl.load(ring_t + src * c + tap * R_I + cols, mask=ok & inside,
                               other=0.0).to(tl.float32)
        tl.store(z_ptr + t * stride_z + R_T + cols, acc, mask=ok)


def decode(x: Tensor, weight: Tensor, bias: Tensor | None, a_all: Tensor, b_cat: Tensor,
           ring: Tensor, kind: Tensor, pos: Tensor, width: Tensor, r_text: int,
           kernel_size: int) -> Tensor:
    """moss_kernels.decode's step (the module docstring); the arguments checked by
    moss_kernels.decode.check_args."""
    from ..decode import check_args  # (decode.py imports the backends, which import this)

    check_args(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size)
    if x.dim() == 3:  # [B, 1, D_in]: its rows, and y [B, 1, D_out]
        return decode(x[:, 0], weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                      kernel_size).unsqueeze(1)
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    # fp16: fp32 products and y until the last rounding (csrc/cuda/decode_impl.h: Numerics).
    mm = _mm_fp32 if x.dtype == torch.float16 else torch.mm
    with guard:
        y = mm(x, weight.t())
        if bias is not None:
            y += bias
        r = b_cat.shape[1]
        if r:
            p = mm(x, a_all.t())  # [B, R_T + K*K*R_I], the ring's dtype
            z = empty(x.shape[0], r, dtype=torch.float32, device=x.device)
            if x.shape[0]:
                _decode_taps_kernel[(x.shape[0],)](
                    p, ring, kind, pos, width, z, r_text, r - r_text, ring.shape[1], p.stride(0),
                    z.stride(0), K=kernel_size, BLOCK_R=block_r(r_text, r - r_text))
            y.addmm_(z.to(y.dtype), b_cat.to(y.dtype).t())
    return y.to(x.dtype)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated in and returned as fp32: cuBLAS's half GEMM with an fp32 result on
    a GPU (no fp32 copy of W per step); on CPU (the interpreter's tests) through fp32 copies."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()
