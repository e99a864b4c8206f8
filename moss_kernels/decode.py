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
                 ring[t, (pos[t] + (p - K + 1) W[t] + q - K + 1) % S, tap (p, q)'s R_i columns]
    y[t]      += s_i B_i z[t]

(row, col) = divmod(pos[t], W[t]): each sequence's image has its own width (Emu3 sizes each
image; rows separated by other tokens are fine, those tokens are text steps), and S must be at
least ring_size(K, W[t]) for every t. Nothing depends on the data's values for its shape or control
flow: no host sync, the same shapes every step (a CUDA graph can capture it; torch.compile
compiles it once). It is one custom op, ``moss::decode`` (opaque to torch.compile, like the full
op), which hands the step to its backend's ``decode`` (moss_kernels/backends.py):

* ``reference``: :func:`moss_kernels.reference.decode`, the specification, in PyTorch ops;
* ``cuda``: ``moss::_ext_decode``, the composition of csrc/cuda/decode_impl.h (three GEMVs
  around the decode_taps kernel);
* ``cpu``: ``moss::_ext_decode``'s CPU kernel, with a rank space of its own
  (csrc/cpu/decode_cpu.cpp: only the token's route's rows and columns, per-token index
  arithmetic, the adapters' reads shared out over the threads), called straight rather than
  through the dispatcher (``moss_kernels._C._decode_cpu``). As ~25 PyTorch calls per layer and
  token the step cost 2.4x PEFT LoRA's decode; as the GPU's composition run on one CPU thread,
  1.3x the plain model's (#16);
* ``triton``: cuBLAS products around a Triton taps kernel (moss_kernels/triton/decode.py);
* ``cuda-emulated``: the CUDA composition and kernel on CPU tensors (tests).

The kernels have no autograd: with gradients on for any input, :func:`moss_decode` runs the
(differentiable) reference. The ring's dtype is :func:`ring_dtype` of x's: float32 for float16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import backends
from .reference import decode as reference_decode
from .reference import ring_dtype, stack_down

__all__ = ["moss_decode", "pack", "ring_dtype", "ring_size"]


def ring_size(kernel_size: int, width: int) -> int:
    """Ring slots a K x K causal window over rows of ``width`` needs: the token itself and the
    ``(K - 1) (W + 1)`` before it."""
    return (kernel_size - 1) * (width + 1) + 1


def pack(text_A: Tensor, text_B: Tensor, image_A: Tensor, image_B: Tensor, text_scale: float,
         image_scale: float) -> tuple[Tensor, Tensor]:
    """``(a_all [R_t + K*K*R_i, D_in], b_cat [D_out, R_t + R_i])``: the adapters as a decode
    step reads them (differentiable: the layer packs them per step when gradients are on).
    ``b_cat`` is column-major (``b_cat.t()`` contiguous): the CPU step adds ``z_j`` times its
    columns to y, each a contiguous run over D_out, and reads only the token's route's columns;
    any layout is accepted (others are copied per call)."""
    b_cat = torch.cat([text_B * text_scale, image_B * image_scale], dim=1)
    return stack_down(text_A, image_A), b_cat.t().contiguous().t()


def moss_decode(x: Tensor, weight: Tensor, bias: Tensor | None, a_all: Tensor, b_cat: Tensor,
                ring: Tensor, kind: Tensor, pos: Tensor, width: Tensor | int, r_text: int,
                kernel_size: int, backend: str | None = None) -> Tensor:
    """One decode step (the module docstring): ``y [B, D_out]`` (``[B, 1, D_out]`` for ``x
    [B, 1, D_in]``); ``ring`` is updated in place.

    Args:
        x: ``[B, D_in]``, one new token per sequence, or ``[B, 1, D_in]`` (a layer's input as it
            comes: every backend takes its rows without a view in Python, ~10 us a layer
            inside a model on the dev CPU; #16).
        weight, bias: the frozen layer, in x's dtype.
        a_all, b_cat: the adapters, :func:`pack`'s (R_t and R_i may be 0), in x's dtype.
        ring: ``[B, S, K*K*R_i]``, contiguous, in :func:`ring_dtype` of x's; S may be 0 (no
            image layout), else at least :func:`ring_size`.
        kind: ``[B]`` int8: 0 text, 1 image, -1 neither (padding).
        pos: ``[B]`` int64: an image token's position in its image, row-major.
        width: ``[B]`` int64, the width of each sequence's image (an int: the same for all);
        r_text: R_t; kernel_size: K.
        backend: a name of moss_kernels.BACKENDS, or None: chosen as for the full op (the
            ``MOSS_KERNELS_BACKEND`` variable, else the best that runs on x's device and dtype).
    """
    inputs = (x, weight, bias, a_all, b_cat)
    if isinstance(width, int):
        width = torch.full((x.shape[0],), width, device=x.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        check_args(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size)
        return reference_decode(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                                kernel_size)
    args = (x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size)
    if torch.compiler.is_compiling():
        return decode_op(*args, backends.resolve(backend, x.device.type, x.dtype))
    return decode_step(backend, x.device, x.dtype)(*args)


def decode_step(backend: str | None, device: torch.device, dtype: torch.dtype) -> Callable:
    """:func:`moss_decode`, eager, for inputs that need no gradient, its backend resolved once:
    ``step(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size) -> y``
    (``width`` a tensor). A layer keeps one per generation: a small model's decode step is short
    enough that resolving per layer and token shows (#16). Eagerly the step goes straight to the
    backend: the custom op's Python dispatch costs ~110 us per call on the dev CPU, several times
    the CPU step itself (torch.compile traces the op instead: :func:`moss_decode`)."""
    return _eager(backends.resolve(backend, device.type, dtype))


def _eager(name: str) -> Callable:
    """Backend ``name``'s decode, its arguments checked (the C++ and Triton kernels check their
    own)."""
    impl = backends.implementation(name).decode
    if impl is not reference_decode:
        return impl

    def checked(*args):
        check_args(*args)
        return impl(*args)
    return checked


@torch.library.custom_op("moss::decode", mutates_args=("ring",))
def decode_op(x: Tensor, weight: Tensor, bias: Tensor | None, a_all: Tensor, b_cat: Tensor,
              ring: Tensor, kind: Tensor, pos: Tensor, width: Tensor, r_text: int,
              kernel_size: int, backend: str) -> Tensor:
    """:func:`moss_decode` on backend ``backend`` (a resolved name), for torch.compile."""
    return _eager(backend)(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                           kernel_size)


@decode_op.register_fake
def _decode_fake(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size,
                 backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def check_args(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text, kernel_size):
    """The decode step's arguments, as csrc/cuda/decode_impl.h checks them (for the Python
    backends): a ValueError or TypeError naming the argument."""
    def need(ok: bool, error: type[Exception], message: str) -> None:
        if not ok:
            raise error(message)

    need(x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1), ValueError,
         f"x: expected [B, D_in] or [B, 1, D_in], got {tuple(x.shape)}")
    (b, d_in), k, r_t = (x.shape[0], x.shape[-1]), kernel_size, r_text
    need(weight.dim() == 2 and weight.shape[1] == d_in, ValueError,
         f"weight: expected [D_out, {d_in}], got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    need(bias is None or tuple(bias.shape) == (d_out,), ValueError, f"bias: expected [{d_out}]")
    need(k >= 1 and r_t >= 0, ValueError,
         f"kernel_size: expected >= 1, r_text >= 0; got {k}, {r_t}")
    need(a_all.dim() == 2 and a_all.shape[1] == d_in and a_all.shape[0] >= r_t
         and (a_all.shape[0] - r_t) % (k * k) == 0, ValueError,
         f"a_all: expected [R_T + K*K*R_I, {d_in}], got {tuple(a_all.shape)}")
    r_i = (a_all.shape[0] - r_t) // (k * k)
    need(tuple(b_cat.shape) == (d_out, r_t + r_i), ValueError,
         f"b_cat: expected [{d_out}, {r_t + r_i}], got {tuple(b_cat.shape)}")
    need(ring.dim() == 3 and ring.shape[0] == b and (ring.shape[1] == 0
                                                     or ring.shape[2] == k * k * r_i)
         and ring.is_contiguous(), ValueError,
         f"ring: expected a contiguous [{b}, S, {k * k * r_i}] tensor, got {tuple(ring.shape)}")
    need(kind.dtype == torch.int8 and tuple(kind.shape) == (b,), TypeError,
         f"kind: expected an int8 [{b}] tensor, got {kind.dtype} {tuple(kind.shape)}")
    need(pos.dtype == torch.int64 and tuple(pos.shape) == (b,), TypeError,
         f"pos: expected an int64 [{b}] tensor, got {pos.dtype} {tuple(pos.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("a_all", a_all), ("b_cat", b_cat)):
        if t is not None:
            need(t.dtype == x.dtype and t.device == x.device, TypeError,
                 f"{name}: expected x's dtype {x.dtype} on {x.device}, got {t.dtype} on "
                 f"{t.device}")
    want = ring_dtype(x.dtype)
    need(ring.dtype == want and ring.device == x.device, TypeError,
         f"ring: expected {want} on {x.device} (for {x.dtype} inputs), got {ring.dtype} on "
         f"{ring.device}")
    need(isinstance(width, Tensor) and width.dtype == torch.int64
         and tuple(width.shape) == (b,), TypeError,
         f"width: expected an int64 [{b}] tensor, got {_describe(width)}")
    need(kind.device == x.device and pos.device == x.device and width.device == x.device,
         ValueError, f"kind, pos, width: expected them on x's device {x.device}")
    if width.device.type == "cpu" and b:  # values where they are on the host (no device sync)
        need(bool((width >= 1).all()), ValueError, f"width: expected values >= 1, got {width}")
        widest = int(width.max())
        need(ring.shape[1] == 0 or ring.shape[1] >= ring_size(k, widest), ValueError,
             f"ring: expected at least {ring_size(k, widest)} slots (ring_size for the widest "
             f"image, {widest}), got {ring.shape[1]}")


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
