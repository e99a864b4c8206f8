"""RoutingPlan: the per-token modality route and the K x K window gather tables.

What the tables mean, and why they are shaped so, is docs/design.md section 2:

    route  [N] int8         -1 padding, 0 text, 1 image
    nbr    [N, K*K] int32   source token of each conv tap of token t, -1 if none
    nbr_t  [N, K*K] int32   its transpose (the backward gathers through it)

This file builds them from a layout with vectorised tensor operations on the input's device: no
Python loop over tokens or images, no host synchronisation except in validation
(``validate=False`` skips it), and no data-dependent mask in the transpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

ROUTE_PAD, ROUTE_TEXT, ROUTE_IMAGE = -1, 0, 1
#: The most tokens one plan holds: ``nbr``/``nbr_t`` store token indices as int32 (half the
#: bytes of int64 in every kernel's gather), so N - 1 must fit in an int32.
MAX_TOKENS = torch.iinfo(torch.int32).max

__all__ = ["RoutingPlan", "ROUTE_PAD", "ROUTE_TEXT", "ROUTE_IMAGE", "MAX_TOKENS"]


class RoutingPlan:
    """Routes and conv-window gather tables for one batch layout (see the module docstring).

    Build it with :meth:`from_spans` (explicit layouts) or :meth:`from_input_ids` (token-id
    based backbones such as Chameleon); move it with :meth:`to`.
    """

    def __init__(
        self,
        route: Tensor,
        nbr: Tensor,
        nbr_t: Tensor,
        kernel_size: int,
        causal: bool,
        shape: tuple[int, ...],
        images: Tensor | None = None,
        image_start: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        image_rows: Tensor | None = None,
    ):
        self.route = route  # [N] int8
        self.nbr = nbr  # [N, K*K] int32
        self.nbr_t = nbr_t  # [N, K*K] int32
        self.kernel_size = kernel_size
        self.causal = causal
        self.shape = shape  # the layout's shape: (N,) or (B, T)
        # Either the explicit span table, or (for from_input_ids) each token's image start and
        # the common grid, or with row ends each token's image width and extent ([2, N]), from
        # which the table is derived on first use (it needs a host sync).
        self._images = images
        self._image_start = image_start
        self._grid = grid
        self._image_rows = image_rows

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return self.route.shape[0]

    @property
    def device(self) -> torch.device:
        return self.route.device

    @property
    def images(self) -> Tensor:
        """``[n_img, 3] int64`` rows ``(start, height, width)``, sorted by start; ``[n_img, 4]``
        with each ``row_stride`` when the plan was made with strides."""
        if self._images is None:
            t = torch.arange(self.num_tokens, device=self.device)
            first = (self.route == ROUTE_IMAGE) & (self._image_start == t)
            starts = first.nonzero().flatten()
            if self._image_rows is None:
                h, w = self._grid
                self._images = torch.stack(
                    [starts, torch.full_like(starts, h), torch.full_like(starts, w)], dim=1
                )
            else:  # the rows present so far
                w, length = self._image_rows[:, starts]
                self._images = torch.stack([starts, (length - 1) // (w + 1) + 1, w, w + 1], 1)
        return self._images

    def to(self, device: torch.device | str) -> RoutingPlan:
        """A copy of the plan on ``device`` (the tables are small: N * (1 + 8 K^2) bytes)."""
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return RoutingPlan(
            move(self.route), move(self.nbr), move(self.nbr_t), self.kernel_size, self.causal,
            self.shape, move(self._images), move(self._image_start), self._grid,
            move(self._image_rows),
        )

    def __repr__(self) -> str:
        return (
            f"RoutingPlan(shape={tuple(self.shape)}, kernel_size={self.kernel_size}, "
            f"causal={self.causal}, device={self.device})"
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_spans(
        cls,
        route: Tensor,
        images: Tensor | Sequence[Sequence[int]],
        kernel_size: int = 2,
        causal: bool = True,
        cu_seqlens: Tensor | Sequence[int] | None = None,
        validate: bool = True,
    ) -> RoutingPlan:
        """Plan for an explicit layout.

        Args:
            route: ``[N]`` or ``[B, T]`` integer tensor of -1 (padding), 0 (text), 1 (image).
            images: ``[n_img, 3]`` rows ``(start, height, width)``, or ``[n_img, 4]`` rows
                ``(start, height, width, row_stride)``, ``start`` a flat token index (``b*T + t``
                for ``[B, T]``); any order. Token (r, c) of an image is at ``start + r *
                row_stride + c`` (``row_stride`` defaults to the width): a stride larger than
                the width describes rows separated by other tokens (Emu3's end-of-line, Lumina's
                row separators), which must not be image tokens; the convolution runs over the
                H x W image tokens only. An image is present up to its first missing token (a
                position of its grid that is not an image token, or the sequence's end):
                images being generated end inside a row.
            kernel_size: K of the K x K image convolution, >= 1.
            causal: top/left window (exact for autoregressive generation) or centred.
            cu_seqlens: for a flat ``[N]`` layout that packs several sequences, their cumulative
                lengths ``[0, n_0, n_0 + n_1, ..., N]``; an image never crosses one of these
                boundaries. For ``[B, T]`` each row is a sequence.
            validate: check consistency (costs host synchronisations); off on hot paths.
        """
        _check_window(kernel_size, causal)
        if not isinstance(route, Tensor):
            raise TypeError(f"route: expected a torch.Tensor, got {type(route).__name__}")
        if route.dim() not in (1, 2) or not _is_integer(route.dtype):
            raise ValueError(
                f"route: expected an integer tensor of shape [N] or [B, T], got dtype "
                f"{route.dtype} and shape {tuple(route.shape)}"
            )
        device = route.device
        images = _integers("images", images, device)
        if images.numel() == 0:
            images = images.reshape(0, 3)
        if images.dim() != 2 or images.shape[1] not in (3, 4):
            raise ValueError(
                f"images: expected shape [n_img, 3] with rows (start, height, width), or "
                f"[n_img, 4] with rows (start, height, width, row_stride), got "
                f"{tuple(images.shape)}"
            )
        strided = images.shape[1] == 4
        shape = tuple(route.shape)
        # int64, so that -1 compares as -1 whatever the caller's integer type (uint8 included).
        flat = route.reshape(-1).long()
        n = flat.numel()
        _check_num_tokens("route", shape, n)
        seq_end = _sequence_ends(shape, cu_seqlens, device, validate)
        if validate:
            _check_route_values(flat, shape)
            _check_spans_in_range(images, n)

        is_img = flat == ROUTE_IMAGE
        t = torch.arange(n, device=device)
        order = torch.argsort(images[:, 0], stable=True)
        start_s, h_s, w_s = images[order, :3].t().contiguous()
        stride_s = images[order, 3].contiguous() if strided else w_s
        if images.shape[0] == 0:
            covered = torch.zeros_like(is_img)
            tok_start = tok_len = t
            tok_h = tok_w = tok_stride = torch.ones_like(t)
            length_s = start_s
        else:
            idx = torch.searchsorted(start_s, t, right=True) - 1  # last image starting at <= t
            safe = idx.clamp(min=0)
            pos = t - start_s[safe]
            span = (h_s - 1) * stride_s + w_s  # from the first token to the last, separators in
            # Within its span a token is on the image's grid when its column is under the width.
            on_grid = (idx >= 0) & (pos < span[safe]) & (pos % stride_s[safe] < w_s[safe])
            # An image is present up to its first grid position that is not an image token (of
            # the tokens its span owns: a later image's tokens are that image's), or its
            # sequence's end. Without separators: the end of its run of image tokens.
            missing = torch.where(on_grid & ~is_img, pos, n)
            first_missing = torch.full_like(start_s, n).scatter_reduce(
                0, safe, missing, "amin")
            seq_left = seq_end[start_s.clamp(0, max(n - 1, 0))] - start_s
            length_s = torch.minimum(torch.minimum(span, first_missing), seq_left)
            tok_start, tok_len = start_s[safe], length_s[safe]
            tok_h, tok_w, tok_stride = h_s[safe], w_s[safe], stride_s[safe]
            covered = on_grid & (pos < tok_len)

        if validate:
            _check_span_starts(flat, shape, images)
            _check_overlaps(order, start_s, length_s, shape)
            _check_covered(is_img, covered, shape)

        nbr, nbr_t = _window_tables(
            is_img & covered, tok_start, tok_len, tok_h, tok_w, kernel_size, causal, tok_stride
        )
        table = [start_s, h_s, w_s] + ([stride_s] if strided else [])
        return cls(
            flat.to(torch.int8), nbr, nbr_t, kernel_size, causal, shape,
            images=torch.stack(table, dim=1),
        )

    @classmethod
    def from_input_ids(
        cls,
        input_ids: Tensor,
        image_token_ids: Tensor | Iterable[int],
        grid: tuple[int, int],
        attention_mask: Tensor | None = None,
        kernel_size: int = 2,
        causal: bool = True,
        validate: bool = True,
        row_end_ids: Tensor | Iterable[int] | None = None,
    ) -> RoutingPlan:
        """Plan for a token-based backbone: image tokens are recognised by id.

        Tokens whose id is in ``image_token_ids`` are image tokens, others text; positions
        where ``attention_mask`` is 0 are padding. Each run of consecutive image tokens is cut
        into consecutive ``grid = (H, W)`` images; the last one may be partial.

        With ``row_end_ids`` (Emu3's end-of-line token, Lumina-mGPT's row separator) and
        ``grid=None``, sizes come from the sequence: an image is rows of image tokens, each
        ended by one row-end token (routed as text); its width is its first row's length (while
        that row is still being generated, its length so far, which a causal window cannot
        tell apart), and a run of image tokens right after a row end that closes an image row
        continues that image, one row further (row stride W + 1). Anything else between image
        tokens (Emu3's end-of-frame and image-end tokens) ends the image. Validation checks that
        every row has the first's length (the last may be shorter: still being generated).
        """
        _check_window(kernel_size, causal)
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() not in (1, 2) or not _is_integer(input_ids.dtype):
            raise ValueError(
                f"input_ids: expected an integer tensor of shape [T] or [B, T], got dtype "
                f"{input_ids.dtype} and shape {tuple(input_ids.shape)}"
            )
        if row_end_ids is not None:
            if grid is not None:
                raise ValueError(f"grid: with row_end_ids the sizes come from the sequence "
                                 f"(each image's first row end); pass grid=None, got {grid!r}")
        elif (
            not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
        ):
            raise ValueError(f"grid: expected (height, width) with positive ints, got {grid!r}")
        device = input_ids.device
        if isinstance(image_token_ids, (str, bytes)) or not isinstance(image_token_ids, Iterable):
            raise TypeError(f"image_token_ids: expected a list of ints or an integer tensor, got "
                            f"{type(image_token_ids).__name__}")
        ids = _integers("image_token_ids", image_token_ids, device).reshape(-1)
        shape = tuple(input_ids.shape)
        _check_num_tokens("input_ids", shape, input_ids.numel())
        flat_ids = input_ids.reshape(-1).long()
        route = torch.isin(flat_ids, ids).to(torch.int8)
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(
                    attention_mask).__name__
                raise ValueError(f"attention_mask: expected shape {shape} like input_ids, "
                                 f"got {got}")
            mask = attention_mask.reshape(-1).to(device)
            if validate and not bool(((mask == 0) | (mask == 1)).all()):
                bad = int(((mask != 0) & (mask != 1)).nonzero()[0])
                raise ValueError(
                    f"attention_mask{_index(bad, shape)} = {mask[bad].item()}: expected 0 or 1"
                )
            route = torch.where(mask == 0, torch.full_like(route, ROUTE_PAD), route)

        n = route.numel()
        if row_end_ids is not None:
            if isinstance(row_end_ids, (str, bytes)) or not isinstance(row_end_ids, Iterable):
                raise TypeError(f"row_end_ids: expected a list of ints or an integer tensor, "
                                f"got {type(row_end_ids).__name__}")
            ends = _integers("row_end_ids", row_end_ids, device).reshape(-1)
            if validate and bool(torch.isin(ends, ids).any()):
                both = int(ends[torch.isin(ends, ids)][0])
                raise ValueError(f"row_end_ids: id {both} is also in image_token_ids (a row end "
                                 f"is a text token)")
            is_end = torch.isin(flat_ids, ends) & (route != ROUTE_PAD)
            return cls._from_rows(route, is_end, shape, kernel_size, causal, validate)
        h, w = int(grid[0]), int(grid[1])
        seq_end = _sequence_ends(shape, None, device, validate)
        is_img = route == ROUTE_IMAGE
        t = torch.arange(n, device=device)
        seq_start = seq_end - (shape[-1] if len(shape) == 2 else n)
        prev_img = torch.cat([is_img.new_zeros(1), is_img[:-1]])
        run_head = is_img & ((t == seq_start) | ~prev_img)
        run_start = torch.cummax(torch.where(run_head, t, torch.full_like(t, -1)), dim=0).values
        tok_start = run_start + (t - run_start) // (h * w) * (h * w)
        tok_len = torch.clamp(_run_ends(is_img, seq_end) - tok_start, max=h * w)
        full = torch.full_like(t, 1)
        nbr, nbr_t = _window_tables(is_img, tok_start, tok_len, full * h, full * w,
                                    kernel_size, causal)
        return cls(route, nbr, nbr_t, kernel_size, causal, shape,
                   image_start=tok_start, grid=(h, w))

    @classmethod
    def _from_rows(cls, route: Tensor, is_end: Tensor, shape: tuple[int, ...], k: int,
                   causal: bool, validate: bool) -> RoutingPlan:
        """:meth:`from_input_ids` with row ends (its docstring), from the route and the row-end
        flags; vectorised, no host sync without validation."""
        n, device = route.numel(), route.device
        seq_end = _sequence_ends(shape, None, device, validate)
        seq_start = seq_end - (shape[-1] if len(shape) == 2 else n)
        is_img = route == ROUTE_IMAGE
        t = torch.arange(n, device=device)

        def before(flags: Tensor, d: int) -> Tensor:  # flags[t - d], False across a sequence start
            shifted = torch.cat([flags.new_zeros(min(d, n)), flags[:max(n - d, 0)]])
            return shifted & (t - d >= seq_start)

        run_head = is_img & ~before(is_img, 1)
        next_row = run_head & before(is_end, 1) & before(is_img, 2)
        head = run_head & ~next_row
        start = torch.cummax(torch.where(head, t, -1), dim=0).values.clamp(min=0)
        width = (_run_ends(is_img, seq_end)[start] - start).clamp(min=1)  # the first row's
        stride = width + 1
        col = (t - start) % stride
        # Each image's last token present (row ends in between are its own): its extent.
        last = torch.full((n + 1,), -1, dtype=torch.int64, device=device).scatter_reduce(
            0, torch.where(is_img, start, n), t, "amax")
        length = last[start] - start + 1
        if validate:
            _check_rows(is_img & (col >= width), next_row & (col != 0), shape)
        nbr, nbr_t = _window_tables(is_img, start, length, torch.full_like(t, n + 1), width, k,
                                    causal, stride)
        return cls(route.to(torch.int8), nbr, nbr_t, k, causal, shape, image_start=start,
                   image_rows=torch.stack([width, length]))


# ---------------------------------------------------------------------- construction helpers
def _window_tables(
    is_img: Tensor, start: Tensor, length: Tensor, height: Tensor, width: Tensor,
    k: int, causal: bool, stride: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``nbr``/``nbr_t`` from each token's image geometry (values of non-image tokens ignored).

    All inputs ``[N]``; ``start``/``length`` the token's image span (``length`` counts the
    separators between rows), ``height``/``width`` its grid, ``stride`` the tokens from one
    row's start to the next's (default: the width).
    """
    n, kk = is_img.numel(), k * k
    device = is_img.device
    t = torch.arange(n, device=device)
    width = width.clamp(min=1)
    stride = width if stride is None else stride.clamp(min=1)
    pos = t - start
    row, col = pos // stride, pos % stride
    off = torch.arange(k, device=device) - (k - 1 if causal else (k - 1) // 2)
    d_row = off.view(k, 1).expand(k, k).reshape(1, kk)  # tap = p*K + q
    d_col = off.view(1, k).expand(k, k).reshape(1, kk)
    r = row[:, None] + d_row  # [N, KK]
    c = col[:, None] + d_col
    src_pos = r * stride[:, None] + c
    valid = (
        is_img[:, None] & (r >= 0) & (r < height[:, None]) & (c >= 0) & (c < width[:, None])
        & (src_pos < length[:, None])
    )
    src = start[:, None] + src_pos
    nbr = torch.where(valid, src, torch.full_like(src, -1))
    # Transpose without a data-dependent mask: invalid entries all write one dump slot, dropped.
    slot = torch.where(valid, src * kk + torch.arange(kk, device=device), n * kk)
    buf = torch.full((n * kk + 1,), -1, dtype=torch.int64, device=device)
    buf.index_put_((slot.reshape(-1),), t.repeat_interleave(kk))
    nbr_t = buf[: n * kk].view(n, kk)
    return nbr.to(torch.int32), nbr_t.to(torch.int32)


def _run_ends(is_img: Tensor, seq_end: Tensor) -> Tensor:
    """For each token, the index of the first token at or after it that ends an image run."""
    n = is_img.numel()
    t = torch.arange(n, device=is_img.device)
    stop = torch.where(is_img, torch.full_like(t, n), t)
    next_stop = torch.flip(torch.cummin(torch.flip(stop, [0]), dim=0).values, [0])
    return torch.minimum(next_stop, seq_end)


def _sequence_ends(
    shape: tuple[int, ...], cu_seqlens, device: torch.device, validate: bool
) -> Tensor:
    """``[N]``: the end (exclusive flat index) of the sequence holding each token."""
    n = 1
    for s in shape:
        n *= s
    t = torch.arange(n, device=device)
    if len(shape) == 2:
        if cu_seqlens is not None:
            raise ValueError(
                "cu_seqlens: only for a flat [N] layout; a [B, T] route has one sequence per row"
            )
        return (t // shape[1] + 1) * shape[1]
    if cu_seqlens is None:
        return torch.full_like(t, n)
    cu = _integers("cu_seqlens", cu_seqlens, device)
    if cu.dim() != 1:
        raise ValueError(f"cu_seqlens: expected a 1-D list of offsets, got shape {tuple(cu.shape)}")
    if validate:
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu.diff() < 0).any()):
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to N={n}, got "
                f"{cu.tolist()}"
            )
    return cu[torch.searchsorted(cu, t, right=True).clamp(max=cu.numel() - 1)]


def _check_num_tokens(name: str, shape: tuple[int, ...], n: int) -> None:
    if n > MAX_TOKENS:
        raise ValueError(
            f"{name}: shape {shape} holds {n} tokens, more than one RoutingPlan can index "
            f"(its gather tables are int32: at most {MAX_TOKENS} tokens); split the batch"
        )


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _integers(name: str, value, device: torch.device) -> Tensor:
    """``value`` (a tensor or nested lists of ints) as an int64 tensor on ``device``; floats
    and bools are refused rather than truncated."""
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected ints (a list or an integer tensor), got "
                        f"{type(value).__name__} ({exc})") from None
    if t.numel() and not _is_integer(t.dtype):
        raise TypeError(f"{name}: expected integers, got dtype {t.dtype}")
    return t.to(torch.int64)


def _check_window(kernel_size, causal) -> None:
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1:
        raise ValueError(f"kernel_size: expected an int >= 1, got {kernel_size!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")


# ---------------------------------------------------------------------- validation
def _index(flat: int, shape: tuple[int, ...]) -> str:
    """Name a flat token index in the caller's layout: ``[t]`` or ``[b, t]``."""
    return f"[{flat // shape[1]}, {flat % shape[1]}]" if len(shape) == 2 else f"[{flat}]"


def _first(mask: Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _check_route_values(flat: Tensor, shape) -> None:
    bad = (flat < ROUTE_PAD) | (flat > ROUTE_IMAGE)
    if bool(bad.any()):
        i = _first(bad)
        raise ValueError(
            f"route{_index(i, shape)} = {flat[i].item()}: expected -1 (padding), 0 (text) "
            f"or 1 (image)"
        )


def _check_spans_in_range(images: Tensor, n: int) -> None:
    bad_size = (images[:, 1] < 1) | (images[:, 2] < 1)
    if bool(bad_size.any()):
        i = _first(bad_size)
        raise ValueError(
            f"images[{i}] = {images[i].tolist()}: height and width must be >= 1"
        )
    if images.shape[1] == 4 and bool((images[:, 3] < images[:, 2]).any()):
        i = _first(images[:, 3] < images[:, 2])
        raise ValueError(
            f"images[{i}] = {images[i].tolist()}: row_stride must be >= the width (the tokens "
            f"from one row's start to the next's: the width plus any separators)"
        )
    bad_start = (images[:, 0] < 0) | (images[:, 0] >= n)
    if bool(bad_start.any()):
        i = _first(bad_start)
        raise ValueError(
            f"images[{i}] = {images[i].tolist()}: start is outside the {n} tokens"
        )


def _check_span_starts(flat: Tensor, shape, images: Tensor) -> None:
    not_img = flat[images[:, 0]] != ROUTE_IMAGE
    if bool(not_img.any()):
        i = _first(not_img)
        s = int(images[i, 0])
        raise ValueError(
            f"images[{i}] starts at token {s} (route{_index(s, shape)} = {flat[s].item()}), "
            f"which is not an image token"
        )


def _check_overlaps(order: Tensor, start_s: Tensor, length_s: Tensor, shape) -> None:
    if start_s.numel() < 2:
        return
    clash = start_s[1:] < start_s[:-1] + length_s[:-1]
    if bool(clash.any()):
        j = _first(clash)
        a, b = int(order[j]), int(order[j + 1])
        s, e = int(start_s[j]), int(start_s[j] + length_s[j])
        raise ValueError(
            f"images[{b}] starts at token {int(start_s[j + 1])}, inside images[{a}] "
            f"(tokens {s}..{e - 1}): image spans overlap"
        )


def _check_rows(longer: Tensor, shorter: Tensor, shape) -> None:
    """``longer``: image tokens past the first row's width; ``shorter``: a row starting off its
    first column (the row before it ended early; a row one token short flags both there)."""
    if bool((longer | shorter).any()):
        i = _first(longer | shorter)
        what = ("the image row before this one is shorter" if bool(shorter[i])
                else "this image row is longer")
        raise ValueError(
            f"input_ids{_index(i, shape)}: {what} than its image's first row (rows between row "
            f"ends must all have the first's length; only the last may be shorter)"
        )


def _check_covered(is_img: Tensor, covered: Tensor, shape) -> None:
    stray = is_img & ~covered
    if bool(stray.any()):
        i = _first(stray)
        raise ValueError(
            f"route{_index(i, shape)} is an image token outside every image span (an image "
            f"holds at most height*width tokens, none between its rows when they have a "
            f"row_stride, and never crosses a sequence boundary)"
        )
