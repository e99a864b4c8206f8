"""Constrained image decoding: a ``LogitsProcessor`` that keeps generated images well formed.

A backbone writes an image as ``begin_image``, a header, H rows of W VQ code tokens (each closed
by a row-end token where the backbone has one), a trailer and ``end_image`` (moss/backbones:
:class:`Vocabulary`; Chameleon has no header, row ends or trailer; Emu3 writes the size "H*W"
and its image-token marker as the header, rows closed by end-of-line, end-of-frame as the
trailer). Sampling from a model's logits alone can break that: a stray code in the text, an
image cut short by a text token, a row of the wrong width, one that never ends. With this
processor, for the ``grid`` it is given (default: the vocabulary's), at every step and for every
row:

* inside an image: the one token the spelling requires next (header, row end, trailer, end),
  or, where a code goes, only code tokens: exactly H x W of them;
* outside: anything but code tokens, row ends, trailer and ``end_image`` (``begin_image`` opens
  a new image, which then gets this processor's size).

Where a row stands is read from its ids (the prompt included: a prompt may end inside an
image, taken to be of this processor's grid), so the processor holds no state and works for any
batch, beam search, sampling, and the doubled batch of classifier-free guidance. Pass it to
``generate(logits_processor=[...])``; ``moss generate`` always does.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .backbones import Vocabulary

_CODE = -1  # in the script: "a code token goes here"


class ImageSpans(LogitsProcessor):
    def __init__(self, vocab: Vocabulary, grid: tuple[int, int] | None = None):
        h, w = grid = tuple(grid or vocab.grid)
        if not vocab.sized and grid != tuple(vocab.grid):
            raise ValueError(f"grid: this backbone's images are all {vocab.grid[0]} x "
                             f"{vocab.grid[1]}, got {h} x {w}")
        self.begin, self.end, self.grid, self.size = vocab.begin_image, vocab.end_image, grid, h * w
        self.codes = torch.tensor(sorted(set(vocab.code_to_token)), dtype=torch.long)
        row = [_CODE] * w + ([] if vocab.row_end is None else [vocab.row_end])
        #: What follows ``begin_image``, token by token.
        self.script = torch.tensor(vocab.opening(grid)[1:] + row * h + vocab.closing())
        #: Never outside an image.
        self.closers = torch.tensor(sorted({*vocab.closing(), *(
            [] if vocab.row_end is None else [vocab.row_end])}))

    def state(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inside [B] bool, codes so far in the open image [B])`` of each row."""
        return self._where(input_ids)[::2]

    def _where(self, input_ids: torch.Tensor):
        """``(inside, tokens since begin_image, codes since begin_image)`` per row."""
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_begin = torch.where(input_ids == self.begin, t, -1).amax(1)
        last_end = torch.where(input_ids == self.end, t, -1).amax(1)
        after = t[None] > last_begin[:, None]
        is_code = torch.isin(input_ids, self.codes.to(input_ids.device))
        return last_begin > last_end, input_ids.shape[1] - 1 - last_begin, (is_code & after).sum(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        inside, step, _ = self._where(input_ids)
        device, vocab = scores.device, scores.shape[1]
        script = self.script.to(device)
        nxt = script[step.to(device).clamp(max=len(script) - 1)]  # the token due next inside
        code = torch.zeros(vocab, dtype=torch.bool, device=device)
        code[self.codes.to(device)] = True
        outside = ~code
        outside[self.closers.to(device)] = False
        forced = torch.zeros_like(scores, dtype=torch.bool)
        forced.scatter_(1, nxt.clamp(min=0)[:, None], True)
        inside = inside.to(device)[:, None]
        allowed = torch.where(inside & (nxt == _CODE)[:, None], code,
                              torch.where(inside, forced, outside))
        return scores.masked_fill(~allowed, float("-inf"))
