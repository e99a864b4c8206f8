"""moss_decode: one incremental decode step of a MOSS linear layer (docs/design.md section 5).

During generation with a KV cache every sequence of the batch brings one new token per step, a
text token, an image token at some position of its image, or padding. A MOSS layer then
computes the base GEMV, the text LoRA for text tokens, and for image tokens the causal K x K
convolution of the ConvLoRA, which needs the tap products ``A_tap x`` of the K-1 previous rows'
tokens: the layer keeps them in a *ring* ``[B, S, K*K*R_i]`` of the last ``S = ring_size(K,
W)`` image tokens of each sequence (slot ``pos % S``), a fixed-shape buffer allocated once per
generation (a static cache, as gpt-fast keeps its KV cache), updated in place. The adapters
come packed (:func:`pack`, once per generation): ``a_all = [A_t; A_taps]`` (the full op's
``stack_down``) and ``b_cat = [s_t B_t | s_i B_i]``. One step:

    y          = x W^T + b;   P = x a_all^T
    y[t]      += s_t B_t P[t, :R_t]                                      kind[t] == 0 (text)
    ring[t, pos[t] % S] = P[t, R_t:]                                     kind[t] == 1 (image)
    z[t]       = sum over taps (p, q) with row + p - K + 1 >= 0 and col + q - K + 1 >= 0 of
                 ring[t, (pos[t] + (p - K + 1) W + q - K + 1) % S, tap (p, q)'s R_i columns]
    y[t]      += s_i B_i z[t]

(row, col) = divmod(pos[t], W). Nothing depends on the data's values for its shape or control
flow: no host sync, the same shapes every step (a CUDA graph can capture it; torch.compile
compiles it once). On CPU with the compiled extension it is one op, ``moss::_ext_decode``
(csrc/cpu/decode_cpu.cpp: three GEMVs and a loop, where ~25 PyTorch calls per layer and token
cost 2.4x PEFT LoRA's decode, #16); elsewhere :func:`reference_decode`, its specification, in
PyTorch (on a GPU: about ten small kernels per layer; a fused Triton/CUDA decode kernel is
still to come).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext
from .reference import stack_down

__all__ = ["moss_decode", "pack", "ring_size"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def ring_size(kernel_size: int, width: int) -> int:
    """Ring slots a K x K causal window over rows of ``width`` needs: the token itself and the
    ``(K - 1) (W + 1)`` before it."""
    return (kernel_size - 1) * (width + 1) + 1


def pack(text_A: Tensor, text_B: Tensor, image_A: Tensor, image_B: Tensor, text_scale: float,
         image_scale: float) -> tuple[Tensor, Tensor]:
    """``(a_all [R_t + K*K*R_i, D_in], b_cat [D_out, R_t + R_i])``: the adapters as a decode
    step reads them (differentiable: the layer packs them per step when gradients are on)."""
    return stack_down(text_A, image_A), torch.cat(
        [text_B * text_scale, image_B * image_scale], dim=1)


def moss_decode(x: Tensor, weight: Tensor, bias: Tensor | None, a_all: Tensor, b_cat: Tensor,
                ring: Tensor, kind: Tensor, pos: Tensor, width: int, r_text: int,
                kernel_size: int, backend: str | None = None) -> Tensor:
    """One decode step (the module docstring): ``y [B, D_out]``; ``ring`` is updated in place.

    Args:
        x: ``[B, D_in]``, one new token per sequence.
        weight, bias: the frozen layer.
        a_all, b_cat: the adapters, :func:`pack`'s (R_t and R_i may be 0).
        ring: ``[B, S, K*K*R_i]``, contiguous, in x's dtype; S may be 0 (no image layout).
        kind: ``[B]`` int8: 0 text, 1 image, -1 neither (padding).
        pos: ``[B]`` int64: an image token's position in its image, row-major.
        width: the images' width W; r_text: R_t; kernel_size: K.
        backend: ``"reference"`` for :func:`reference_decode`; otherwise the CPU kernel where
            it runs (CPU tensors of its dtypes, the extension built), else the reference.

    The CPU kernel has no autograd: with gradients on for any input this runs the (differentiable)
    reference instead.
    """
    inputs = (x, weight, bias, a_all, b_cat)
    if (backend != "reference" and x.device.type == "cpu" and x.dtype in _CPU_DTYPES
            and _ext.loaded()
            and not (torch.is_grad_enabled()
                     and any(t is not None and t.requires_grad for t in inputs))):
        return torch.ops.moss._ext_decode(x, weight, bias, a_all, b_cat, ring, kind, pos, width,
                                          r_text, kernel_size)
    return reference_decode(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                            kernel_size)


def reference_decode(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                     kernel_size) -> Tensor:
    """:func:`moss_decode` in PyTorch ops, on any device and dtype: the specification."""
    k, r_t = kernel_size, r_text
    r = b_cat.shape[1] - r_t
    p = F.linear(x, a_all)  # [B, R_t + K*K*R_i]
    z_t = torch.where((kind == 0)[:, None], p[:, :r_t], 0)
    z_i = x.new_zeros(x.shape[0], r)
    slots = ring.shape[1]
    if r and slots:
        batch = torch.arange(x.shape[0], device=x.device)
        is_image = kind == 1
        slot = pos % slots
        ring[batch, slot] = torch.where(is_image[:, None], p[:, r_t:], ring[batch, slot])
        row, col = pos // width, pos % width
        for i in range(k):  # causal: offsets -(K-1)..0 in rows and columns
            for q in range(k):
                dr, dc, tap = i - (k - 1), q - (k - 1), i * k + q
                ok = is_image & (row + dr >= 0) & (col + dc >= 0)
                src = (pos + dr * width + dc) % slots
                z_i = z_i + torch.where(ok[:, None], ring[batch, src, tap * r:(tap + 1) * r], 0)
    return F.linear(x, weight, bias) + F.linear(torch.cat([z_t, z_i], dim=1), b_cat)
