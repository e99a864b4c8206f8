"""Router: what every wrapped layer of one model needs to know about the current call.

Two modes, switched by :class:`moss.model.MossModel` around each call of the backbone:

* ``plan``: a full (prefill or training) forward. Layers ask the call's :class:`Routing` for a
  RoutingPlan per window size (and whether image tokens are routed as images, or as text for
  the ``shared`` variant); it is built on first use, so once per call however many layers
  there are.
* ``decode``: one new token per sequence with a KV cache (transformers' ``generate``), served
  from each layer's ring of past tap products (docs/design.md section 5). The per-sequence
  state kept here is the length of the trailing run of image tokens (as in
  ``RoutingPlan.from_input_ids``, a run is cut into consecutive H x W images, so the new
  token's position in its image is ``(run - 1) % (H*W)``) and the rings, by layer.

Gradient checkpointing re-runs a decoder layer during the backward pass, after the call that
routed it has ended, and possibly after later calls (two forwards, one backward). The routing
therefore travels with the call's own arguments, which every checkpoint implementation hands
back unchanged to the recomputation: MossModel adds the call's :class:`Routing` to the
backbone's keyword arguments (:data:`KWARG`), transformers passes them down to every decoder
layer and on to its attention module, and a pre-hook there (:meth:`Router.replay_hook`) strips
it and, when it runs inside a backward pass, records it for the layer's block. A recomputed
MOSS layer reads its block's record only in that same backward pass (autograd's graph task), so
a stale routing can never be used: a layer that cannot find its routing says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moss_kernels as mk

#: The keyword argument that carries a call's Routing down to the decoder layers.
KWARG = "moss_routing"


@dataclass
class DecodeStep:
    kind: torch.Tensor  # [B] int8: the new token is text (0), image (1) or padding (-1)
    pos: torch.Tensor  # [B] int64: its position in its image (valid where it is an image token)
    grid: tuple[int, int]


class Routing:
    """One full forward's routing: ``build(window, with_images) -> RoutingPlan``, each plan
    built on first use and kept for the call (and for its recomputation in the backward)."""

    def __init__(self, build):
        self._build, self._plans = build, {}

    def plan(self, window: int, with_images: bool) -> mk.RoutingPlan:
        key = (window, with_images)
        if key not in self._plans:
            self._plans[key] = self._build(window, with_images)
        return self._plans[key]


class Router:
    def __init__(self):
        self.mode = None
        self.current: Routing | None = None
        self.step: DecodeStep | None = None
        self.run: torch.Tensor | None = None  # [B] trailing image-run length, across calls
        self.grid: tuple[int, int] | None = None
        self.rings: dict[int, torch.Tensor] = {}  # layer id -> [B, L, K*K*R_i]
        self.packed: dict[int, tuple] = {}  # layer id -> its weights, packed for decoding
        self.image_table: torch.Tensor | None = None  # [max image id + 1] bool
        self.fill = False  # a prefill whose layers must seed their rings
        # block -> (Routing, autograd graph task) recorded by a recomputation (module docstring)
        self._replay: dict[int, tuple[Routing, int]] = {}

    @property
    def active(self) -> bool:
        return self.mode is not None

    def begin_plan(self, build, prefill_ids=None, image_ids=None, grid=None,
                   mask=None) -> Routing:
        """``build(window, with_images) -> RoutingPlan``; with ``prefill_ids`` a generation starts:
        the decode state is reset from the prompt and the layers seed their rings."""
        self._enter("plan")
        self.current = Routing(build)
        self.fill = prefill_ids is not None
        if self.fill:
            self.image_table = _image_table(image_ids, prefill_ids.device)
            is_img = _is_image(prefill_ids, self.image_table, mask)
            # Trailing run of image tokens per row (a prompt may end inside an image).
            self.run = torch.flip(is_img.long(), [1]).cumprod(1).sum(1)
            self.grid, self.rings, self.packed = grid, {}, {}
        return self.current

    def begin_decode(self, input_ids, mask):
        if self.run is None:
            raise RuntimeError("a decode step (a call with a KV cache) came before its prefill")
        if input_ids.shape[1] != 1:
            raise ValueError(f"input_ids: decode steps take one new token per sequence, got "
                             f"{input_ids.shape[1]}")
        self._enter("decode")
        is_img = _is_image(input_ids, self.image_table, mask)[:, 0]
        self.run = torch.where(is_img, self.run + 1, torch.zeros_like(self.run))
        h, w = self.grid if self.grid else (1, 1)
        pad = (mask[:, -1] == 0) if mask is not None else torch.zeros_like(is_img)
        kind = torch.where(is_img, 1, torch.where(pad, -1, 0)).to(torch.int8)
        self.step = DecodeStep(kind, (self.run - 1).clamp(min=0) % (h * w), (h, w))

    def end(self):
        self.mode, self.current, self.step, self.fill = None, None, None, False

    def follow(self, cache) -> None:
        """Make the decode state follow ``cache``'s batch operations: beam search reorders the
        KV cache's rows between steps (``reorder_cache``), and other strategies select or
        repeat them; the image-run lengths and the rings are per row too, and must move with
        them (else a beam reads another beam's past tap products). ``crop`` (assisted
        decoding) would need the rings' overwritten slots back: it is refused."""
        def after(name, update):
            method = getattr(cache, name, None)
            if method is None or getattr(method, "_moss_follows", False):
                return

            def wrapped(arg):
                out = method(arg)
                if self.run is not None:
                    update(arg)
                return out
            wrapped._moss_follows = True
            setattr(cache, name, wrapped)  # this cache object only

        def crop(_):
            raise NotImplementedError(
                "MOSS's incremental ConvLoRA state cannot be cropped (assisted decoding, "
                "prompt lookup): generate without an assistant")
        after("reorder_cache", self._select)
        after("batch_select_indices", self._select)
        after("batch_repeat_interleave", self._repeat)
        if getattr(cache, "crop", None) is not None:
            cache.crop = crop

    def _select(self, rows: torch.Tensor) -> None:
        self.run = self.run[rows.to(self.run.device)]
        self.rings = {k: ring[rows.to(ring.device)] for k, ring in self.rings.items()}

    def _repeat(self, n: int) -> None:
        self.run = self.run.repeat_interleave(n, 0)
        self.rings = {k: ring.repeat_interleave(n, 0) for k, ring in self.rings.items()}

    def _enter(self, mode):
        if self.mode is not None:
            raise RuntimeError("MossModel.forward is already running (nested calls are not "
                               "supported)")
        self.mode = mode

    def plan(self, window: int, with_images: bool, block: int | None = None) -> mk.RoutingPlan:
        """The plan of the call being run, or being recomputed for decoder layer ``block``."""
        if self.mode == "plan":
            return self.current.plan(window, with_images)
        return self._replayed(block).plan(window, with_images)

    def replay_hook(self, block: int):
        """A forward pre-hook for the modules of decoder layer ``block``: strips :data:`KWARG`
        and, inside a backward pass (a recomputation), records it for the block."""
        def hook(module, args, kwargs):
            if KWARG not in kwargs:
                return None
            if not torch.compiler.is_compiling():  # a compiled backward replays no Python
                task = torch._C._current_graph_task_id()
                if task != -1:
                    self._replay[block] = (kwargs[KWARG], task)
            return args, {k: v for k, v in kwargs.items() if k != KWARG}
        return hook

    def _replayed(self, block: int | None) -> Routing:
        task = torch._C._current_graph_task_id()
        entry = self._replay.get(block)
        if task != -1 and entry is not None and entry[1] == task:
            return entry[0]
        if task != -1:
            raise RuntimeError(
                "a MOSS layer was recomputed in the backward pass (gradient checkpointing) "
                "without its call's routing: checkpoint whole decoder layers (transformers' "
                "activation_checkpointing_enable, or torch.utils.checkpoint around each layer "
                "called by the backbone) or the whole model, not parts of a layer")
        raise RuntimeError(
            "a MOSS layer ran outside MossModel.forward: call the wrapped model (the object "
            "get_moss_model returned), which routes the batch, not its inner modules")


def _image_table(image_ids, device) -> torch.Tensor | None:
    """A lookup table ``[max id + 1]`` bool of the image token ids: made once per generation, so
    that a decode step tests its ids with one gather (``isin`` on a Python list each step cost
    more than the step's adapters)."""
    if image_ids is None:
        return None
    ids = torch.as_tensor(image_ids, device=device).long()
    table = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.bool,
                        device=device)
    table[ids] = True
    return table


def _is_image(ids, table, mask) -> torch.Tensor:
    if table is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    is_img = table[ids.clamp(0, table.shape[0] - 1)] & (ids < table.shape[0])
    if mask is not None:
        is_img &= mask[:, -ids.shape[1]:] == 1
    return is_img
