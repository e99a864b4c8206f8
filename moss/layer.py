"""MossLinear: a frozen ``nn.Linear`` wrapped (never subclassed) with the MOSS adapters.

The text adapter is the layer's own; the image adapter is its variant's (moss/variants.py).
Every wrapped layer of one model reads the current call's routing from a shared
:class:`moss.router.Router`: a RoutingPlan (built once per call) for full forwards, or the
decode step's token kinds and image positions, with this layer's ring of tap products, for
incremental generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import moss_kernels as mk

from .config import MossConfig
from .router import Router, ring_size
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
        slots of their positions in the image the prompt ends in (if any)."""
        router = self._router
        h, w = router.grid
        t = x.shape[1]
        n_slots = ring_size(self.window, w)
        back = torch.arange(n_slots, device=x.device)
        rows = (t - 1 - back).clamp(min=0)
        pos_last = (router.run - 1).clamp(min=0) % (h * w)
        slots = (pos_last[:, None] - back[None]) % n_slots  # distinct within a row
        taps = x[:, rows] @ self.variant.taps(self, x.dtype).t()  # [B, L, K*K*R_i]
        ring = torch.zeros_like(taps).scatter_(1, slots[..., None].expand_as(taps), taps)
        router.rings[id(self)] = ring

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: the base layer plus a plain LoRA for text tokens, and
        for image tokens K*K rank-R reads from the ring of past tap products."""
        router, step = self._router, self._router.step
        xs = x[:, -1]  # [B, D_in]
        y = F.linear(xs, self.base.weight.to(x.dtype),
                     None if self.base.bias is None else self.base.bias.to(x.dtype))
        text = step.is_text if self.variant.has_image_adapter else step.is_text | step.is_image
        lora = F.linear(F.linear(xs, self.text_A.to(x.dtype)), self.text_B.to(x.dtype))
        y = y + self.text_scale * lora * text[:, None]
        if self.variant.has_image_adapter and router.grid:
            h, w = step.grid
            k, r = self.window, self.image_B.shape[1]
            batch = torch.arange(xs.shape[0], device=x.device)
            ring = router.rings.get(id(self))
            if ring is None:
                ring = xs.new_zeros(xs.shape[0], ring_size(k, w), k * k * r)
                router.rings[id(self)] = ring
            n_slots = ring.shape[1]
            taps = xs @ self.variant.taps(self, x.dtype).t()  # [B, K*K*R_i]
            slot = step.pos % n_slots
            ring[batch, slot] = torch.where(step.is_image[:, None], taps, ring[batch, slot])
            row, col = step.pos // w, step.pos % w
            z = xs.new_zeros(xs.shape[0], r)
            for p in range(k):  # causal: offsets -(K-1)..0 in rows and columns
                for q in range(k):
                    dr, dc, tap = p - (k - 1), q - (k - 1), p * k + q
                    ok = step.is_image & (row + dr >= 0) & (col + dc >= 0)
                    src = (step.pos + dr * w + dc) % n_slots
                    z = z + torch.where(ok[:, None], ring[batch, src, tap * r:(tap + 1) * r], 0)
            y = y + self.image_scale * F.linear(z, self.image_B.to(x.dtype))
        return y[:, None]

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
