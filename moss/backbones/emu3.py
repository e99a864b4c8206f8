"""Emu3 (``Emu3ForConditionalGeneration``).

Image tokens are the visual tokens (the ``<|visual token NNNNNN|>`` entries of
``config.vocabulary_map``). An image is written as its size in text (``H*W``), then H rows of W
visual tokens, each row closed by the end-of-line token ``<|extra_200|>``, then end-of-frame and
image-end tokens; the size varies per image (pixels / 8), so routing reads each image's width
from its first row end (``RoutingPlan.from_input_ids(..., grid=None, row_end_ids=[eol])``) and
the convolution runs over the H x W visual tokens only: the end-of-line tokens are text.

What MOSS routes is visual tokens in ``input_ids``, as Emu3's generations and its pre-tokenized
training data hold them; a batch that still holds ``<image>`` placeholders (to be replaced by
``pixel_values``' embeddings inside the model) is refused, since the placeholders do not say
which positions are row ends (``model.model.get_image_tokens`` gives the visual tokens and row
ends to put in their place). Generation keeps, per sequence, the rows closed, the column and
the image's width (moss/router.py), so prefill + decode equals the full forward; the decode
state holds images up to ``max_image_width`` wide.
"""

from __future__ import annotations

from .base import BackboneSpec

ROW_END = "<|extra_200|>"


class Emu3Spec(BackboneSpec):
    name = "emu3"
    model_types = ("emu3",)
    # Room for images 1024 px wide at the VQ-VAE's 8x downsampling (128 tokens a row).
    max_image_width = 128

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


SPEC = Emu3Spec()
