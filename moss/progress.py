"""A progress bar per image while ``generate`` runs: a pass-through ``LogitsProcessor``.

Generating one Chameleon image is 1,024 decode steps; a user wants to see it advance. Called
once per step with every row's ids, this reads where each row stands (moss/constrain.py's
:meth:`ImageSpans.state`) and keeps one tqdm bar per image being generated, labelled by its row
(``labels``; None: no bar for that row, as for the unconditional rows of guidance). Scores
pass through unchanged. Call :meth:`close` after ``generate``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from .constrain import ImageSpans


class ImageProgress(LogitsProcessor):
    def __init__(self, spans: ImageSpans, labels: list[str | None], disable: bool | None = None):
        self.spans, self.labels, self.disable = spans, labels, disable
        self.bars: dict[int, tqdm] = {}
        self.done = [0] * len(labels)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        inside, n = self.spans.state(input_ids)
        for row, (open_, count) in enumerate(zip(inside.tolist(), n.tolist())):
            label = self.labels[row] if row < len(self.labels) else None
            if label is None:
                continue
            bar = self.bars.get(row)
            if open_ and bar is None:
                bar = self.bars[row] = tqdm(total=self.spans.size, unit="code", leave=True,
                                            desc=f"{label}, image {self.done[row] + 1}",
                                            disable=self.disable)
            if bar is not None:
                bar.update(min(count, self.spans.size) - bar.n)
                if not open_:
                    self._finish(row)
        return scores

    def _finish(self, row: int) -> None:
        self.bars.pop(row).close()
        self.done[row] += 1

    def close(self) -> None:
        for row in list(self.bars):
            self._finish(row)
