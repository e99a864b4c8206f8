"""Chameleon / Anole (``ChameleonForConditionalGeneration``).

Image tokens are the VQ code ids (the ``IMGIMG*`` entries of ``config.vocabulary_map``, the
code's decimal digits spelled as the letters A-J) and the ``<image>`` placeholder; an image is
``<racm3:break>``, H*W codes in raster order, ``<eoss>``. The grid is the VQ resolution over the
encoder's downsampling, ``resolution / 2**(levels - 1)`` (512 / 16 = 32 x 32 for the released
models). transformers' Chameleon sets image-token logits to the dtype's minimum (a text-only
model), which makes a loss over image tokens inf and image generation impossible, so
``unmask_image_logits`` lifts that on one model instance. Its VQ-VAE (``vqmodel``) encodes
images into codes; transformers ships no decoder for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import BackboneSpec, TextCodec, Vocabulary


class _UnmaskedVocabulary:
    """Chameleon's image-vocabulary mapping with an empty ``image_tokens`` list; everything
    else is the wrapped mapping's."""

    def __init__(self, mapping):
        self._mapping = mapping

    image_tokens: list = []

    def __getattr__(self, name):
        return getattr(self._mapping, name)


class ChameleonSpec(BackboneSpec):
    name = "chameleon"
    model_types = ("chameleon",)
    has_vocabulary = True

    def image_tokens(self, model, ids, grid):
        hf = model.config
        if ids is None and hf.vocabulary_map:
            placeholder = getattr(hf, "image_token_id", None)
            ids = self._codes(hf) + ([] if placeholder is None else [int(placeholder)]) or None
        return super().image_tokens(model, ids, grid or self._grid(hf))

    def unmask_image_logits(self, model):
        inner = getattr(model, "model", None)  # ChameleonModel itself has no logits to unmask
        mapping = getattr(inner, "vocabulary_mapping", None)
        if mapping is None or isinstance(mapping, _UnmaskedVocabulary):
            return None
        inner.vocabulary_mapping = _UnmaskedVocabulary(mapping)
        return lambda: setattr(inner, "vocabulary_mapping", mapping)

    def vocabulary(self, model, text: TextCodec) -> Vocabulary:
        hf = model.config
        vmap = hf.vocabulary_map
        return Vocabulary(text.encode, self._codes(hf), vmap["<racm3:break>"], vmap["<eoss>"],
                          self._grid(hf), bos=text.bos, eos=text.eos, pad=text.pad,
                          encode_image_file=self._vq_encoder(model))

    @staticmethod
    def _codes(hf) -> list[int]:
        """Token ids of VQ codes 0, 1, ...: ``IMGIMG<code as letters A-J>Z``."""
        digits = str.maketrans("ABCDEFGHIJ", "0123456789")
        by_code = {int(name[6:-1].translate(digits)): tok
                   for name, tok in hf.vocabulary_map.items() if name.startswith("IMGIMG")}
        return [by_code[c] for c in sorted(by_code)]

    @staticmethod
    def _grid(hf) -> tuple[int, int]:
        vq = hf.vq_config
        side = int(vq.resolution) // 2 ** (len(vq.channel_multiplier) - 1)
        return side, side

    @staticmethod
    def _vq_encoder(model: nn.Module):
        """``path -> rows of VQ codes`` through the model's own VQ-VAE (resized to its
        resolution)."""
        resolution, grid = model.config.vq_config.resolution, ChameleonSpec._grid(model.config)

        def encode(path: Path) -> list[int]:
            import numpy as np
            from PIL import Image

            image = Image.open(path).convert("RGB").resize((resolution, resolution))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
            with torch.no_grad():
                out = model.model.vqmodel.encode(pixels.permute(2, 0, 1)[None])
            return out.image_tokens.reshape(grid).tolist()

        return encode


SPEC = ChameleonSpec()
