"""Generated images as PNG files: pixels from the backbone's VQ decoder where it has one, else a
clearly labelled picture of the code grid.

transformers ships no VQ decoder for Chameleon (its ``vqmodel`` only encodes), so there the
PNG shows the H x W grid of codes: one cell per code, its colour a fixed function of the code
(equal codes look equal, neighbouring codes do not look alike), under a caption saying that
this is a code grid and not the picture. A backbone whose :class:`Vocabulary` has
``decode_codes`` (rows of codes -> ``[H', W', 3]`` uint8 pixels) gets its real pixels instead.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import PIL.Image
from PIL import ImageDraw

from .backbones import Vocabulary
from .render import CodeImage

CELL = 16  # pixels per code in a code-grid picture
_CAPTION = 14  # pixels of caption band


def code_colour(code: int) -> tuple[int, int, int]:
    """A fixed colour per code: hues spread by the golden ratio, three brightness levels."""
    hue = (code * 0.6180339887) % 1.0
    value = (0.95, 0.75, 0.55)[code % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, value)
    return int(r * 255), int(g * 255), int(b * 255)


def code_grid(codes: list[int], grid: tuple[int, int], caption: str) -> PIL.Image.Image:
    """The code grid as a picture, with ``caption`` above it (cells not generated: grey)."""
    h, w = grid
    cells = np.full((h, w, 3), 128, dtype=np.uint8)
    for i, c in enumerate(codes[:h * w]):
        cells[i // w, i % w] = code_colour(c)
    body = PIL.Image.fromarray(cells).resize((w * CELL, h * CELL), PIL.Image.NEAREST)
    text_width = int(ImageDraw.Draw(body).textlength(caption)) + 4
    out = PIL.Image.new("RGB", (max(body.width, text_width), body.height + _CAPTION), "white")
    out.paste(body, (0, _CAPTION))
    ImageDraw.Draw(out).text((2, 1), caption, fill="black")
    return out


def save_png(image: CodeImage, vocab: Vocabulary, path: Path, backbone: str) -> str:
    """Write one generated image to ``path``; returns what was written (pixels or code grid).
    An unfinished image (generation stopped inside it) is always drawn as its code grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (h, w), codes = image.grid, image.codes
    if vocab.decode_codes is not None and image.finished:
        rows = [codes[r * w:(r + 1) * w] for r in range(h)]
        PIL.Image.fromarray(vocab.decode_codes(rows)).save(path)
        return "pixels"
    state = "" if image.finished else f", unfinished: {len(codes)} of {h * w}"
    caption = f"{h}x{w} VQ codes ({backbone}: no pixel decoder{state})"
    if vocab.decode_codes is not None:
        caption = f"{h}x{w} VQ codes ({backbone}{state})"
    code_grid(codes, image.grid, caption).save(path)
    return "code grid"
