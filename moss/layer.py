"""MossLinear: a frozen ``nn.Linear`` wrapped (never subclassed) with the MOSS adapters.

Every wrapped layer of one model reads the same routing plan from a shared :class:`Router`,
which :class:`moss.model.MossModel` fills once per forward, so the plan is built once per batch
however many layers there are.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

import moss_kernels as mk

from .config import MossConfig


class Router:
    """The current batch's routing plans, one per window size, built on first use."""

    def __init__(self):
        self._build = None
        self._plans: dict = {}

    @contextlib.contextmanager
    def routing(self, build):
        """``build(window: int, shared: bool) -> RoutingPlan`` serves plans inside the block."""
        if self._build is not None:
            raise RuntimeError("MossModel.forward is already running (nested calls are not supported)")
        self._build, self._plans = build, {}
        try:
            yield
        finally:
            self._build, self._plans = None, {}

    def plan(self, window: int, shared: bool) -> mk.RoutingPlan:
        if self._build is None:
            raise RuntimeError(
                "a MOSS layer ran outside MossModel.forward: call the wrapped model (the object "
                "get_moss_model returned), which routes the batch, not its inner modules")
        key = (window, shared)
        if key not in self._plans:
            self._plans[key] = self._build(window, shared)
        return self._plans[key]


class MossLinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: MossConfig, router: Router):
        super().__init__()
        self.base = base
        self.variant = cfg.image_adapter
        self.window = cfg.window
        self.dropout = cfg.dropout
        self.backend = cfg.backend
        self._router = router
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.text_A = nn.Parameter(torch.empty(cfg.r_text, d_in, **kw))
        self.text_B = nn.Parameter(torch.zeros(d_out, cfg.r_text, **kw))
        self.text_scale = cfg.alpha_text / cfg.r_text
        nn.init.kaiming_uniform_(self.text_A, a=math.sqrt(5))
        if self.variant != "shared":
            k = self.window
            if self.variant == "conv_rank":
                self.image_down = nn.Parameter(torch.empty(cfg.r_image, d_in, **kw))
                self.image_conv = nn.Parameter(torch.empty(cfg.r_image, cfg.r_image, k, k, **kw))
                nn.init.kaiming_uniform_(self.image_down, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.image_conv, a=math.sqrt(5))
            else:
                self.image_A = nn.Parameter(torch.empty(cfg.r_image, d_in, k, k, **kw))
                nn.init.kaiming_uniform_(self.image_A, a=math.sqrt(5))
            self.image_B = nn.Parameter(torch.zeros(d_out, cfg.r_image, **kw))
            self.image_scale = cfg.alpha_image / cfg.r_image

    def image_kernel(self) -> torch.Tensor:
        """``[R_i, D_in, K, K]``; for conv_rank the rank-space conv composed with the linear
        down-projection, ``A[:, :, p, q] = C[:, :, p, q] @ A_lin``."""
        if self.variant == "conv_rank":
            return torch.einsum("ospq,si->oipq", self.image_conv, self.image_down)
        return self.image_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.variant == "shared"
        plan = self._router.plan(1 if shared else self.window, shared)
        cast = lambda t: t.to(x.dtype)  # noqa: E731 -- adapters may be kept in fp32
        adapters = [cast(self.text_A), cast(self.text_B)]
        adapters += [None, None] if shared else [cast(self.image_kernel()), cast(self.image_B)]
        scales = (self.text_scale, 1.0 if shared else self.image_scale)
        weight, bias = self.base.weight, self.base.bias
        if self.dropout and self.training:
            # LoRA dropout applies to the adapters' input only: the base GEMM runs on x, the
            # adapters on dropout(x) against a stride-0 zero weight (the slow path).
            zero = x.new_zeros(()).expand(weight.shape)
            delta = mk.moss_linear(F.dropout(x, self.dropout), zero, None, plan, *adapters,
                                   *scales, backend=self.backend)
            return F.linear(x, weight, bias) + delta
        return mk.moss_linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                              plan, *adapters, *scales, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.base.in_features} -> {self.base.out_features}, variant={self.variant}, "
                f"r_text={self.text_A.shape[0]}, window={self.window}")
