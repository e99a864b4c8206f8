"""Embedding-fed image generators (Janus / Janus-Pro): training and generation with MOSS.

Such a model writes an image as H x W VQ codes that enter its language model as embeddings
(``embed_codes``: codes ``[B, n]`` -> ``[B, n, d]``) and are predicted by a head of their own
(``code_logits``: final hidden states -> code logits); no image id appears in ``input_ids``. So
MOSS routes them from an explicit layout: a text prompt (left-padded ids), then the image's
H*W code embeddings, ``route`` 0 / 1 and one image per row at the prompt's end
(:func:`text_then_image`). Generation is a decode loop of its own (transformers' ``generate``
feeds ids), each step giving the new code's route, so the layers' incremental ConvLoRA state
runs as for token-based images and prefill + decode equals the full forward
(MossModel.forward: explicit layouts).

    moss = get_moss_model(janus, MossConfig(r_text=16, r_image=16))   # grid from the config
    batch = text_then_image(moss, ids, mask, codes)          # codes [B, H*W]
    loss = image_loss(moss, batch, codes)                    # the codes' cross-entropy
    codes = generate_image(moss, ids, mask, guidance_scale=5.0, unconditional_ids=uncond)
    pixels = janus.decode_image_tokens(codes)                # [B, H', W', 3] in [-1, 1]

``embed_codes`` / ``code_logits`` default to the backbone's (Janus:
``prepare_embeddings_for_image_generation`` and ``model.model.generation_head``); pass them for
any other embedding-fed generator. Classifier-free guidance runs the unconditional prompts
(Janus: the caption's tokens replaced by its pad id, as its own ``generate`` does) in the same
batch and samples ``u + scale * (c - u)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import MossModel, cache_kwarg


def text_then_image(moss: MossModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    codes: torch.Tensor, embed_codes: Callable | None = None) -> dict:
    """The forward arguments of a batch of left-padded prompts each followed by an image of
    ``codes`` ``[B, k]`` (k <= H*W: an image being generated may be partial), the grid
    ``moss.image_grid``: ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``route``,
    ``images``."""
    embed_codes = embed_codes or moss.backbone.image_generation(moss.model)[0]
    b, t = _check_prompt(input_ids, attention_mask)
    h, w = _grid(moss)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[0] != b:
        raise ValueError(f"codes: expected a [{b}, n] tensor of VQ codes, got "
                         f"{getattr(codes, 'shape', type(codes).__name__)}")
    n = codes.shape[1]
    if n > h * w:
        raise ValueError(f"codes: {n} codes per row, more than one {h} x {w} image holds")
    text = moss.model.get_input_embeddings()(input_ids)
    embeds = torch.cat([text, embed_codes(codes).to(text.dtype)], 1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, n)], 1)
    route = torch.cat([torch.where(attention_mask.bool(), 0, -1), mask.new_ones(b, n)], 1)
    images = [[row * (t + n) + t, h, w] for row in range(b)] if n else []
    return {"inputs_embeds": embeds, "attention_mask": mask, "route": route,
            "images": torch.tensor(images, dtype=torch.int64).reshape(-1, 3),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def image_loss(moss: MossModel, batch: dict, codes: torch.Tensor,
               code_logits: Callable | None = None) -> torch.Tensor:
    """Cross-entropy of ``codes`` (the image ending each row of ``batch``, as
    :func:`text_then_image` built it), each predicted from the hidden state before it."""
    code_logits = code_logits or moss.backbone.image_generation(moss.model)[1]
    n = codes.shape[1]
    hidden = moss(**batch, output_hidden_states=True).hidden_states[-1]
    logits = code_logits(hidden[:, -n - 1:-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten().to(logits.device))


@torch.no_grad()
def generate_image(moss: MossModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   embed_codes: Callable | None = None, code_logits: Callable | None = None, *,
                   guidance_scale: float | None = None,
                   unconditional_ids: torch.Tensor | None = None, sample: bool = False,
                   temperature: float = 1.0, generator: torch.Generator | None = None,
                   progress: bool = True) -> torch.Tensor:
    """One image of ``moss.image_grid`` per prompt: its codes ``[B, H*W]``, decoded with a KV
    cache and the layers' incremental ConvLoRA state; greedy, or sampled at ``temperature``.
    With ``guidance_scale``, ``unconditional_ids`` (the prompts' shape, same padding) run
    beside the prompts and the codes follow ``u + scale * (c - u)``."""
    from transformers import DynamicCache

    if embed_codes is None or code_logits is None:
        embed, head = moss.backbone.image_generation(moss.model)
        embed_codes, code_logits = embed_codes or embed, code_logits or head
    b, _ = _check_prompt(input_ids, attention_mask)
    h, w = _grid(moss)
    guided = guidance_scale is not None
    if guided:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or guidance_scale != guidance_scale:
            raise ValueError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        if not isinstance(unconditional_ids, torch.Tensor) or \
                unconditional_ids.shape != input_ids.shape:
            raise ValueError(f"unconditional_ids: expected a tensor of the prompts' shape "
                             f"{tuple(input_ids.shape)} with guidance_scale, got "
                             f"{getattr(unconditional_ids, 'shape', None)}")
        input_ids = torch.cat([input_ids, unconditional_ids.to(input_ids.device)])
        attention_mask = attention_mask.repeat(2, 1)
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    cache = {cache_kwarg(moss.model): DynamicCache(), "use_cache": True,
             "output_hidden_states": True}
    mask = attention_mask
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = moss(inputs_embeds=moss.model.get_input_embeddings()(input_ids), attention_mask=mask,
               position_ids=position, route=torch.where(mask.bool(), 0, -1),
               images=torch.zeros(0, 3, dtype=torch.int64), **cache)
    codes = torch.zeros(b, h * w, dtype=torch.long, device=input_ids.device)
    for i in tqdm(range(h * w), desc=f"image codes ({h}x{w})", unit="code", disable=not progress):
        logits = code_logits(out.hidden_states[-1][:, -1]).float()
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + guidance_scale * (cond - uncond)
        if sample:
            probs = torch.softmax(logits / temperature, -1)
            codes[:, i] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            codes[:, i] = logits.argmax(-1)
        if i + 1 == h * w:
            break
        step = codes[:, i:i + 1].repeat(2 if guided else 1, 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        position = position[:, -1:] + 1
        out = moss(inputs_embeds=embed_codes(step), attention_mask=mask, position_ids=position,
                   route=torch.ones_like(step), **cache)
    return codes


def _check_prompt(input_ids, attention_mask) -> tuple[int, int]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids: expected a [B, T] integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    return tuple(input_ids.shape)


def _grid(moss: MossModel) -> tuple[int, int]:
    if moss.image_grid is None:
        raise ValueError("image_grid: the images' grid is unknown for this backbone; set "
                         "MossConfig(image_grid=(H, W))")
    return tuple(moss.image_grid)
