"""LoRA dropout's keep mask, packed in bits; on CPU a hash of (seed, element index).

:func:`dropout_mask` is what ``moss_linear(..., adapter_dropout=p)`` draws per call for its
``[N, D]`` input: each element kept with probability ``1 - p``; the ops read ``x * keep / (1 -
p)`` (moss_kernels/linear.py). The format, which every backend reads:

    uint8 [N, 8 * ceil(D / 64)]: bit c % 8 of byte c // 8 of row t keeps x[t, c]; bits past D are 0

Bits, not a bool tensor: an eighth of the memory the autograd context keeps, and the CPU kernels
turn a vector's 4-16 bits into its lane condition in a few instructions (a byte per element needs a
conversion GCC does not vectorise); rows of whole 64-bit words so that no read runs past a row.
:func:`pack` / :func:`unpack` convert from / to a bool ``[N, D]`` tensor. On CPU with the
compiled extension the mask is the custom op ``moss::dropout_mask(x, seed, p)``:

    keep[t, c] = hash(seed, i) >= p * 2^32,   i = t * D + c (x's contiguous index)

with ``seed`` one int64 drawn from
torch's default (CPU) generator per call, so ``torch.manual_seed`` reproduces it and gradient
checkpointing, which replays the RNG state, recomputes the same mask. Why a hash: on CPU
``bernoulli_`` costs ~5 ns an element (F.dropout at d 512 was a third of a MOSS training step,
bench/results/README.md, #15); the hash costs about a cycle. Elsewhere (CUDA, where
``bernoulli_`` is one fast pass; or without the extension) the mask is ``bernoulli_``'s: the same
distribution, another random stream.

:func:`_hash_keep` is the hash in torch ops: the op's implementation where the C++ kernel
(csrc/cpu/dropout_cpu.cpp) is not registered, and its specification, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ext

__all__ = ["dropout_mask", "pack", "unpack"]

_M32 = 0xFFFFFFFF


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """A fresh LoRA dropout mask for the ``[N, D]`` input ``x``, packed (see above), on ``x``'s
    device; each element kept with probability ``1 - p``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected [N, D], got shape {tuple(x.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    if x.device.type != "cpu":
        return pack(torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p))
    seed = torch.randint(1 << 62, (), dtype=torch.int64, device="cpu")
    return hashed_mask(x, seed, float(p))


def packed_width(d: int) -> int:
    """Bytes per row of a packed mask for rows of ``d`` elements: whole 64-bit words."""
    return (d + 63) // 64 * 8


def pack(keep: Tensor) -> Tensor:
    """A bool ``[N, D]`` mask in the packed format."""
    n, d = keep.shape
    width = packed_width(d)
    padded = keep.new_zeros(n, width * 8)
    padded[:, :d] = keep
    weights = 2 ** torch.arange(8, device=keep.device, dtype=torch.int32)
    return (padded.view(n, width, 8).int() * weights).sum(-1).to(torch.uint8)


def unpack(bits: Tensor, d: int) -> Tensor:
    """The bool ``[N, d]`` mask of a packed one."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :d].bool()


@torch.library.custom_op("moss::dropout_mask", mutates_args=())
def hashed_mask(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """The packed keep mask of the ``[N, D]`` input ``x`` for ``seed`` (only ``x``'s shape and
    device are read)."""
    if x.device.type == "cpu" and _ext.loaded():
        return torch.ops.moss._ext_dropout_mask(x, seed, p)
    return pack(_hash_keep(x, seed, p))


@hashed_mask.register_fake
def _hashed_mask_fake(x, seed, p):
    return torch.empty(x.shape[0], packed_width(x.shape[1]), dtype=torch.uint8, device=x.device)


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32  # int64 products wrap; their low 32 bits are exact
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _hash_keep(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """The op in torch ops, as a bool tensor of ``x``'s shape: csrc/cpu/dropout_cpu.cpp's hash
    and threshold, bit for bit."""
    i = torch.arange(x.numel(), device=x.device, dtype=torch.int64)
    s = seed.to(device=x.device, dtype=torch.int64)
    s_lo, s_hi = s & _M32, (s >> 32) & _M32
    key = _fmix32(s_lo ^ _fmix32((s_hi + 0x9E3779B9 * ((i >> 32) + 1)) & _M32))
    h = _fmix32((_fmix32((i & _M32) ^ key) + key) & _M32)
    threshold = min(math.floor(math.ldexp(p, 32) + 0.5), _M32)  # llround's, for p >= 0
    return (h >= threshold).view(x.shape)
