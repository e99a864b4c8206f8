"""Generated tokens as a reader sees them: text, and each image as its grid of VQ codes."""

from __future__ import annotations

from collections.abc import Callable

from .backbones import Vocabulary


def render(tokens: list[int], vocab: Vocabulary, decode: Callable[[list[int]], str]) -> str:
    """Text runs decoded, images between ``vocab.begin_image`` and ``vocab.end_image`` shown as
    code grids (an image cut off by the end of generation is marked unfinished)."""
    code_of = {tok: code for code, tok in enumerate(vocab.code_to_token)}
    parts, text, codes = [], [], None
    for tok in tokens:
        if tok == vocab.eos:
            break
        if tok == vocab.begin_image:
            parts.append(decode(text))
            text, codes = [], []
        elif tok == vocab.end_image and codes is not None:
            parts.append(_grid(codes, vocab.grid))
            codes = None
        elif codes is not None and tok in code_of:
            codes.append(code_of[tok])
        else:
            text.append(tok)
    if codes is not None:
        parts.append(_grid(codes, vocab.grid) + " (unfinished)")
    parts.append(decode(text))
    shown = "\n".join(p for p in parts if p)
    return shown or f"(nothing: the {len(tokens)} generated tokens hold no text or image)"


def images_of(tokens: list[int], vocab: Vocabulary) -> list[tuple[list[int], bool]]:
    """Each image in ``tokens`` (up to ``vocab.eos``): its VQ codes and whether it ended."""
    code_of = {tok: code for code, tok in enumerate(vocab.code_to_token)}
    found, codes = [], None
    for tok in tokens:
        if tok == vocab.eos:
            break
        if tok == vocab.begin_image:
            codes = []
        elif tok == vocab.end_image and codes is not None:
            found.append((codes, True))
            codes = None
        elif codes is not None and tok in code_of:
            codes.append(code_of[tok])
    return found + ([(codes, False)] if codes is not None else [])


def _grid(codes: list[int], grid: tuple[int, int]) -> str:
    h, w = grid
    rows = [" ".join(f"{c:3d}" for c in codes[r * w:(r + 1) * w]) for r in range(h)]
    return f"[image {h}x{w} VQ codes]\n" + "\n".join(r for r in rows if r)
