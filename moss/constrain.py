"""Constrained image decoding: a ``LogitsProcessor`` that keeps generated images well formed.

A backbone writes an image as ``begin_image``, exactly ``H * W`` VQ code tokens, ``end_image``
(moss/backbones: :class:`Vocabulary`). Sampling from a model's logits alone can break that: a
stray code in the text, an image cut short by a text token, one that never ends. With this
processor, at every step and for every row:

* inside an image with fewer than ``H * W`` codes: only code tokens can be chosen;
* inside one with all ``H * W``: only ``end_image``;
* outside: anything but code tokens and ``end_image`` (``begin_image`` opens a new image).

Where a row stands is read from its ids (the prompt included: a prompt may end inside an
image), so the processor holds no state and works for any batch, beam search, sampling, and the
doubled batch of classifier-free guidance. Pass it to ``generate(logits_processor=[...])``;
``moss generate`` always does.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .backbones import Vocabulary


class ImageSpans(LogitsProcessor):
    def __init__(self, vocab: Vocabulary):
        self.begin, self.end = vocab.begin_image, vocab.end_image
        self.codes = torch.tensor(sorted(set(vocab.code_to_token)), dtype=torch.long)
        self.size = vocab.grid[0] * vocab.grid[1]

    def state(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inside [B] bool, codes so far in the open image [B])`` of each row."""
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_begin = torch.where(input_ids == self.begin, t, -1).amax(1)
        last_end = torch.where(input_ids == self.end, t, -1).amax(1)
        inside = last_begin > last_end
        after = t[None] > last_begin[:, None]
        is_code = torch.isin(input_ids, self.codes.to(input_ids.device))
        return inside, (is_code & after).sum(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        inside, n = self.state(input_ids)
        vocab = scores.shape[1]
        code = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
        code[self.codes.to(scores.device)] = True
        end = torch.zeros_like(code)
        end[self.end] = True
        allowed = torch.where((inside & (n < self.size))[:, None], code,
                              torch.where(inside[:, None], end, ~code & ~end))
        return scores.masked_fill(~allowed, float("-inf"))
