"""Generated tokens as a reader sees them: text, and each image as its grid of VQ codes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backbones import Vocabulary


@dataclass
class CodeImage:
    """One image of a token stream: its codes (row-major), grid and whether it ended."""

    codes: list[int]
    grid: tuple[int, int]
    finished: bool


def parts(tokens: list[int], vocab: Vocabulary) -> list[list[int] | CodeImage]:
    """``tokens`` (up to ``vocab.eos``) as text runs and images, in order. An image runs from
    ``begin_image`` to ``end_image``; its header, row ends and trailer are its spelling, not
    text. Its grid is the vocabulary's, or, where rows are closed by a row end, H rows of the
    first row's width (an unfinished first row: as far as it got)."""
    code_of = {tok: code for code, tok in enumerate(vocab.code_to_token)}
    found: list[list[int] | CodeImage] = [[]]
    image: CodeImage | None = None
    width = None
    for tok in tokens:
        if tok == vocab.eos:
            break
        if tok == vocab.begin_image:
            image, width = CodeImage([], vocab.grid, False), None
            found.append(image)
        elif image is not None and tok == vocab.end_image:
            image.finished, image = True, None
            found.append([])
        elif image is None:
            found[-1].append(tok)
        elif tok in code_of:
            image.codes.append(code_of[tok])
        elif tok == vocab.row_end and width is None:
            width = len(image.codes)
        if image is not None and vocab.row_end is not None:
            w = width or max(len(image.codes), 1)
            image.grid = (-(-len(image.codes) // w) or 1, w)
    return [p for p in found if not isinstance(p, list) or p]


def images_of(tokens: list[int], vocab: Vocabulary) -> list[CodeImage]:
    """Each image in ``tokens`` (up to ``vocab.eos``)."""
    return [p for p in parts(tokens, vocab) if isinstance(p, CodeImage)]


def render(tokens: list[int], vocab: Vocabulary, decode: Callable[[list[int]], str]) -> str:
    """Text runs decoded, images shown as code grids (an image cut off by the end of
    generation is marked unfinished)."""
    shown = [decode(p) if isinstance(p, list) else
             _grid(p) + ("" if p.finished else " (unfinished)") for p in parts(tokens, vocab)]
    return "\n".join(s for s in shown if s) or (
        f"(nothing: the {len(tokens)} generated tokens hold no text or image)")


def _grid(image: CodeImage) -> str:
    (h, w), codes = image.grid, image.codes
    rows = [" ".join(f"{c:3d}" for c in codes[r * w:(r + 1) * w]) for r in range(h)]
    return f"[image {h}x{w} VQ codes]\n" + "\n".join(r for r in rows if r)
