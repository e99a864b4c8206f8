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
#: Trailing prompt tokens a crop may take back right after a prefill (assisted decoding's first
#: verification runs inside the prefill; its drafts are at most this long in practice).
PREFILL_UNDO = 64


@dataclass
class DecodeStep:
    """A decode call's T new tokens per sequence (T > 1: an assistant's candidates being
    verified), token-major so that each token's row of kinds and positions is contiguous."""

    kind: torch.Tensor  # [T, B] int8: each new token is text (0), image (1) or padding (-1)
    pos: torch.Tensor  # [T, B] int64: its position in its image (valid for image tokens)
    grid: tuple[int, int]
    width: torch.Tensor  # [B] int64: each sequence's image width (the decode op's per row)


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
        # The last decode call: run lengths before / after each token, and per layer the ring
        # slots its tokens overwrote, [(slot [B], old [B, C])] (Router._undo).
        # None after a prefill, whose layers keep instead the tap products of its last tokens
        # (seeds: layer id -> [B, L + PREFILL_UNDO, C], newest first) to re-seed from.
        self.history: list[torch.Tensor] = []
        self.undo: dict[int, list] | None = {}
        self.seeds: dict[int, torch.Tensor] = {}
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
            # The run of image tokens ending at each position (a prompt may end inside an
            # image), kept for the last PREFILL_UNDO positions: assisted decoding verifies its
            # first candidates inside the prefill, and may crop them.
            t = torch.arange(is_img.shape[1], device=is_img.device)
            breaks = torch.where(is_img, -1, t).cummax(1).values
            run_at = t - breaks
            self.run = run_at[:, -1]
            keep = min(PREFILL_UNDO, is_img.shape[1] - 1)
            self.history = [run_at[:, -1 - i] for i in range(keep, -1, -1)]
            self.grid, self.rings, self.packed = grid, {}, {}
            self.undo, self.seeds = None, {}
        return self.current

    def begin_decode(self, input_ids, mask):
        """A call with a KV cache: its T new tokens' kinds and positions, one token after the
        other (assisted decoding verifies several at once). The image-run length before and
        after each token is kept, and the layers log the ring slots they overwrite, so that a
        crop of this call's tokens can be undone (:meth:`follow`)."""
        if self.run is None:
            raise RuntimeError("a decode step (a call with a KV cache) came before its prefill")
        self._enter("decode")
        is_img = _is_image(input_ids, self.image_table, mask)  # [B, T]
        t = input_ids.shape[1]
        h, w = self.grid if self.grid else (1, 1)
        pad = (mask[:, -t:] == 0) if mask is not None else torch.zeros_like(is_img)
        runs, pos = [self.run], []
        for j in range(t):
            runs.append(torch.where(is_img[:, j], runs[-1] + 1, torch.zeros_like(self.run)))
            pos.append((runs[-1] - 1).clamp(min=0) % (h * w))
        # Only a call of several tokens (drafts being verified) can be cropped back: a single
        # token's call keeps no undo log (it would cost a copy per layer and token).
        self.run, self.undo, self.seeds = runs[-1], {}, {}
        self.history = runs if t > 1 else runs[-1:]
        kind = torch.where(is_img, 1, torch.where(pad, -1, 0)).to(torch.int8)
        self.step = DecodeStep(kind.t().contiguous(), torch.stack(pos), (h, w),
                               torch.full_like(self.run, w))

    def end(self):
        self.mode, self.current, self.step, self.fill = None, None, None, False

    def follow(self, cache) -> None:
        """Make the decode state follow ``cache``'s batch operations: beam search reorders the
        KV cache's rows between steps (``reorder_cache``), and other strategies select or
        repeat them; the image-run lengths and the rings are per row too, and must move with
        them (else a beam reads another beam's past tap products). ``crop`` (assisted and
        prompt-lookup decoding take back rejected candidates) undoes the last call's tokens:
        their run lengths and the ring slots they overwrote."""
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

        crop = getattr(cache, "crop", None)
        if crop is not None and not getattr(crop, "_moss_follows", False):
            def cropped(tokens):  # transformers 5: crop(-n) removes the last n tokens
                n = -tokens if tokens <= 0 else cache.get_seq_length() - tokens
                self._check_undo(n)
                out = crop(tokens)  # first: it refuses what it does not support
                self._undo(n)
                return out
            cropped._moss_follows = True
            cache.crop = cropped
        after("reorder_cache", self._select)
        after("batch_select_indices", self._select)
        after("batch_repeat_interleave", self._repeat)

    def _check_undo(self, n: int) -> None:
        if self.run is not None and n > len(self.history) - 1:
            raise NotImplementedError(
                f"MOSS's ConvLoRA decode state can take back the tokens of the last call only "
                f"({len(self.history) - 1}); this crop removes {n}")

    def _undo(self, n: int) -> None:
        """Take back the last ``n`` tokens (a crop): the run length they started from, and in
        every layer's ring the slots they overwrote, newest first."""
        if n <= 0 or self.run is None:
            return
        self._check_undo(n)
        if self.undo is None:  # the last call was the prefill: seed as if it were n shorter
            for layer, taps in self.seeds.items():
                self.rings[layer] = self.seeded_ring(taps, n, self.rings[layer].shape[1])
            self.seeds = {}
            del self.history[-n:]
            self.history = self.history[-1:]
        else:
            for layer, log in self.undo.items():
                ring = self.rings[layer]
                batch = torch.arange(ring.shape[0], device=ring.device)
                for slot, old in reversed(log[-n:]):
                    ring[batch, slot] = old
                del log[-n:]
            del self.history[-n:]
        self.run = self.history[-1]

    def seeded_ring(self, taps: torch.Tensor, n: int, slots: int) -> torch.Tensor:
        """The ring a prefill leaves when its last ``n`` tokens are left out: ``taps [B, >= n +
        slots, C]`` holds the tap products of the prompt's last positions, newest first; the
        ``slots`` before the last ``n`` go to the ring slots of their positions in the image the
        shortened prompt ends in."""
        h, w = self.grid
        back = torch.arange(slots, device=taps.device)
        pos_last = (self.history[-1 - n] - 1).clamp(min=0) % (h * w)
        index = (pos_last[:, None] - back[None]) % slots  # distinct within a row
        rows = taps[:, n:n + slots]
        return torch.zeros_like(rows).scatter_(1, index[..., None].expand_as(rows), rows)

    def _select(self, rows: torch.Tensor) -> None:
        self.run = self.run[rows.to(self.run.device)]
        self.rings = {k: ring[rows.to(ring.device)] for k, ring in self.rings.items()}
        self.history, self.undo, self.seeds = [self.run], {}, {}  # rows moved: no undo

    def _repeat(self, n: int) -> None:
        self.run = self.run.repeat_interleave(n, 0)
        self.rings = {k: ring.repeat_interleave(n, 0) for k, ring in self.rings.items()}
        self.history, self.undo, self.seeds = [self.run], {}, {}

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
