"""Bad input to MossConfig, get_moss_model and MossModel.forward / generate: rows of
docs/bad-inputs.md (tests/catalogue.py)."""

import re

import pytest
import torch

from moss import MossConfig, get_moss_model

from catalogue import INF, NAN, Catalogue, R
from helpers import tiny_llama

catalogue = Catalogue()
error, errors, behaviour = catalogue.error, catalogue.errors, catalogue.behaviour


CONFIG = "MossConfig"


def config(**kw):
    return MossConfig(**kw)


errors(CONFIG, "`r_text`, `r_image` or `kernel_size` 0, negative, or not an int (2.0, True)",
       ValueError, "{name}: expected an int >= 1, got {v!r}",
       [(dict(name=n, v=v), lambda n=n, v=v: config(**{n: v}))
        for n in ("r_text", "r_image", "kernel_size") for v in (0, -1, 2.0, True)])
errors(CONFIG, "`alpha_text` / `alpha_image` 0, negative, NaN, Inf, or not a number", ValueError,
       "{name}: expected a finite number > 0, got {v!r}",
       [(dict(name=n, v=v), lambda n=n, v=v: config(**{n: v}))
        for n in ("alpha_text", "alpha_image") for v in (0, -1.0, NAN, INF, "32", True)])
errors(CONFIG, "`dropout` outside [0, 1) (NaN included)", ValueError,
       "dropout: expected a number in [0, 1), got {v!r}",
       [(dict(v=v), lambda v=v: config(dropout=v)) for v in (1.0, -0.1, NAN)])
error(CONFIG, "`causal` not a bool", TypeError, "causal: expected a bool, got str",
      lambda: config(causal="yes"))
errors(CONFIG, "`image_adapter` not a variant name (another name, a list)", ValueError,
       "image_adapter: expected one of shared, moe, conv, conv_rank, got {v!r}",
       [(dict(v=v), lambda v=v: config(image_adapter=v)) for v in ("lora", ["conv"])])
errors(CONFIG, "`target_modules` a str, empty, or holding a non-str", ValueError,
       "target_modules: expected a non-empty list of module names (or None), got {v!r}",
       [(dict(v=v), lambda v=v: config(target_modules=v)) for v in ("q_proj", [], ["q_proj", 3])])
errors(CONFIG, "`image_token_ids` empty, negative, or not ints", ValueError,
       "image_token_ids: expected non-negative ints, got {v!r}",
       [(dict(v=v), lambda v=v: config(image_token_ids=v)) for v in ([], [-1], [1.0], [True])])
errors(CONFIG, "`image_grid` with a side 0, or not two ints (floats, bools, three sides)",
       ValueError, "image_grid: expected (height, width) >= 1, got {v!r}",
       [(dict(v=v), lambda v=v: config(image_grid=v)) for v in ((0, 2), (2.0, 2), (True, 2),
                                                                 (2, 2, 2))])
errors(CONFIG, "`image_token_ids` / `image_grid` not a list (an int, a str)", TypeError,
       "{name}: expected a list, got {kind}",
       [(dict(name=n, kind=type(v).__name__), lambda n=n, v=v: config(**{n: v}))
        for n in ("image_token_ids", "image_grid") for v in (4, "12")])
error(CONFIG, "`backend` not a backend name", ValueError,
      "backend: expected one of reference, cpu, cuda, triton, cuda-emulated or None, got 'fast'",
      lambda: config(backend="fast"))
error(CONFIG, "`MossConfig.from_dict` of a non-dict", TypeError,
      "config: expected a dict (a JSON object), got list", lambda: config().from_dict([1]))
error(CONFIG, "`from_dict` of another format_version", ValueError,
      "format_version: this moss reads adapter configs of version 1, the file says 99",
      lambda: config().from_dict({**config().to_dict(), "format_version": 99}))
error(CONFIG, "`from_dict` with unknown fields", ValueError, "config: unknown fields ['rank']",
      lambda: config().from_dict({**config().to_dict(), "rank": 3}))

INJECT = "get_moss_model"


def wrap(model=None, image_logits=False, **kw):
    return get_moss_model(tiny_llama() if model is None else model,
                          config(r_text=4, r_image=4, **kw), image_logits=image_logits)


error(INJECT, "`model` not an `nn.Module`", TypeError, "model: expected a torch nn.Module, got str",
      lambda: wrap("llama"))
error(INJECT, "`cfg` not a `MossConfig` (a dict)", TypeError,
      "cfg: expected a moss.MossConfig, got dict",
      lambda: get_moss_model(tiny_llama(), {"r_text": 4}))
error(INJECT, "`image_logits` not a bool", TypeError, "image_logits: expected a bool, got str",
      lambda: wrap(image_logits="yes"))
error(INJECT, "a model that already holds MOSS layers", ValueError,
      "model: already holds MOSS layers (call unload() first)", lambda: wrap(wrap().model))


@behaviour(INJECT, "`target_modules` that match no `nn.Linear`",
           "`ValueError`: `target_modules: no nn.Linear named ['nope'] in LlamaForCausalLM`; "
           "the model is left untouched")
def _no_targets():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape("target_modules: no nn.Linear named ['nope'] "
                                                   "in LlamaForCausalLM")):
        wrap(model, target_modules=["nope"])
    assert all(p.requires_grad for p in model.parameters())


error(INJECT, "`image_token_ids` on a backbone with no known grid", ValueError,
      "image_grid: the backbone has image tokens but no known grid",
      lambda: wrap(image_token_ids=[5]))
error(INJECT, "`image_token_ids` outside the model's vocabulary", ValueError,
      "image_token_ids: 500 is outside the model's vocabulary (its input embedding has 80 rows)",
      lambda: wrap(image_token_ids=[5, 500], image_grid=(2, 2)))

FORWARD = "MossModel.forward / generate"
EMBEDS = torch.zeros(2, 6, 32)

error(FORWARD, "neither `input_ids` nor `route`", ValueError,
      "input_ids or route: give the token ids, or the explicit layout (route and images)",
      lambda: wrap()(inputs_embeds=EMBEDS))
error(FORWARD, "`route` without `images`", ValueError,
      "images: required with route (use an empty [0, 3] tensor for none)",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R))
error(FORWARD, "`route` not a tensor", TypeError, "route: expected a torch.Tensor [B, T], got list",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R.tolist(), images=[]))
error(FORWARD, "`route` of another shape than the inputs", ValueError,
      "route: expected shape (2, 6) like the inputs, got (2, 5)",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R[:, :5], images=[]))
error(FORWARD, "an inconsistent `route` / `images` (checked as by `from_spans`)", ValueError,
      "images[0] = [20, 2, 3]: start is outside the 12 tokens",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R, images=[[20, 2, 3]]))
error(FORWARD, "`inputs_embeds` with no tokens (T = 0)", ValueError,
      "inputs_embeds: expected at least one token, got shape (2, 0)",
      lambda: wrap()(inputs_embeds=EMBEDS[:, :0], route=R[:, :0], images=[]))
errors(FORWARD, "`input_ids` float or bool", TypeError,
       "input_ids: expected an integer tensor, got {dtype}",
       [(dict(dtype=dt), lambda dt=dt: wrap()(input_ids=torch.tensor([[1, 2]], dtype=dt)))
        for dt in (torch.float32, torch.bool)])
error(FORWARD, "`input_ids` of an unsigned 16-64 bit type", TypeError,
      "input_ids: torch.uint32 is not supported, give int64 (or int32) ids",
      lambda: wrap()(input_ids=torch.tensor([[1, 2]], dtype=torch.uint32)))
error(FORWARD, "`input_ids` empty", ValueError,
      "input_ids: expected at least one token, got shape (1, 0)",
      lambda: wrap()(input_ids=torch.zeros(1, 0, dtype=torch.long)))
errors(FORWARD, "a token id outside the vocabulary (negative or too large)", ValueError,
       "input_ids[0, 1] = {v}: outside the model's vocabulary of 80 ids",
       [(dict(v=v), lambda v=v: wrap()(input_ids=torch.tensor([[1, v]]))) for v in (80, -1)])
error(FORWARD, "`generate` with `causal=False` adapters", ValueError,
      "causal: adapters trained with causal=False see tokens to their right and cannot decode",
      lambda: wrap(causal=False, kernel_size=3).generate(input_ids=torch.tensor([[1, 2]])))



def _cached(**kw):
    """A KV cache, as a generation's prefill passes it."""
    from transformers import DynamicCache

    return {"use_cache": True, "past_key_values": DynamicCache(), **kw}


def _decode_outside_vocabulary():
    moss, cache = wrap(), _cached()
    with torch.no_grad():
        moss(input_ids=torch.tensor([[1, 2]]), **cache)
        moss(input_ids=torch.tensor([[80]]), **cache)


error(FORWARD, "a token id outside the vocabulary in a decode step (a call with a KV cache: "
      "checked against its prefill's vocabulary)", ValueError,
      "input_ids[0, 0] = 80: outside the model's vocabulary of 80 ids",
      _decode_outside_vocabulary)
error(FORWARD, "an explicit-layout prefill (a KV cache) whose images are not runs of image "
      "tokens on one grid", ValueError,
      "images: decoding an explicit layout needs each image to be a run of image tokens on one "
      "2 x 2 grid", lambda: wrap()(inputs_embeds=EMBEDS, route=R, images=[[1, 2, 2], [6, 1, 2]],
                                   **_cached()))
error(FORWARD, "an explicit-layout prefill with no grid known for its images", ValueError,
      "image_grid: decoding with an explicit layout needs the grid of the images to come",
      lambda: wrap()(inputs_embeds=EMBEDS, route=torch.zeros(2, 6, dtype=torch.long),
                     images=[], **_cached()))
error(FORWARD, "an explicit-layout prefill of packed sequences (`cu_seqlens`)", ValueError,
      "cu_seqlens: packed sequences cannot be decoded incrementally",
      lambda: wrap()(inputs_embeds=EMBEDS[:1], route=R[:1], images=[[1, 2, 2]],
                     cu_seqlens=[0, 6], **_cached()))


@behaviour(FORWARD, "a decode call routed otherwise than its prefill (ids after an explicit "
           "layout, or a route after ids)",
           "`ValueError`: `route: the prefill gave an explicit layout, so every decode call "
           "must give its new tokens' route` / `... was routed from input_ids, so decode calls "
           "must be too`")
def _mixed_decode():
    moss = wrap(image_grid=(2, 2))
    explicit, by_ids = _cached(), _cached()
    with torch.no_grad():
        moss(inputs_embeds=EMBEDS, route=R, images=[[1, 2, 2], [6, 2, 2]], **explicit)
        with pytest.raises(ValueError, match="route: the prefill gave an explicit layout"):
            moss(input_ids=torch.tensor([[5], [6]]), **explicit)
        moss(input_ids=torch.tensor([[5, 6], [7, 8]]), **by_ids)
        with pytest.raises(ValueError, match="was routed from input_ids, so decode calls"):
            moss(inputs_embeds=EMBEDS[:, :1], route=torch.ones(2, 1, dtype=torch.long),
                 **by_ids)


EMBEDDING_FED = "moss.embedding_fed"


def _janus():
    from helpers import tiny_janus

    return get_moss_model(tiny_janus(), config(r_text=4, r_image=4))


def _fed(call, **kw):
    from moss import embedding_fed

    ids = torch.tensor([[1, 5, 6], [0, 1, 7]])
    args = {"input_ids": ids, "attention_mask": (ids != 0).long(), **kw}
    if call == "text_then_image":
        args.setdefault("codes", torch.zeros(2, 3, dtype=torch.long))
    else:
        args.setdefault("progress", False)
    return getattr(embedding_fed, call)(_janus(), **args)


error(EMBEDDING_FED, "`codes` more than one image holds", ValueError,
      "codes: 17 codes per row, more than one 4 x 4 image holds",
      lambda: _fed("text_then_image", codes=torch.zeros(2, 17, dtype=torch.long)))
error(EMBEDDING_FED, "`codes` not [B, n] for the prompts' B", ValueError,
      "codes: expected a [2, n] tensor of VQ codes, got torch.Size([3, 4])",
      lambda: _fed("text_then_image", codes=torch.zeros(3, 4, dtype=torch.long)))
error(EMBEDDING_FED, "`input_ids` not a [B, T] integer tensor", ValueError,
      "input_ids: expected a [B, T] integer tensor, got torch.Size([3])",
      lambda: _fed("generate_image", input_ids=torch.tensor([1, 2, 3])))
error(EMBEDDING_FED, "`attention_mask` of another shape than `input_ids`", ValueError,
      "attention_mask: expected the shape of input_ids (2, 3), got torch.Size([2, 2])",
      lambda: _fed("generate_image", attention_mask=torch.ones(2, 2, dtype=torch.long)))
error(EMBEDDING_FED, "`guidance_scale` without `unconditional_ids` of the prompts' shape",
      ValueError, "unconditional_ids: expected a tensor of the prompts' shape (2, 3) with "
      "guidance_scale, got None", lambda: _fed("generate_image", guidance_scale=2.0))
errors(EMBEDDING_FED, "`guidance_scale` NaN or not a number", ValueError,
       "guidance_scale: expected a number, got {v!r}",
       [(dict(v=v), lambda v=v: _fed("generate_image", guidance_scale=v)) for v in (NAN, "5")])
errors(EMBEDDING_FED, "`temperature` 0, negative or NaN", ValueError,
       "temperature: expected > 0, got {v!r}",
       [(dict(v=v), lambda v=v: _fed("generate_image", temperature=v)) for v in (0.0, -1.0, NAN)])
error(EMBEDDING_FED, "a backbone that is not embedding-fed (no code embedder or head)",
      NotImplementedError, "the generic backbone spec knows no embedding-fed image generation; "
      "pass embed_codes and code_logits",
      lambda: __import__("moss.embedding_fed").embedding_fed.generate_image(
          wrap(image_grid=(2, 2)), torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)))


test_row = catalogue.test()
