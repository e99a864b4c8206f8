"""Reference backend: the MOSS linear forward and backward in plain PyTorch (the specification).

For frozen ``W [D_out, D_in]``, ``b [D_out]`` and tokens ``x [N, D_in]`` routed by a RoutingPlan:

    y_t = W x_t + b                                                   route -1 (padding)
    y_t = W x_t + b + s_t B_t A_t x_t                                 route  0 (text)
    y_t = W x_t + b + s_i B_i sum_tap A_i[tap] x_(nbr[t, tap])        route  1 (image)

computed as DESIGN section 3 lays out, every D-wide operation a dense GEMM and the routing and
convolution done in rank space:

    A_all = [A_t ; A_i[:,:,0,0] ; A_i[:,:,0,1] ; ...]                 [R_t + K*K*R_i, D_in]
    P     = x A_all^T                                                 [N, R_t + K*K*R_i]
    z_t   = P[:, :R_t] where route == 0, else 0                       [N, R_t]
    z_i   = sum_tap P_tap[nbr[:, tap]]        (row -1 reads zero)     [N, R_i]
    y     = x W^T + b + [z_t | z_i] [s_t B_t | s_i B_i]^T             [N, D_out]

Backward, with ``Bcat = [s_t B_t | s_i B_i]``:

    dB_t = s_t dy^T z_t,  dB_i = s_i dy^T z_i
    dz   = dy Bcat;  dP_t = dz_t where route == 0;  dP_tap = dz_i[nbr_t[:, tap]]
    dA_all = dP^T x;  dx = dy W + dP A_all;  dW = dy^T x;  db = sum_t dy

(``dz_i`` needs no route mask: ``nbr_t`` only points at image tokens.) Half-precision inputs
are computed in float32 and rounded once at the end; ``z`` is returned in that accumulation
dtype because the backward reads it for ``dB``.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEVICE_TYPES = None  # any device torch supports


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def stack_down(text_A: Tensor, image_A: Tensor) -> Tensor:
    """``A_all [R_t + K*K*R_i, D_in]``: the text down-projection, then one block per conv tap."""
    r_i, d_in, k, _ = image_A.shape
    taps = image_A.permute(2, 3, 0, 1).reshape(k * k * r_i, d_in)
    return torch.cat([text_A, taps], dim=0)


def split_down(d_all: Tensor, r_t: int, image_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`stack_down` (for gradients); the two parts never share memory."""
    r_i, d_in, k, _ = image_shape
    taps = d_all[r_t:].reshape(k, k, r_i, d_in).permute(2, 3, 0, 1)
    return d_all[:r_t], taps.clone(memory_format=torch.contiguous_format)


def _with_zero_row(rows: Tensor) -> Tensor:
    """``rows`` with one zero row appended, which the index -1 of a gather table reads."""
    return torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])


def _rows(table: Tensor) -> Tensor:
    """A gather table (-1 = none) as int64 indices into :func:`_with_zero_row` rows."""
    return torch.where(table < 0, table.shape[0], table.long())


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, text_A: Tensor, text_B: Tensor,
    image_A: Tensor, image_B: Tensor, route: Tensor, nbr: Tensor,
    text_scale: float, image_scale: float,
) -> tuple[Tensor, Tensor]:
    """``(y [N, D_out] in x.dtype, z [N, R_t + R_i] in the accumulation dtype)``."""
    acc = accumulation_dtype(x.dtype)
    n, r_t, (r_i, _, k, _) = x.shape[0], text_A.shape[0], image_A.shape
    kk = k * k
    xa = x.to(acc)
    p = xa @ stack_down(text_A, image_A).to(acc).t()  # [N, R_t + KK*R_i]
    # where, not a 0/1 multiply: a NaN in text_A must not reach other tokens (0 * NaN = NaN).
    z_t = torch.where((route == 0).unsqueeze(1), p[:, :r_t], 0)
    taps = p[:, r_t:].reshape(n, kk, r_i)
    # Tap j of token t reads row nbr[t, j] of tap j's column block.
    z_i = _with_zero_row(taps)[_rows(nbr), torch.arange(kk, device=x.device)].sum(1)
    z = torch.cat([z_t, z_i], dim=1)
    b_cat = torch.cat([text_B.to(acc) * text_scale, image_B.to(acc) * image_scale], dim=1)
    y = torch.nn.functional.linear(xa, weight.to(acc), None if bias is None else bias.to(acc))
    # In place into the fresh y: the GEMM accumulates (beta = 1) instead of a second pass.
    y.addmm_(z, b_cat.t())
    return y.to(x.dtype), z


def backward(
    dy: Tensor, x: Tensor, weight: Tensor, text_A: Tensor, text_B: Tensor,
    image_A: Tensor, image_B: Tensor, z: Tensor, route: Tensor, nbr_t: Tensor,
    text_scale: float, image_scale: float, need_dx: bool, need_dweight: bool, need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dW, db, dA_t, dB_t, dA_i, dB_i)``; a gradient not asked for is an empty tensor."""
    acc = accumulation_dtype(x.dtype)
    r_t = text_A.shape[0]
    dya, xa, za = dy.to(acc), x.to(acc), z.to(acc)
    z_t, z_i = za[:, :r_t], za[:, r_t:]
    d_text_B = (dya.t() @ z_t * text_scale).to(text_B.dtype)
    d_image_B = (dya.t() @ z_i * image_scale).to(image_B.dtype)
    b_cat = torch.cat([text_B.to(acc) * text_scale, image_B.to(acc) * image_scale], dim=1)
    dz = dya @ b_cat  # [N, R_t + R_i]
    dp_t = torch.where((route == 0).unsqueeze(1), dz[:, :r_t], 0)
    dp_taps = _with_zero_row(dz[:, r_t:])[_rows(nbr_t)]  # [N, KK, R_i]: dz_i[nbr_t[s, tap]]
    dp = torch.cat([dp_t, dp_taps.flatten(1)], dim=1)
    a_all = stack_down(text_A, image_A).to(acc)
    d_text_A, d_image_A = split_down(dp.t() @ xa, r_t, image_A.shape)
    dx = (dya @ weight.to(acc)).addmm_(dp, a_all).to(x.dtype) if need_dx else x.new_empty(0)
    dw = (dya.t() @ xa).to(weight.dtype) if need_dweight else x.new_empty(0)
    db = dya.sum(0).to(weight.dtype) if need_dbias else x.new_empty(0)
    return (dx, dw, db, d_text_A.to(text_A.dtype), d_text_B,
            d_image_A.to(image_A.dtype), d_image_B)
