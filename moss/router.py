"""Router: what every wrapped layer of one model needs to know about the current call.

Two modes, switched by :class:`moss.model.MossModel` around each call of the backbone:

* ``plan``: a full (prefill or training) forward. Layers ask for a RoutingPlan per window size
  (and whether image tokens are routed as images, or as text for the ``shared`` variant); it
  is built on first use, so once per call however many layers there are.
* ``decode``: one new token per sequence with a KV cache (transformers' ``generate``), served
  from each layer's ring of past tap products (docs/design.md section 5). The per-sequence
  state kept here is the length of the trailing run of image tokens (as in
  ``RoutingPlan.from_input_ids``, a run is cut into consecutive H x W images, so the new
  token's position in its image is ``(run - 1) % (H*W)``) and the rings, by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moss_kernels as mk


@dataclass
class DecodeStep:
    is_text: torch.Tensor  # [B] bool: the new token is a text token
    is_image: torch.Tensor  # [B] bool
    pos: torch.Tensor  # [B] int64: its position in its image (valid where is_image)
    grid: tuple[int, int]


class Router:
    def __init__(self):
        self.mode = None
        self._build = None
        self._plans: dict = {}
        self.step: DecodeStep | None = None
        self.run: torch.Tensor | None = None  # [B] trailing image-run length, across calls
        self.grid: tuple[int, int] | None = None
        self.rings: dict[int, torch.Tensor] = {}  # layer id -> [B, L, K*K*R_i]
        self.fill = False  # a prefill whose layers must seed their rings

    @property
    def active(self) -> bool:
        return self.mode is not None

    def begin_plan(self, build, prefill_ids=None, image_ids=None, grid=None, mask=None):
        """``build(window, with_images) -> RoutingPlan``; with ``prefill_ids`` a generation starts:
        the decode state is reset from the prompt and the layers seed their rings."""
        self._enter("plan")
        self._build, self._plans = build, {}
        self.fill = prefill_ids is not None
        if self.fill:
            is_img = _is_image(prefill_ids, image_ids, mask)
            # Trailing run of image tokens per row (a prompt may end inside an image).
            self.run = torch.flip(is_img.long(), [1]).cumprod(1).sum(1)
            self.grid, self.rings = grid, {}

    def begin_decode(self, input_ids, image_ids, mask):
        if self.run is None:
            raise RuntimeError("a decode step (a call with a KV cache) came before its prefill")
        if input_ids.shape[1] != 1:
            raise ValueError(f"input_ids: decode steps take one new token per sequence, got "
                             f"{input_ids.shape[1]}")
        self._enter("decode")
        is_img = _is_image(input_ids, image_ids, mask)[:, 0]
        self.run = torch.where(is_img, self.run + 1, torch.zeros_like(self.run))
        h, w = self.grid if self.grid else (1, 1)
        pad = (mask[:, -1] == 0) if mask is not None else torch.zeros_like(is_img)
        self.step = DecodeStep(~is_img & ~pad, is_img, (self.run - 1).clamp(min=0) % (h * w),
                               (h, w))

    def end(self):
        self.mode, self._build, self._plans, self.step, self.fill = None, None, {}, None, False

    def _enter(self, mode):
        if self.mode is not None:
            raise RuntimeError("MossModel.forward is already running (nested calls are not "
                               "supported)")
        self.mode = mode

    def plan(self, window: int, with_images: bool) -> mk.RoutingPlan:
        if self.mode != "plan":
            raise RuntimeError(
                "a MOSS layer ran outside MossModel.forward: call the wrapped model (the object "
                "get_moss_model returned), which routes the batch, not its inner modules")
        key = (window, with_images)
        if key not in self._plans:
            self._plans[key] = self._build(window, with_images)
        return self._plans[key]


def _is_image(ids, image_ids, mask) -> torch.Tensor:
    if image_ids is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    is_img = torch.isin(ids, torch.as_tensor(image_ids, device=ids.device))
    if mask is not None:
        is_img &= mask[:, -ids.shape[1]:] == 1
    return is_img


def ring_size(kernel_size: int, width: int) -> int:
    return (kernel_size - 1) * (width + 1) + 1
