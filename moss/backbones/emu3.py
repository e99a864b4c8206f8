"""Emu3 (``Emu3ForConditionalGeneration``).

Image tokens are the visual tokens (the ``<|visual token NNNNNN|>`` entries of
``config.vocabulary_map``). An image is written as its size in text (``H*W``), then H rows of W
visual tokens, each row closed by the end-of-line token ``<|extra_200|>``, then end-of-frame and
image-end tokens; the size varies per image (pixels / 8), so routing reads each image's width
from its first row end (``RoutingPlan.from_input_ids(..., grid=None, row_end_ids=[eol])``) and
the convolution runs over the H x W visual tokens only: the end-of-line tokens are text.

For ``moss train`` / ``generate`` (:meth:`Emu3Spec.vocabulary`), an image is spelled as Emu3's
processor spells it: ``<|image start|>``, "H*W" through the tokenizer, ``<|image token|>``, the
rows, ``<|extra_201|>`` (end of frame), ``<|image end|>``. Image files are encoded by the
model's own VQ-VAE at their own size over its downsampling (scaled down, aspect kept, to at most
:attr:`Emu3Spec.image_grid`'s area and ``max_image_width`` wide), and generated codes are
decoded by its VQ decoder to pixels: PNGs of the picture itself. Pixels are taken to be in
[-1, 1] both ways (mean and std 0.5, as Emu3's vision tokenizer normalises).

What MOSS routes is visual tokens in ``input_ids``, as Emu3's generations and its pre-tokenized
training data hold them; a batch that still holds ``<image>`` placeholders (to be replaced by
``pixel_values``' embeddings inside the model) is refused, since the placeholders do not say
which positions are row ends (``model.model.get_image_tokens`` gives the visual tokens and row
ends to put in their place). Generation keeps, per sequence, the rows closed, the column and
the image's width (moss/router.py), so prefill + decode equals the full forward; the decode
state holds images up to ``max_image_width`` wide: a wider row is refused where input values
are checked (ids on the CPU, or ``MOSS_CHECK_INPUTS=1`` on a GPU); unchecked on a GPU, it would
be decoded from wrong ring slots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import BackboneSpec, TextCodec, Vocabulary

ROW_END = "<|extra_200|>"
#: What Emu3's processor writes around an image, by role.
MARKERS = {"begin": "<|image start|>", "size_end": "<|image token|>", "row_end": ROW_END,
           "end_of_frame": "<|extra_201|>", "end": "<|image end|>"}


class Emu3Spec(BackboneSpec):
    name = "emu3"
    model_types = ("emu3",)
    # Room for images 1024 px wide at the VQ-VAE's 8x downsampling (128 tokens a row).
    max_image_width = 128
    has_vocabulary = True
    #: The grid of generated images unless asked otherwise: Emu3's default 720 x 720 pixels
    #: at its VQ-VAE's 8x downsampling.
    image_grid = (90, 90)

    def image_tokens(self, model, ids, grid):
        if grid is not None:
            raise ValueError(f"image_grid: Emu3 images carry their sizes in the sequence (each "
                             f"row closed by {ROW_END}); leave image_grid unset, got {grid!r}")
        vmap = model.config.vocabulary_map or {}
        if ids is None:
            ids = sorted(v for name, v in vmap.items() if name.startswith("<|visual token")) or None
        return ids, None

    def row_end_ids(self, model):
        eol = (model.config.vocabulary_map or {}).get(ROW_END)
        return None if eol is None else [int(eol)]

    def unroutable_ids(self, model):
        found = (model.config.vocabulary_map or {}).get("<image>")
        return [] if found is None else [int(found)]

    def decoder_layers(self, model):
        return list(model.model.text_model.layers)

    def vocabulary(self, model, text: TextCodec) -> Vocabulary:
        vmap = model.config.vocabulary_map or {}
        missing = [name for name in MARKERS.values() if name not in vmap]
        if missing:
            raise ValueError(f"model: the Emu3 config's vocabulary_map lacks {missing}; moss "
                             f"spells images with them as Emu3's processor does")
        ids = {role: int(vmap[name]) for role, name in MARKERS.items()}
        visual = {int(name[-8:-2]): tok for name, tok in vmap.items()
                  if name.startswith("<|visual token")}
        return Vocabulary(
            text.encode, [visual[c] for c in sorted(visual)], ids["begin"], ids["end"],
            self.image_grid, bos=text.bos, eos=text.eos, pad=text.pad,
            encode_image_file=self._vq_encoder(model), decode_codes=self._vq_decoder(model),
            row_end=ids["row_end"], trailer=(ids["end_of_frame"],),
            size_header=lambda grid: list(text.encode(f"{grid[0]}*{grid[1]}")) + [ids["size_end"]])

    def _vq_encoder(self, model):
        """``path -> rows of VQ codes`` through the model's VQ-VAE."""
        vq = model.model.vqmodel
        factor, area = vq.vision_spatial_factor, self.image_grid[0] * self.image_grid[1]

        def encode(path: Path) -> list[list[int]]:
            from PIL import Image

            image = Image.open(path).convert("RGB")
            h, w = max(1, round(image.height / factor)), max(1, round(image.width / factor))
            shrink = min(1.0, (area / (h * w)) ** 0.5, self.max_image_width / w)
            h, w = max(1, int(h * shrink)), max(1, int(w * shrink))
            image = image.resize((w * factor, h * factor))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
            with torch.no_grad():
                out = vq.encode(pixels.permute(2, 0, 1)[None].to(vq.dtype),
                                torch.tensor([[h * factor, w * factor]]))
            return out.image_tokens[0].tolist()

        return encode

    @staticmethod
    def _vq_decoder(model):
        """``rows of VQ codes -> [H', W', 3] uint8`` through the model's VQ decoder."""
        vq = model.model.vqmodel

        def decode(rows: list[list[int]]) -> np.ndarray:
            codes = torch.tensor(rows, dtype=torch.long, device=vq.device)[None]
            with torch.no_grad():
                pixels = vq.decode(codes)[0].float().clamp(-1, 1)
            return ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

        return decode


SPEC = Emu3Spec()
