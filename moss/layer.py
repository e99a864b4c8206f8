"""MossLinear: a frozen ``nn.Linear`` wrapped (never subclassed) with the MOSS adapters.

The text adapter is the layer's own; the image adapter is its variant's (moss/variants.py).
Every wrapped layer of one model reads the current call's routing from a shared
:class:`moss.router.Router`: a RoutingPlan (built once per call) for full forwards, or the
decode step's token kinds and image positions, with this layer's ring of tap products, for
incremental generation.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import moss_kernels as mk
import moss_kernels.decode as mk_decode
from moss_kernels.decode import moss_decode, pack, ring_dtype, ring_size

from .config import MossConfig
from .router import Router
from .variants import kaiming_parameter


class MossLinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: MossConfig, router: Router,
                 block: int | None = None):
        super().__init__()
        self.base = base
        self._block = block  # the decoder layer holding it (moss/router.py: recomputation)
        self.variant = cfg.variant
        self.window = cfg.window
        self.dropout = cfg.dropout
        self.backend = cfg.backend
        self._router = router
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.text_A = kaiming_parameter((cfg.r_text, d_in), **kw)
        self.text_B = nn.Parameter(torch.zeros(d_out, cfg.r_text, **kw))
        self.text_scale = cfg.alpha_text / cfg.r_text
        self.variant.create(self, cfg, d_in, d_out, **kw)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapter parameters' attribute names (their checkpoint keys under this layer)."""
        return ("text_A", "text_B", *self.variant.params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._router.mode == "decode":
            return self._decode(x)
        y = self._full(x)
        if self._router.fill and self.variant.has_image_adapter and self._router.grid:
            with torch.no_grad():
                self._seed_ring(x)
        return y

    def _seed_ring(self, x: torch.Tensor) -> None:
        """After a prefill, keep the tap products of each row's last L tokens, at the ring
        slots of their positions in the image the prompt ends in (if any); and those of a few
        more tokens, to re-seed from if a crop takes back the prompt's last tokens."""
        router = self._router
        slots = ring_size(self.window, router.grid[1])
        back = torch.arange(slots + len(router.history) - 1, device=x.device)
        rows = (x.shape[1] - 1 - back).clamp(min=0)  # newest first
        dtype = ring_dtype(x.dtype)
        taps = x[:, rows].to(dtype) @ self.variant.taps(self, dtype).t()  # [B, L + extra, K*K*R_i]
        router.seeds[id(self)] = taps
        router.rings[id(self)] = router.seeded_ring(taps, 0, slots)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """A decode call's new tokens (one per sequence, or an assistant's candidates, one after
        the other) through moss_kernels' decode op: the base layer, the text LoRA for text
        tokens, the ConvLoRA from this layer's ring of past tap products for image tokens."""
        router = self._router
        # Eagerly without gradients (generate), what the layer needs is bound once per
        # generation: a small model's decode step is short enough that resolving it per layer
        # and token shows (#16). With gradients, packed every call so that they flow to the
        # parameters; under torch.compile, traced through moss_decode's custom op.
        eager = not (torch.is_grad_enabled() or torch.compiler.is_compiling())
        bound = router.bound.get(id(self)) if eager else None
        if bound is None:
            bound = self._bind(x, eager)
        run, packed, r_text, k = bound
        ring = router.rings[id(self)]
        step = router.step
        tokens = step.tokens if self.variant.has_image_adapter else step.text_tokens
        # One token per sequence: x [B, 1, D_in] as it comes (the op takes it, and returns y
        # [B, 1, D_out]); an assistant's T drafts one after the other, each logging the ring
        # slots it overwrites, in case a crop undoes it.
        xs, log = ((x,), False) if x.shape[1] == 1 else (x.unbind(1), ring.shape[1] > 0)
        ys = []
        for xj, (kind, pos, width) in zip(xs, tokens, strict=True):
            if log:
                batch = torch.arange(ring.shape[0], device=ring.device)
                slot = pos % ring.shape[1]
                router.undo.setdefault(id(self), []).append((slot, ring[batch, slot].clone()))
            ys.append(run(xj, *packed, ring, kind, pos, width, r_text, k))
        return ys[0] if len(ys) == 1 else torch.stack(ys, 1)

    def _bind(self, x: torch.Tensor, keep: bool) -> tuple:
        """``(step, packed weights, R_T, K)`` for decoding ``x`` (kept in the Router for the
        generation when ``keep``), and this layer's ring of past tap products, allocated if the
        prefill seeded none (empty without an image adapter or image layout)."""
        router = self._router
        images = self.variant.has_image_adapter and router.grid is not None
        k = self.window if images else 1
        packed = self._pack(x.dtype, images)
        r_text = self.text_A.shape[0]
        if id(self) not in router.rings:
            slots, columns = (ring_size(k, router.grid[1]), packed[2].shape[0] - r_text) \
                if images else (0, 0)
            router.rings[id(self)] = x.new_zeros(x.shape[0], slots, columns,
                                                 dtype=ring_dtype(x.dtype))
        if not keep:
            return functools.partial(moss_decode, backend=self.backend), packed, r_text, k
        bound = router.bound[id(self)] = (
            mk_decode.decode_step(self.backend, x.device, x.dtype), packed, r_text, k)
        return bound

    def _pack(self, dtype: torch.dtype, images: bool) -> tuple:
        """``(weight, bias, a_all, b_cat)`` in ``dtype``, as the decode op reads them
        (moss_kernels.decode.pack)."""
        bias = self.base.bias
        frozen = (self.base.weight.to(dtype), None if bias is None else bias.to(dtype))
        text = (self.text_A.to(dtype), self.text_B.to(dtype))
        if images:
            return *frozen, *pack(*text, self.variant.image_kernel(self).to(dtype),
                                  self.image_B.to(dtype), self.text_scale, self.image_scale)
        d_out, d_in = self.base.weight.shape
        none = self.text_A.new_zeros(0, d_in, 1, 1, dtype=dtype)
        return *frozen, *pack(*text, none, self.text_A.new_zeros(d_out, 0, dtype=dtype),
                              self.text_scale, 1.0)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        images = self.variant.has_image_adapter
        plan = self._router.plan(self.window, images, self._block)
        cast = lambda t: t.to(x.dtype)  # noqa: E731 -- adapters may be kept in fp32
        adapters = [cast(self.text_A), cast(self.text_B)]
        adapters += [cast(self.variant.image_kernel(self)), cast(self.image_B)] if images else [
            None, None]
        scales = (self.text_scale, self.image_scale if images else 1.0)
        weight, bias = self.base.weight, self.base.bias
        # LoRA dropout applies to the adapters' input only, inside the same call: the base GEMM
        # reads x, the adapters x through the mask (no second GEMM; on CPU no dropout pass).
        p = self.dropout if self.training else 0.0
        return mk.moss_linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                              plan, *adapters, *scales, backend=self.backend, adapter_dropout=p)

    def extra_repr(self) -> str:
        return (f"{self.base.in_features} -> {self.base.out_features}, "
                f"variant={self.variant.name}, r_text={self.text_A.shape[0]}, "
                f"window={self.window}")
