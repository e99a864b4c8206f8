"""LoRA dropout whose mask is a hash of (seed, element index): nothing stored, one pass.

:func:`lora_dropout` is what :class:`moss.MossLinear` applies to the adapters' input
(``moss_linear(..., x_adapter=lora_dropout(x, p))``). On CPU with the compiled extension it is
the custom op ``moss::dropout(x, seed, p)``:

    y[i] = keep(seed, i) ? x[i] / (1 - p) : 0,   keep(seed, i) = hash(seed, i) >= p * 2^32

with ``i`` the element's index in ``x``'s contiguous layout and ``seed`` one int64 drawn from
torch's default generator per call (so ``torch.manual_seed`` reproduces it, and gradient
checkpointing, which replays the RNG state, recomputes the same mask). Its backward is the
same op on the gradient with the same seed: no mask is kept. Why: on CPU ``F.dropout``'s
``bernoulli_`` costs ~5 ns an element and its mask another pass each way; at d 512 that was a
third of a MOSS training step (bench/results/README.md, #15). Elsewhere (CUDA, where
``F.dropout`` is already one fused pass; or without the extension) it is ``F.dropout``: the same
distribution (each element kept with probability ``1 - p``, scaled by ``1 / (1 - p)``), another
random stream.

:func:`_hash_dropout` below is the hash in torch ops: the op's implementation where the C++ kernel
(csrc/cpu/dropout_cpu.cpp) is not registered, and its specification, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext

__all__ = ["lora_dropout"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_M32 = 0xFFFFFFFF


def lora_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Dropout for an adapter's input: ``x`` with each element zeroed with probability ``p``
    and the rest scaled by ``1 / (1 - p)``; ``x`` itself when not training or ``p == 0``."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {got}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    if not training or p == 0.0:
        return x
    if not _has_kernel(x):
        return F.dropout(x, p)
    seed = torch.randint(1 << 62, (), dtype=torch.int64, device="cpu")
    return dropout(x, seed, float(p))


def _has_kernel(x: Tensor) -> bool:
    """Whether csrc/cpu/dropout_cpu.cpp runs on ``x``."""
    return x.device.type == "cpu" and x.dtype in _CPU_DTYPES and _ext.loaded()


@torch.library.custom_op("moss::dropout", mutates_args=())
def dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    if _has_kernel(x):
        return torch.ops.moss._ext_dropout(x, seed, p)
    return _hash_dropout(x, seed, p)


@dropout.register_fake
def _dropout_fake(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return dropout(dy.contiguous(), seed, ctx.p), None, None


dropout.register_autograd(_backward, setup_context=_setup_context)


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32  # int64 products wrap; their low 32 bits are exact
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _hash_dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """The op in torch ops: csrc/cpu/dropout_cpu.cpp's hash and mask, bit for bit."""
    i = torch.arange(x.numel(), device=x.device, dtype=torch.int64)
    s = seed.to(device=x.device, dtype=torch.int64)
    s_lo, s_hi = s & _M32, (s >> 32) & _M32
    key = _fmix32(s_lo ^ _fmix32((s_hi + 0x9E3779B9 * ((i >> 32) + 1)) & _M32))
    h = _fmix32((_fmix32((i & _M32) ^ key) + key) & _M32)
    threshold = min(math.floor(math.ldexp(p, 32) + 0.5), _M32)  # llround's, for p >= 0
    keep = (h >= threshold).view(x.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.where(keep, x.to(acc) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)
