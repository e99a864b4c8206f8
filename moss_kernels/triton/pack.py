"""Packing the adapter weights for the fused expands, their non-finite entries set aside.

    pack_up:    Bcat [D_out, R_T + R_I] = [B_T | B_I]                  bad [2, D_out]
    pack_down:  A_all [R_T + K*K*R_I, D_in] = [A_T ; A_I[:, :, 0, 0] ; A_I[:, :, 0, 1] ; ...]
                                                                      bad [2, D_in]

with every NaN / Inf entry replaced by 0 and ``bad[r, j] = 1`` when route r's part of output
column j held one. The expand GEMM (gemm.py) then runs on finite weights, so the zeros routing
leaves in ``z`` / ``dP`` for other routes' rows never meet a NaN (0 * NaN), and its ``POISON``
epilogue puts NaN back where a row of route r reads a bad column of route r's weights: a
non-finite value reaches exactly the rows that read it (docs/design.md section 3). One launch
each, replacing the concatenation the expand needed anyway. A program handles BLOCK_D output
columns and loops over the rank rows in BLOCK_R chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import INTERPRET, empty

BLOCK_D = 32 if INTERPRET else 128
BLOCK_R = 16


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) != float("inf"))


@triton.jit
def _pack_rows(src_ptr, width, out_ptr, col0, ld_out, rows, d_ok, BLOCK_D: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """out[rows, col0:col0 + width] = src[rows, :width] (rows of stride width) with non-finite
    entries zeroed; returns, per row, whether one was."""
    offs_r = tl.arange(0, BLOCK_R)
    bad = tl.zeros((BLOCK_D,), dtype=tl.int32)
    for r0 in range(0, width, BLOCK_R):
        cols = r0 + offs_r
        ok = d_ok[:, None] & (cols < width)[None, :]
        v = tl.load(src_ptr + rows[:, None] * width + cols[None, :], mask=ok, other=0.0)
        fin = _finite(v)
        bad = tl.maximum(bad, tl.max((~fin & ok).to(tl.int32), axis=1))
        tl.store(out_ptr + rows[:, None] * ld_out + (col0 + cols)[None, :],
                 tl.where(fin, v, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
    return bad


@triton.jit
def _pack_up_kernel(
    text_ptr,    # [D, R_T] (B_T, contiguous)
    image_ptr,   # [D, R_I] (B_I, contiguous)
    out_ptr,     # [D, R_T + R_I], written
    bad_ptr,     # [2, D] uint8, written
    D, R_T, R_I,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = offs_d.to(tl.int64)
    bad_text = _pack_rows(text_ptr, R_T, out_ptr, 0, R_T + R_I, rows, d_ok, BLOCK_D, BLOCK_R)
    bad_image = _pack_rows(image_ptr, R_I, out_ptr, R_T, R_T + R_I, rows, d_ok, BLOCK_D, BLOCK_R)
    tl.store(bad_ptr + offs_d, bad_text.to(tl.uint8), mask=d_ok)
    tl.store(bad_ptr + D + offs_d, bad_image.to(tl.uint8), mask=d_ok)


@triton.jit
def _pack_down_kernel(
    text_ptr,    # [R_T, D] (A_T, contiguous)
    image_ptr,   # [R_I, D, KK] (A_I, contiguous)
    out_ptr,     # [R_T + KK*R_I, D], written
    bad_ptr,     # [2, D] uint8, written
    D, R_T, R_I,
    KK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = offs_d.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    bad_text = tl.zeros((BLOCK_D,), dtype=tl.int32)
    bad_image = tl.zeros((BLOCK_D,), dtype=tl.int32)
    for r0 in range(0, R_T, BLOCK_R):
        rows = (r0 + offs_r).to(tl.int64)
        ok = (rows < R_T)[:, None] & d_ok[None, :]
        v = tl.load(text_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
        fin = _finite(v)
        bad_text = tl.maximum(bad_text, tl.max((~fin & ok).to(tl.int32), axis=0))
        tl.store(out_ptr + rows[:, None] * D + cols[None, :],
                 tl.where(fin, v, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
    for tap in tl.static_range(KK):
        for r0 in range(0, R_I, BLOCK_R):
            rows = (r0 + offs_r).to(tl.int64)
            ok = (rows < R_I)[:, None] & d_ok[None, :]
            v = tl.load(image_ptr + (rows[:, None] * D + cols[None, :]) * KK + tap, mask=ok,
                        other=0.0)
            fin = _finite(v)
            bad_image = tl.maximum(bad_image, tl.max((~fin & ok).to(tl.int32), axis=0))
            tl.store(out_ptr + (R_T + tap * R_I + rows)[:, None] * D + cols[None, :],
                     tl.where(fin, v, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(bad_ptr + offs_d, bad_text.to(tl.uint8), mask=d_ok)
    tl.store(bad_ptr + D + offs_d, bad_image.to(tl.uint8), mask=d_ok)


def pack_up(text_B: torch.Tensor, image_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Bcat [D_out, R], bad [2, D_out])`` as the module docstring says."""
    d, r_t, r_i = text_B.shape[0], text_B.shape[1], image_B.shape[1]
    out = empty(d, r_t + r_i, dtype=text_B.dtype, device=text_B.device)
    bad = torch.empty(2, d, dtype=torch.uint8, device=text_B.device)
    if d:
        _pack_up_kernel[(triton.cdiv(d, BLOCK_D),)](
            text_B.contiguous(), image_B.contiguous(), out, bad, d, r_t, r_i,
            BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R)
    return out, bad


def pack_down(text_A: torch.Tensor, image_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_all [R_T + K*K*R_I, D_in], bad [2, D_in])`` as the module docstring says."""
    r_t, d = text_A.shape
    r_i, _, k, _ = image_A.shape
    out = empty(r_t + k * k * r_i, d, dtype=text_A.dtype, device=text_A.device)
    bad = torch.empty(2, d, dtype=torch.uint8, device=text_A.device)
    if d:
        _pack_down_kernel[(triton.cdiv(d, BLOCK_D),)](
            text_A.contiguous(), image_A.contiguous(), out, bad, d, r_t, r_i,
            KK=k * k, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R)
    return out, bad
