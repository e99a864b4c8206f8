"""Routing and convolution in rank space: the only data-dependent step of the MOSS layer.

Forward (``P [N, C]`` tap products, ``C = R_T + KK*R_I``; ``z [N, R_T + R_I]`` fp32, scaled):

    z[t, :R_T]          = s_t P[t, :R_T]                        if route[t] == 0, else 0
    z[t, R_T + j]       = s_i sum_tap P[nbr[t, tap], R_T + tap*R_I + j]   (nbr -1 reads 0)

Backward (``dz [N, R_T + R_I]`` fp32, unscaled -> ``dP [N, C]``), a gather through the
transposed table, so every output element is written by exactly one program (deterministic, no
atomics):

    dP[s, :R_T]               = s_t dz[s, :R_T]                 if route[s] == 0, else 0
    dP[s, R_T + tap*R_I + j]  = s_i dz[nbr_t[s, tap], R_T + j]  (nbr_t -1 reads 0)

The adapter scales are applied here, in fp32, to the values that meet B (z) and that come from
it (dz): a scale folded into a half-precision B would put that dtype's epsilon on every weight
(docs/design.md section 3). The backend saves this scaled z, so dB = dy^T z needs no scaling.

Both are O(N * KK * R) loads and stores: a few percent of the GEMMs around them. One program
handles BLOCK_T tokens and loops over the rank in BLOCK_R chunks; the KK taps are unrolled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import INTERPRET, empty

BLOCK_T = 16 if INTERPRET else 64


@triton.jit
def _text_columns(src_ptr, dst_ptr, route_ptr, offs_t, N, R_T, stride_src, stride_dst, scale,
                  BLOCK_R: tl.constexpr):
    """dst[t, :R_T] = scale * src[t, :R_T] on text rows, 0 on the others (both directions)."""
    t_ok = offs_t < N
    rows = offs_t.to(tl.int64)
    is_text = tl.load(route_ptr + offs_t, mask=t_ok, other=-1) == 0
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R_T, BLOCK_R):
        cols = r0 + offs_r
        c_ok = cols < R_T
        v = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :],
                    mask=(t_ok & is_text)[:, None] & c_ok[None, :], other=0.0)
        tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :],
                 (v.to(tl.float32) * scale).to(dst_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _route_fwd_kernel(
    p_ptr,       # [N, C] tap products (x dtype)
    route_ptr,   # [N] int8
    nbr_ptr,     # [N, KK] int32
    z_ptr,       # [N, R_T + R_I] fp32, written
    N, R_T, R_I, stride_p, stride_z, text_scale, image_scale,
    KK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _text_columns(p_ptr, z_ptr, route_ptr, offs_t, N, R_T, stride_p, stride_z, text_scale,
                  BLOCK_R)
    t_ok = offs_t < N
    rows = offs_t.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R_I, BLOCK_R):
        cols = r0 + offs_r
        c_ok = cols < R_I
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for tap in tl.static_range(KK):
            src = tl.load(nbr_ptr + rows * KK + tap, mask=t_ok, other=-1)
            col = R_T + tap * R_I + cols
            v = tl.load(p_ptr + src.to(tl.int64)[:, None] * stride_p + col[None, :],
                        mask=(src >= 0)[:, None] & c_ok[None, :], other=0.0)
            acc += v.to(tl.float32)
        tl.store(z_ptr + rows[:, None] * stride_z + (R_T + cols)[None, :], acc * image_scale,
                 mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _route_bwd_kernel(
    dz_ptr,      # [N, R_T + R_I] fp32
    route_ptr,   # [N] int8
    nbr_t_ptr,   # [N, KK] int32
    dp_ptr,      # [N, C], written (the rank dtype)
    N, R_T, R_I, stride_dz, stride_dp, text_scale, image_scale,
    KK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _text_columns(dz_ptr, dp_ptr, route_ptr, offs_t, N, R_T, stride_dz, stride_dp, text_scale,
                  BLOCK_R)
    t_ok = offs_t < N
    rows = offs_t.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    for tap in tl.static_range(KK):
        dst = tl.load(nbr_t_ptr + rows * KK + tap, mask=t_ok, other=-1)
        for r0 in range(0, R_I, BLOCK_R):
            cols = r0 + offs_r
            c_ok = cols < R_I
            v = tl.load(dz_ptr + dst.to(tl.int64)[:, None] * stride_dz + (R_T + cols)[None, :],
                        mask=(dst >= 0)[:, None] & c_ok[None, :], other=0.0)
            tl.store(dp_ptr + rows[:, None] * stride_dp + (R_T + tap * R_I + cols)[None, :],
                     (v.to(tl.float32) * image_scale).to(dp_ptr.dtype.element_ty),
                     mask=t_ok[:, None] & c_ok[None, :])


def block_r(r_t: int, r_i: int) -> int:
    """Rank chunk: the larger rank rounded up to a power of two, within [16, 128]."""
    return min(max(triton.next_power_of_2(max(r_t, r_i, 1)), 16), 128)


def route_forward(p: torch.Tensor, route: torch.Tensor, nbr: torch.Tensor, r_t: int, r_i: int,
                  text_scale: float, image_scale: float) -> torch.Tensor:
    n, kk = nbr.shape
    z = empty(n, r_t + r_i, dtype=torch.float32, device=p.device)
    if n and r_t + r_i:
        _route_fwd_kernel[(triton.cdiv(n, BLOCK_T),)](
            p, route, nbr, z, n, r_t, r_i, p.stride(0), z.stride(0), text_scale, image_scale,
            KK=kk, BLOCK_T=BLOCK_T, BLOCK_R=block_r(r_t, r_i),
        )
    return z


def route_backward(dz: torch.Tensor, route: torch.Tensor, nbr_t: torch.Tensor, r_t: int,
                   r_i: int, text_scale: float, image_scale: float,
                   out_dtype: torch.dtype) -> torch.Tensor:
    n, kk = nbr_t.shape
    dp = empty(n, r_t + kk * r_i, dtype=out_dtype, device=dz.device)
    if n and r_t + r_i:
        _route_bwd_kernel[(triton.cdiv(n, BLOCK_T),)](
            dz, route, nbr_t, dp, n, r_t, r_i, dz.stride(0), dp.stride(0), text_scale,
            image_scale, KK=kk, BLOCK_T=BLOCK_T, BLOCK_R=block_r(r_t, r_i),
        )
    return dp
