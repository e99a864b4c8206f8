"""What a backbone spec says, and the generic spec: any decoder whose image tokens are given
explicitly (docs/design.md section 7).

A spec answers, for one model family:

* which ``nn.Linear`` modules are adapted by default (``targets``) and which never are (a
  vision tower's or VQ-VAE's, ``never_wrap``);
* how image tokens are found for routing from ``input_ids`` (``image_tokens``: their ids and
  H x W grid; ``row_end_ids`` when rows are separated and sizes read from the sequence), and
  whether the model masks their logits (``unmask_image_logits``);
* when it has one (``has_vocabulary``), how it spells interleaved data (``vocabulary``: text
  encoder, image-code tokens, begin / end of image, the VQ encoder that turns an image file
  into codes) and how a local checkpoint is loaded (``load_model``), for ``moss train`` /
  ``generate`` / ``experiment``.

The generic spec knows no image vocabulary: image tokens are ``MossConfig.image_token_ids`` on
``MossConfig.image_grid``, or an explicit layout (``route`` / ``images``) given to
``MossModel.forward``, as for Emu2's LLaMA fed embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn


@dataclass
class Vocabulary:
    """How a backbone spells interleaved data: a text encoder and the image token ids.

    An image is ``begin_image``, its header, H rows of W code tokens (each followed by
    ``row_end`` when there is one), ``trailer``, ``end_image``. Chameleon: no header, no row
    ends, one fixed ``grid``. Emu3: the header writes the image's size as text (``size_header``:
    each image has its own grid, ``grid`` is the default for generated ones), rows are closed by
    an end-of-line token and the trailer is its end-of-frame token.
    """

    encode_text: Callable[[str], list[int]]
    code_to_token: list[int]  # VQ code -> token id
    begin_image: int
    end_image: int
    grid: tuple[int, int]  # every image's; with ``size_header``, generated images' default
    bos: int | None = None
    eos: int | None = None
    pad: int = 0
    encode_image_file: Callable[[Path], list[list[int]]] | None = None  # -> rows of codes
    # rows of codes -> [H', W', 3] uint8 pixels, when the backbone has a VQ decoder
    decode_codes: Callable[[list[list[int]]], np.ndarray] | None = None
    row_end: int | None = None
    size_header: Callable[[tuple[int, int]], list[int]] | None = None  # grid -> tokens
    trailer: tuple[int, ...] = ()

    @property
    def sized(self) -> bool:
        """Whether each image writes its own size (else every image has ``grid``)."""
        return self.size_header is not None

    def opening(self, grid: tuple[int, int] | None = None) -> list[int]:
        """The tokens before an image's first code."""
        return [self.begin_image] + (self.size_header(grid or self.grid) if self.sized else [])

    def closing(self) -> list[int]:
        """The tokens after an image's last code (and row end)."""
        return [*self.trailer, self.end_image]

    def image(self, codes: list[int], grid: tuple[int, int] | None = None) -> list[int]:
        """The tokens of an image of ``grid`` (default ``self.grid``): ``codes`` row-major."""
        h, w = grid or self.grid
        if len(codes) != h * w:
            raise ValueError(f"codes: expected {h * w} for a {h} x {w} image, got {len(codes)}")
        body = []
        for r in range(h):
            body += [self.code_to_token[c] for c in codes[r * w:(r + 1) * w]]
            body += [] if self.row_end is None else [self.row_end]
        return self.opening(grid) + body + self.closing()


@dataclass(frozen=True)
class TextCodec:
    """The tokenizer's side of a Vocabulary."""

    encode: Callable[[str], list[int]]
    bos: int | None
    eos: int | None
    pad: int


class BackboneSpec:
    name = "generic"
    #: The HF ``config.model_type`` values this spec serves (the registry's keys).
    model_types: tuple[str, ...] = ()
    #: Every attention and MLP projection of Llama-family decoders.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    #: Module-path components whose linear layers are never adapted: an image tokenizer's
    #: (transformers names it ``vqmodel`` in Chameleon, Emu3 and Janus) is not the language model.
    never_wrap: tuple[str, ...] = ("vqmodel",)
    #: With row ends (:meth:`row_end_ids`): the widest image the decode state holds (its ring
    #: of tap products is sized for it).
    max_image_width = 0
    #: Whether :meth:`vocabulary` exists: the backbone spells images as tokens moss can read
    #: and write (what ``moss train`` / ``generate`` need).
    has_vocabulary = False

    def image_tokens(self, model: nn.Module, ids: list[int] | None, grid: tuple[int, int] | None
                     ) -> tuple[list[int] | None, tuple[int, int] | None]:
        """``(image token ids, grid)`` for routing from ``input_ids``, given the MossConfig's
        (which win); ids None: every token id is text."""
        if ids is not None and grid is None:
            raise ValueError("image_grid: the backbone has image tokens but no known grid; set "
                             "MossConfig(image_grid=(H, W))")
        return ids, grid

    def row_end_ids(self, model: nn.Module) -> list[int] | None:
        """Token ids that close each image row (Emu3's end-of-line), when images are rows
        separated by them and sized in the sequence (``RoutingPlan.from_input_ids(...,
        row_end_ids=...)``); None: images are H x W runs of image tokens on the grid."""
        return None

    def unroutable_ids(self, model: nn.Module) -> list[int]:
        """Token ids that cannot be routed from ``input_ids`` (placeholders the model replaces
        by embeddings whose layout they do not say); a batch holding one is refused."""
        return []

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in order (what FSDP2 shards one by one); Llama-family
        layout: ``model.model.layers``."""
        return list(model.model.layers)

    def unmask_image_logits(self, model: nn.Module) -> Callable[[], None] | None:
        """Let the model predict image tokens; returns the undo, or None if it masks nothing."""
        return None

    def image_generation(self, model: nn.Module) -> tuple[Callable, Callable]:
        """For embedding-fed generators (Janus): ``(embed_codes, code_logits)``, VQ codes
        ``[B, n]`` -> input embeddings and final hidden states -> code logits
        (moss/embedding_fed.py)."""
        raise NotImplementedError(f"the {self.name} backbone spec knows no embedding-fed image "
                                  f"generation; pass embed_codes and code_logits")

    # A spec with ``has_vocabulary`` defines this (the generic one cannot).
    def vocabulary(self, model: nn.Module, text: TextCodec) -> Vocabulary:
        """How ``model`` spells interleaved data, its text side given by ``text``."""
        raise NotImplementedError(f"the {self.name} backbone spec has no image vocabulary")

    def load_model(self, path: Path) -> nn.Module:
        """The model of a local checkpoint folder (no download): transformers' image-text-to-
        text class for its ``model_type`` (Chameleon, Emu3, Janus)."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)


GENERIC = BackboneSpec()
