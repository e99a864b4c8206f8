"""Classifier-free guidance for image tokens, in one batch: a ``LogitsProcessor``.

The batch holds each prompt twice: rows ``[0, B)`` conditional (the caption), rows ``[B, 2B)``
unconditional (no caption), left-padded like any batch; MOSS routes them and keeps their decode
state like any other rows. Inside an image (as moss/constrain.py reads a conditional row's ids)
the next token comes from the guided logits ``u + scale * (c - u)``; outside, from ``c``. Both
rows of a pair must continue with the same token, so this processor chooses it (greedy, or
sampled from the softmax with torch's generator when ``sample``) and returns, for both rows,
logits that allow only that token: run ``generate`` with ``do_sample=False`` and put this
processor after :class:`~moss.constrain.ImageSpans` (whose masks it then respects).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .constrain import ImageSpans


class ImageGuidance(LogitsProcessor):
    def __init__(self, spans: ImageSpans, scale: float, sample: bool = False):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise ValueError(f"scale: expected a number, got {scale!r}")
        self.spans, self.scale, self.sample = spans, float(scale), sample

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] % 2:
            raise ValueError(f"scores: expected conditional and unconditional rows (an even "
                             f"batch), got {scores.shape[0]} rows")
        b = scores.shape[0] // 2
        cond, uncond = scores[:b].float(), scores[b:].float()
        inside, _ = self.spans.state(input_ids[:b])
        guided = torch.where(inside[:, None], uncond + self.scale * (cond - uncond), cond)
        guided = guided.masked_fill(cond == float("-inf"), float("-inf"))  # masked stays masked
        if self.sample:
            token = torch.multinomial(torch.softmax(guided, dim=-1), 1)
        else:
            token = guided.argmax(-1, keepdim=True)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, token.repeat(2, 1), 0.0)
