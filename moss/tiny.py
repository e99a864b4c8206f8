"""The built-in tiny backbone: a Chameleon built from a config (no download), with a byte
tokenizer, so that ``moss train`` / ``moss generate`` run in a minute on a CPU.

Vocabulary: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<image>``, 4 ``<racm3:break>`` (begin image),
5 ``<eoss>`` (end image), 6..261 the bytes, then the 64 VQ codes as ``IMGIMG*`` tokens. Images
are 4 x 4 grids of codes (VQ resolution 16 over two downsamplings). The weights come from a
fixed seed, so every process builds the same base model.
"""

from __future__ import annotations

import torch

SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<racm3:break>": 4, "<eoss>": 5}
BYTES = 6
CODES = 64
FIRST_CODE = BYTES + 256
GRID = (4, 4)


def code_name(i: int) -> str:
    """Chameleon's spelling of VQ code i: its decimal digits as the letters A-J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"


def build(seed: int = 0):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = dict(SPECIALS)
    vocab.update({code_name(i): FIRST_CODE + i for i in range(CODES)})
    vq = dict(embed_dim=16, num_embeddings=CODES, base_channels=32, channel_multiplier=[1, 2, 2],
              num_res_blocks=1, resolution=16, in_channels=3, latent_channels=16,
              attn_resolutions=[])
    cfg = ChameleonConfig(vocab_size=FIRST_CODE + CODES, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vq_config=vq, vocabulary_map=vocab, image_token_id=3,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ChameleonForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(state)


class ByteTokenizer:
    """UTF-8 bytes as tokens; what the tiny backbone reads and writes."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [BYTES + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - BYTES for i in ids if BYTES <= i < BYTES + 256).decode("utf-8", "replace")
