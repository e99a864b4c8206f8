"""Janus / Janus-Pro (``JanusForConditionalGeneration``): an embedding-fed image generator.

Janus generates an image as H x W VQ codes (24 x 24 in the released models) that enter its
Llama language model through their own embedding table and aligner
(``prepare_embeddings_for_image_generation``), not as token ids, and whose logits come from its
own head (``model.model.generation_head``), not ``lm_head``. No image id ever appears in
``input_ids``, so MOSS routes Janus's generated images from explicit layouts (``route`` and
``images``), trained and generated through moss/embedding_fed.py; the grid is its vision
config's ``num_image_tokens`` as a square.

Only the language model is adapted: the SigLIP vision tower (whose attention also names
``q_proj`` / ``k_proj`` / ``v_proj``), the aligners, the generation head and the VQ-VAE are not.
Understanding inputs (``<image_placeholder>`` ids replaced by SigLIP features from
``pixel_values``) are refused when routed from ids: the placeholders say nothing of the grid.
"""

from __future__ import annotations

import math

from .base import BackboneSpec


class JanusSpec(BackboneSpec):
    name = "janus"
    model_types = ("janus",)
    never_wrap = ("vqmodel", "vision_model", "aligner", "generation_aligner", "generation_head")

    def image_tokens(self, model, ids, grid):
        if grid is None:
            side = math.isqrt(int(model.config.vision_config.num_image_tokens))
            grid = (side, side)
        return ids, grid

    def unroutable_ids(self, model):
        found = getattr(model.config, "image_token_id", None)
        return [] if found is None else [int(found)]

    def decoder_layers(self, model):
        return list(model.model.language_model.layers)

    def image_generation(self, model):
        return model.prepare_embeddings_for_image_generation, model.model.generation_head


SPEC = JanusSpec()
