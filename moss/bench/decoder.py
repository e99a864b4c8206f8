"""``moss bench --model``'s case: a small Llama-family decoder built from its config (random
weights, nothing downloaded) and a batch of interleaved sequences for it.

Each of the ``batch`` sequences is ``tokens`` long: ``images`` images of ``H x W`` image tokens,
with the rest of the tokens text, in runs before, between and after them (split evenly). The
upper half of the vocabulary is the image tokens' reserved range (what
``MossConfig(image_token_ids=..., image_grid=(H, W))`` is given), the lower half text; the ids
are drawn at random from their half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelCase:
    name: str
    d_model: int = 512
    layers: int = 4
    heads: int = 8
    vocab: int = 4096
    batch: int = 2
    tokens: int = 1000  # per sequence
    images: int = 3  # per sequence
    grid: tuple[int, int] = (16, 16)
    rank: int = 16  # both adapters
    kernel_size: int = 2
    decode_tokens: int = 64  # decoded inside the last image

    def label(self) -> str:
        return (f"{self.name}: d {self.d_model}, {self.layers} layers, {self.heads} heads, vocab "
                f"{self.vocab}; {self.batch} x {self.tokens} tokens with {self.images} "
                f"{self.grid[0]} x {self.grid[1]} images each; R={self.rank} K={self.kernel_size}")

    def problems(self) -> list[str]:
        """What makes the case impossible, as ``--option: why`` (empty when it is fine)."""
        found = [f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}"
                 for f in ("d_model", "layers", "heads", "batch", "tokens", "images", "rank",
                           "kernel_size", "decode_tokens") if getattr(self, f) < 1]
        if min(self.grid) < 1:
            found.append(f"--grid must be >= 1, got {self.grid}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            found.append(f"--heads must divide --d-model ({self.d_model}) into an even head "
                         f"size (rotary embeddings rotate pairs), got {self.heads}")
        if self.vocab < 4:
            found.append(f"--vocab must be >= 4 (half text, half image ids), got {self.vocab}")
        if self.images * self.hw >= self.tokens:
            found.append(f"--tokens must exceed --images x H x W = {self.images * self.hw} "
                         f"(the images and at least one text token), got {self.tokens}")
        if self.decode_tokens > self.hw:
            found.append(f"--decode-tokens must be at most H x W = {self.hw} (decoding stays "
                         f"inside the last image), got {self.decode_tokens}")
        return found

    @property
    def hw(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def ffn(self) -> int:
        """The MLP's width: Llama's 8/3 of d_model, rounded up to a multiple of 64."""
        return math.ceil(8 * self.d_model / 3 / 64) * 64

    @property
    def image_ids(self) -> range:
        return range(self.vocab // 2, self.vocab)

    def image_starts(self) -> list[int]:
        """Where each image starts in a sequence: the text split into ``images + 1`` runs."""
        text = self.tokens - self.images * self.hw
        runs = [text // (self.images + 1) + (i < text % (self.images + 1))
                for i in range(self.images + 1)]
        return [sum(runs[:i + 1]) + i * self.hw for i in range(self.images)]

    def decoder(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        """A ``LlamaForCausalLM`` of this size with random weights, every parameter frozen."""
        import transformers

        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.d_model, intermediate_size=self.ffn,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.heads, max_position_embeddings=self.tokens)
        model = transformers.LlamaForCausalLM(cfg).to(device, dtype)
        return model.requires_grad_(False)

    def input_ids(self, device: torch.device, seed: int = 0) -> torch.Tensor:
        """``[batch, tokens]`` int64: random text ids with random image ids at the images."""
        gen = torch.Generator().manual_seed(seed)
        half = self.vocab // 2
        ids = torch.randint(0, half, (self.batch, self.tokens), generator=gen)
        for start in self.image_starts():
            ids[:, start:start + self.hw] = torch.randint(half, self.vocab, (self.batch, self.hw),
                                                          generator=gen)
        return ids.to(device)


#: The issue's CPU target: fp32, d 512, 4 layers, 2 x 1000 tokens with three 16 x 16 images
#: each, ranks 16, K 2.
CPU_MODEL = ModelCase("decoder")
#: A few seconds on 2 cores (--quick, the tests).
QUICK_MODEL = ModelCase("decoder-quick", d_model=64, layers=2, heads=4, vocab=256, tokens=100,
                        images=2, grid=(6, 6), rank=4, decode_tokens=8)
