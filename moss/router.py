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
  token's position in its image is ``(run - 1) % (H*W)``) and the rings, by layer. For
  backbones whose image rows are closed by row-end tokens (Emu3) the state is instead
  ``[B, 4]``: rows closed, column, the image's width (0 while its first row is open) and
  whether the last token closed a row (:func:`_advance`, :func:`_row_states`); the position is
  ``row * W + column - 1``, the first row's taken on the ring's design width.

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

import functools

import torch

import moss_kernels as mk

#: The keyword argument that carries a call's Routing down to the decoder layers.
KWARG = "moss_routing"
#: Trailing prompt tokens a crop may take back right after a prefill (assisted decoding's first
#: verification runs inside the prefill; its drafts are at most this long in practice).
PREFILL_UNDO = 64


class DecodeStep:
    """A decode call's T new tokens per sequence (T > 1: an assistant's candidates being
    verified): ``tokens``, per token its ``(kind, pos, width)`` ``[B]`` rows, sliced once per
    call rather than by every layer (a decode step of a small model is short enough that
    per-layer indexing shows; #16). ``kind`` int8: text 0, image 1, padding -1; ``pos`` int64:
    an image token's position in its image; ``width`` int64: its image's width."""

    def __init__(self, tokens: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.tokens = tokens

    @functools.cached_property
    def text_tokens(self) -> list:
        """:attr:`tokens` with image tokens as text (layers without an image adapter: the
        ``shared`` variant's), made once per call on first use."""
        return [(kind.clamp(max=0), pos, width) for kind, pos, width in self.tokens]


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
        # [B] trailing image-run length, or [B, 4] rows state (module docstring), across calls
        self.run: torch.Tensor | None = None
        self.row_ends: torch.Tensor | None = None  # lookup table of row-end ids, or None
        self.grid: tuple[int, int] | None = None
        self.width: torch.Tensor | None = None  # [B] the grid's width, for decode steps
        self.rings: dict[int, torch.Tensor] = {}  # layer id -> [B, L, K*K*R_i]
        # layer id -> (decode step, packed weights, R_T, K), bound once per generation
        # (MossLinear._bind)
        self.bound: dict[int, tuple] = {}
        self.image_table: torch.Tensor | None = None  # [max image id + 2] bool
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
                   mask=None, row_ends=None, max_width=None, validate=False) -> Routing:
        """``build(window, with_images) -> RoutingPlan``; with ``prefill_ids`` a generation starts:
        the decode state is reset from the prompt and the layers seed their rings. With
        ``row_ends`` (ids closing image rows) images are sized in the sequence, at most
        ``max_width`` wide: a wider row is refused when ``validate`` (the caller reads values:
        moss/model.py ``reads_values``); unchecked, it would read wrong ring slots."""
        self._enter("plan")
        self.current = Routing(build)
        self.fill = prefill_ids is not None
        if self.fill and row_ends is not None:
            self._begin_rows(prefill_ids, image_ids, mask, row_ends, max_width, validate)
        elif self.fill:
            self.row_ends = None
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
            self.grid, self.width, self.rings, self.bound = grid, None, {}, {}
            self.undo, self.seeds = None, {}
        return self.current

    def _begin_rows(self, prefill_ids, image_ids, mask, row_ends, max_width, validate
                    ) -> None:
        """:meth:`begin_plan`'s prefill for images of rows closed by row-end tokens: the rows
        state after every prompt position (the last PREFILL_UNDO kept for a crop), and each
        position's image and grid position (newest first) to seed the rings from."""
        device = prefill_ids.device
        self.image_table = _image_table(image_ids, device)
        self.row_ends = _image_table(row_ends, device)
        is_img = _is_image(prefill_ids, self.image_table, mask)
        is_end = _is_image(prefill_ids, self.row_ends, mask)
        states, start = _row_states(is_img, is_end)
        width = states[..., 2]
        row_len = torch.where(width > 0, width, states[..., 1])  # (a first row: so far)
        if validate and bool((row_len > max_width).any()):
            raise ValueError(f"input_ids: an image row of {int(row_len.max())} tokens, wider "
                             f"than the backbone's max_image_width ({max_width}) that the "
                             f"decode state holds")
        pos = torch.where(is_img, states[..., 0] * width + states[..., 1] - 1, -1)
        self.tail = (start.flip(1), pos.flip(1))
        keep = min(PREFILL_UNDO, is_img.shape[1] - 1)
        self.history = [states[:, -1 - i] for i in range(keep, -1, -1)]
        self.run = self.history[-1]
        # The ring's design width, one over the widest image: its S slots then span the K-1
        # rows before a token together with their row ends.
        self.grid, self.rings, self.bound = (1, max_width + 1), {}, {}
        self.undo, self.seeds = None, {}

    def begin_decode(self, input_ids, mask, validate=False):
        """A call with a KV cache: its T new tokens' kinds, positions and image widths, one token
        after the other (assisted decoding verifies several at once). The state (image-run
        length, or rows state) before and after each token is kept, and the layers log the ring
        slots they overwrite, so that a crop of this call's tokens can be undone
        (:meth:`follow`). ``validate``: refuse image rows wider than the rings hold
        (:meth:`begin_plan`)."""
        if self.run is None:
            raise RuntimeError("a decode step (a call with a KV cache) came before its prefill")
        self._enter("decode")
        is_img = _is_image(input_ids, self.image_table, mask)  # [B, T]
        t = input_ids.shape[1]
        h, w = self.grid if self.grid else (1, 1)
        # Few tensor ops: they run once per decode step, ~10 us each inside a model (#16).
        runs, pos, widths = [self.run], [], []
        if self.row_ends is not None:
            is_end = _is_image(input_ids, self.row_ends, mask)
            for j in range(t):
                runs.append(_advance(runs[-1], is_img[:, j], is_end[:, j]))
                row, col, width, _ = runs[-1].unbind(-1)
                row_len = torch.where(width > 0, width, col)  # (the first row: so far)
                if validate and bool((row_len >= w).any()):
                    raise ValueError(f"input_ids: an image row of {int(row_len.max())} tokens, "
                                     f"wider than the backbone's max_image_width ({w - 1}) "
                                     f"that the decode state holds")
                widths.append(torch.where(width > 0, width, w))  # the first row: row 0
                pos.append((row * widths[-1] + col - 1).clamp(min=0))
        else:
            for j in range(t):
                runs.append((runs[-1] + 1) * is_img[:, j])  # the run goes on, or is cut
                pos.append((runs[-1] - 1) % (h * w))  # (text tokens: any slot, unread)
            if self.width is None or self.width.shape != self.run.shape:
                self.width = torch.full_like(self.run, w)  # made once per generation
            widths = [self.width] * t
        # Only a call of several tokens (drafts being verified) can be cropped back: a single
        # token's call keeps no undo log (it would cost a copy per layer and token).
        self.run, self.undo, self.seeds = runs[-1], {}, {}
        self.history = runs if t > 1 else runs[-1:]
        kind = is_img.to(torch.int8)  # image 1, text 0; padding (never an image) -1
        if mask is not None:
            kind.masked_fill_(mask[:, -t:] == 0, -1)
        self.step = DecodeStep(list(zip(kind.t().contiguous().unbind(0), pos, widths)))

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
        if self.row_ends is not None:
            return self._seeded_rows(taps, n, slots)
        h, w = self.grid
        back = torch.arange(slots, device=taps.device)
        pos_last = (self.history[-1 - n] - 1).clamp(min=0) % (h * w)
        index = (pos_last[:, None] - back[None]) % slots  # distinct within a row
        rows = taps[:, n:n + slots]
        return torch.zeros_like(rows).scatter_(1, index[..., None].expand_as(rows), rows)

    def _seeded_rows(self, taps: torch.Tensor, n: int, slots: int) -> torch.Tensor:
        """:meth:`seeded_ring` for images of rows: of the ``slots`` positions before the last
        ``n``, the image tokens of the image the shortened prompt ends in (row ends and other
        images' tokens go to a dropped slot)."""
        start, pos = (t[:, n:n + slots] for t in self.tail)
        short = slots - start.shape[1]  # a prompt shorter than the ring
        if short > 0:
            start = torch.cat([start, start.new_full((start.shape[0], short), -1)], 1)
            pos = torch.cat([pos, pos.new_full((pos.shape[0], short), -1)], 1)
        state = self.history[-1 - n]
        inside = (state[:, 1] > 0) | (state[:, 3] > 0)  # in an image's row, or just closed one
        ok = inside[:, None] & (pos >= 0) & (start == self.tail[0][:, n:n + 1])
        index = torch.where(ok, pos % slots, slots)
        rows = taps[:, n:n + slots]
        out = rows.new_zeros(rows.shape[0], slots + 1, rows.shape[2])
        return out.scatter_(1, index[..., None].expand_as(rows), rows)[:, :slots].contiguous()

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
            "get_moss_model returned), which routes the batch, not its inner modules. A "
            "backbone's own image generation that calls its language model directly (Janus's "
            "generate(generation_mode='image')) goes past the routing: generate images with "
            "moss.embedding_fed.generate_image")


def _advance(state: torch.Tensor, img: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The rows state ``[B, 4]`` (rows closed, column, width or 0, row just closed) after one
    token per sequence: an image token continues its image when a row is open or was just
    closed, else starts one; a row end after image tokens closes the row (its length is the
    width, if not known yet); anything else leaves every image (all zero)."""
    row, col, width, closed = state.unbind(-1)
    go_on = img & ((col > 0) | (closed > 0))
    close = end & (col > 0)
    zero = torch.zeros_like(row)
    new_row = torch.where(go_on, row, torch.where(close, row + 1, zero))
    new_width = torch.where(go_on, width, torch.where(close & (width == 0), col,
                                                      torch.where(close, width, zero)))
    new_col = torch.where(go_on, col + 1, torch.where(img, 1, zero))
    return torch.stack([new_row, new_col, new_width, close.long()], -1)


def _row_states(is_img: torch.Tensor, is_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [B, T, 4], image start [B, T])``: :func:`_advance`'s state after each prompt
    position, vectorised as ``RoutingPlan.from_input_ids`` finds rows (an image's width is its
    first row's length, its rows at stride W + 1), and the position of each token's image head
    (-1 before any)."""
    b, n = is_img.shape
    t = torch.arange(n, device=is_img.device).expand(b, n)

    def before(flags, d):
        return torch.cat([flags.new_zeros(b, min(d, n)), flags[:, :max(n - d, 0)]], 1)

    next_row = is_img & ~before(is_img, 1) & before(is_end, 1) & before(is_img, 2)
    head = is_img & ~before(is_img, 1) & ~next_row
    start = torch.where(head, t, -1).cummax(1).values
    stop = torch.where(is_img, n, t)  # the first non-image position at or after each one
    next_stop = stop.flip(1).cummin(1).values.flip(1)
    first_end = next_stop.gather(1, start.clamp(min=0))  # where the first row ends
    stride = first_end - start + 1
    rel = t - start
    close = is_end & before(is_img, 1)
    zero = torch.zeros_like(t)
    row = torch.where(is_img, rel // stride, torch.where(close, rel // stride + 1, zero))
    col = torch.where(is_img, rel % stride + 1, zero)
    width = torch.where((is_img | close) & (t >= first_end), stride - 1, zero)
    return torch.stack([row, col, width, close.long()], -1), start


def _image_table(image_ids, device) -> torch.Tensor | None:
    """A lookup table ``[max id + 2]`` bool of the image token ids: made once per generation, so
    that a decode step tests its ids with one gather (``isin`` on a Python list each step cost
    more than the step's adapters). Its last entry, False, is where larger ids are clamped to."""
    if image_ids is None:
        return None
    ids = torch.as_tensor(image_ids, device=device).long()
    table = torch.zeros(int(ids.max()) + 2 if ids.numel() else 1, dtype=torch.bool,
                        device=device)
    table[ids] = True
    return table


def _is_image(ids, table, mask) -> torch.Tensor:
    if table is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    is_img = table[ids.clamp(0, table.shape[0] - 1)]
    if mask is not None:
        is_img &= mask[:, -ids.shape[1]:] == 1
    return is_img
