"""Reference backend: the MOSS linear forward and backward, and the decode step, in plain
PyTorch, the specification every other backend is tested against (docs/design.md sections 1,
3 and 5).

It follows the rank-space decomposition step for step, every D-wide operation a dense GEMM
(u is the adapters' input: ``x_adapter`` when given, else x):

    P = u A_all^T;  z_t = P_text on text rows;  z_i = sum_tap P_tap[nbr[:, tap]]
    y = x W^T + b + z Bcat^T                                          Bcat = [s_t B_t | s_i B_i]
    dB = dy^T z (scaled);  dz = dy Bcat;  dP = dz_t on text rows | dz_i[nbr_t[:, tap]]
    dA_all = dP^T u;  du = dP A_all;  dW = dy^T x;  db = sum dy
    dx = dy W + du (x_adapter None), or dx = dy W and dx_adapter = du

What it does differently: it runs on any device and in any floating dtype, float64 included;
half-precision inputs are computed in float32 and rounded once at the end, and ``z`` is
returned in that accumulation dtype because the backward reads it for ``dB``. The expands
``z Bcat^T`` and ``dP A_all`` are taken per route and kept to that route's rows, so a NaN or Inf
in one route's weights reaches exactly the rows that read it (a full-width product would put
0 * NaN on every other row); the fused backends do the same by their own means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import Backend, Grads, LinearInputs, Needs


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


def forward(a: LinearInputs) -> tuple[Tensor, Tensor]:
    """``(y [N, D_out] in x.dtype, z [N, R_t + R_i] in the accumulation dtype)``."""
    x, text_A, image_A = a.x, a.text_A, a.image_A
    acc = accumulation_dtype(x.dtype)
    n, r_t, (r_i, _, k, _) = x.shape[0], text_A.shape[0], image_A.shape
    kk = k * k
    xa = x.to(acc)
    p = a.adapter_input.to(acc) @ stack_down(text_A, image_A).to(acc).t()  # [N, R_t + KK*R_i]
    # where, not a 0/1 multiply: a NaN in text_A must not reach other tokens (0 * NaN = NaN).
    z_t = torch.where((a.route == 0).unsqueeze(1), p[:, :r_t], 0)
    taps = p[:, r_t:].reshape(n, kk, r_i)
    # Tap j of token t reads row nbr[t, j] of tap j's column block.
    z_i = _with_zero_row(taps)[_rows(a.nbr), torch.arange(kk, device=x.device)].sum(1)
    z = torch.cat([z_t, z_i], dim=1)
    b_cat = _b_cat(a, acc)
    y = torch.nn.functional.linear(xa, a.weight.to(acc), None if a.bias is None else a.bias.to(acc))
    y += _expand(a.route, z, b_cat, r_t)
    return y.to(x.dtype), z


def backward(a: LinearInputs, dy: Tensor, z: Tensor, needs: Needs) -> Grads:
    """Every gradient; one that ``needs`` does not ask for is an empty tensor."""
    u, weight, text_A, text_B, image_A, image_B = (a.adapter_input, a.weight, a.text_A, a.text_B,
                                                   a.image_A, a.image_B)
    acc = accumulation_dtype(dy.dtype)
    r_t = text_A.shape[0]
    dya, za = dy.to(acc), z.to(acc)
    z_t, z_i = za[:, :r_t], za[:, r_t:]
    d_text_B = (dya.t() @ z_t * a.text_scale).to(text_B.dtype)
    d_image_B = (dya.t() @ z_i * a.image_scale).to(image_B.dtype)
    dz = dya @ _b_cat(a, acc)  # [N, R_t + R_i]
    dp_t = torch.where((a.route == 0).unsqueeze(1), dz[:, :r_t], 0)
    dp_taps = _with_zero_row(dz[:, r_t:])[_rows(a.nbr_t)]  # [N, KK, R_i]: dz_i[nbr_t[s, tap]]
    dp = torch.cat([dp_t, dp_taps.flatten(1)], dim=1)
    a_all = stack_down(text_A, image_A).to(acc)
    d_text_A, d_image_A = split_down(dp.t() @ u.to(acc), r_t, image_A.shape)
    # du, the adapters' input gradient: a term of dx when they read x, else x_adapter's own.
    in_dx = a.x_adapter is None
    du = _expand(a.route, dp, a_all.t(), r_t) if needs.x_adapter or (needs.x and in_dx) else None
    dx = dy.new_empty(0)
    if needs.x:
        dx = dya @ weight.to(acc)
        dx = (dx + du if in_dx else dx).to(dy.dtype)
    dx_adapter = du.to(dy.dtype) if needs.x_adapter else dy.new_empty(0)
    dw = (dya.t() @ a.x.to(acc)).to(weight.dtype) if needs.weight else dy.new_empty(0)
    db = dya.sum(0).to(weight.dtype) if needs.bias else dy.new_empty(0)
    return Grads(dx, dw, db, dx_adapter, d_text_A.to(text_A.dtype), d_text_B,
                 d_image_A.to(image_A.dtype), d_image_B)


def _expand(route: Tensor, z: Tensor, w: Tensor, r_t: int) -> Tensor:
    """``z w^T`` taken per route, ``[N, D]``: the text columns of ``z [N, R]`` / ``w [D, R]``
    (the first ``r_t``) on text rows, the others on image rows, nothing on padding rows."""
    text = torch.where((route == 0).unsqueeze(1), z[:, :r_t] @ w[:, :r_t].t(), 0)
    return text + torch.where((route == 1).unsqueeze(1), z[:, r_t:] @ w[:, r_t:].t(), 0)


def _b_cat(a: LinearInputs, acc: torch.dtype) -> Tensor:
    """``[s_t B_t | s_i B_i]`` in ``acc``: ``[D_out, R_t + R_i]``."""
    return torch.cat([a.text_B.to(acc) * a.text_scale, a.image_B.to(acc) * a.image_scale], dim=1)


def ring_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a decode step's ring of tap products for ``dtype`` inputs: float32 for
    float16 (a tap product can pass 65504 where the layer's output fits, as the full op keeps
    P in float32 for the same reason), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


def decode(x: Tensor, weight: Tensor, bias: Tensor | None, a_all: Tensor, b_cat: Tensor,
           ring: Tensor, kind: Tensor, pos: Tensor, width: Tensor, r_text: int,
           kernel_size: int) -> Tensor:
    """One decode step (moss_kernels/decode.py) in PyTorch ops, differentiable, on any device
    and dtype: the specification. Sums in the accumulation dtype, rounded once to x's dtype; the
    ring in :func:`ring_dtype`. Shapes and control flow never depend on the data."""
    if x.dim() == 3:  # [B, 1, D_in]: its rows, and y [B, 1, D_out]
        return decode(x[:, 0], weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                      kernel_size).unsqueeze(1)
    k, r_t, acc = kernel_size, r_text, accumulation_dtype(x.dtype)
    r = b_cat.shape[1] - r_t
    xa = x.to(acc)
    p = xa @ a_all.to(acc).t()  # [B, R_t + K*K*R_i]
    z_t = torch.where((kind == 0)[:, None], p[:, :r_t], 0)
    z_i = xa.new_zeros(x.shape[0], r)
    slots = ring.shape[1]
    if r and slots:
        batch = torch.arange(x.shape[0], device=x.device)
        is_image = kind == 1
        slot = pos % slots
        mine = p[:, r_t:]
        ring[batch, slot] = torch.where(is_image[:, None], mine.to(ring.dtype), ring[batch, slot])
        width = width.clamp(min=1)
        row, col = pos // width, pos % width
        for tap in range(k * k):  # causal: row and column offsets -(K-1)..0
            dr, dc = tap // k - (k - 1), tap % k - (k - 1)
            ok = is_image & (row + dr >= 0) & (col + dc >= 0)
            cols = slice(tap * r, (tap + 1) * r)
            # The token's own tap straight from p (the ring holds it rounded to its dtype).
            v = mine[:, cols] if tap == k * k - 1 else ring[batch, (pos + dr * width + dc) % slots,
                                                           cols].to(acc)
            z_i = z_i + torch.where(ok[:, None], v, 0)
    y = torch.nn.functional.linear(xa, weight.to(acc), None if bias is None else bias.to(acc))
    return (y + torch.cat([z_t, z_i], dim=1) @ b_cat.to(acc).t()).to(x.dtype)


BACKEND = Backend("reference", forward, backward, decode=decode)
