"""Routing per backbone family: which token ids are image tokens, and on what grid.

* Chameleon / Anole (``ChameleonForConditionalGeneration``): image tokens are the VQ code ids
  (the ``IMGIMG*`` entries of ``config.vocabulary_map``) and the ``<image>`` placeholder; the
  grid is the VQ resolution over the encoder's downsampling, ``resolution / 2**(levels - 1)``
  (512 / 16 = 32 x 32 for the released models).
* Any causal LM whose image tokens are known ids (Anole- or Emu3-like vocabularies):
  ``MossConfig.image_token_ids`` and ``image_grid``.
* Llama-family decoders fed embeddings (Emu2's backbone): no image ids; the caller passes the
  layout explicitly (``route`` / ``images``).

``MossConfig`` values win over what the backbone says.
"""

from __future__ import annotations

from torch import nn

from .config import MossConfig


def image_vocabulary(model: nn.Module, cfg: MossConfig) -> tuple[list[int] | None, tuple[int, int] | None]:
    """``(image token ids, grid)`` for routing from ``input_ids``; ids None: text-only ids."""
    hf = getattr(model, "config", None)
    ids, grid = cfg.image_token_ids, cfg.image_grid
    if ids is None and getattr(hf, "vocabulary_map", None):
        ids = sorted(v for k, v in hf.vocabulary_map.items() if k.startswith("IMGIMG"))
        placeholder = getattr(hf, "image_token_id", None)
        if placeholder is not None:
            ids.append(int(placeholder))
        ids = ids or None
    vq = getattr(hf, "vq_config", None)
    if grid is None and vq is not None and getattr(vq, "resolution", None):
        side = int(vq.resolution) // 2 ** (len(vq.channel_multiplier) - 1)
        grid = (side, side)
    if ids is not None and grid is None:
        raise ValueError(
            "image_grid: the backbone has image tokens but no known grid; set "
            "MossConfig(image_grid=(H, W))")
    return ids, grid


class _UnmaskedVocabulary:
    """Chameleon's image-vocabulary mapping with an empty ``image_tokens`` list: transformers'
    Chameleon sets the logits of those ids to the dtype's minimum (a text-only model), which
    makes a loss over image tokens inf and interleaved generation impossible. Everything else
    is the wrapped mapping's."""

    def __init__(self, mapping):
        self._mapping = mapping

    image_tokens: list = []

    def __getattr__(self, name):
        return getattr(self._mapping, name)


def unmask_image_logits(model: nn.Module):
    """Lift Chameleon's image-logit mask on this one model instance; returns the undo, or
    None when the model masks nothing (only Chameleon does)."""
    inner = getattr(model, "model", None)
    mapping = getattr(inner, "vocabulary_mapping", None)
    if mapping is None or isinstance(mapping, _UnmaskedVocabulary):
        return None
    inner.vocabulary_mapping = _UnmaskedVocabulary(mapping)
    return lambda: setattr(inner, "vocabulary_mapping", mapping)
