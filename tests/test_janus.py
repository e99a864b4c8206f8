"""Janus (moss/backbones/janus.py), an embedding-fed generator, on a tiny Janus built from its
config: only the language model is adapted; images (codes entering as embeddings, predicted by
their own head) are routed from explicit layouts (moss/embedding_fed.py); a training step
reaches both adapters and lowers the loss, the adapter round-trips; generation decodes with
the incremental ConvLoRA state and equals the full forward (greedy, guided, and from a prompt
that ends inside an image); misuse of explicit-layout decoding is refused, and Janus's own image
generation (past the routing) says which function generates images."""

import pytest
import torch
from transformers import DynamicCache

from moss import MossConfig, MossModel, get_moss_model
from moss.embedding_fed import generate_image, image_loss, text_then_image
from moss.layer import MossLinear

from helpers import randomize_B, tiny_janus

GRID = (4, 4)


def _moss(seed=0, **cfg):
    moss = get_moss_model(tiny_janus(seed), MossConfig(r_text=4, r_image=3, **cfg))
    randomize_B(moss, scale=0.5)
    return moss


def _prompts():
    """Two prompts, the second left-padded."""
    ids = torch.tensor([[1, 5, 6, 7, 8], [0, 0, 1, 9, 10]])
    return ids, (ids != 0).long()


def _code_logits(moss, ids, mask, codes):
    """A full forward of prompts + codes: the code logits predicting each code."""
    batch = text_then_image(moss, ids, mask, codes)
    hidden = moss(**batch, output_hidden_states=True).hidden_states[-1]
    n = codes.shape[1]
    return moss.model.model.generation_head(hidden[:, -n - 1:-1])


def test_the_spec_adapts_the_language_model_only_on_the_configs_grid():
    moss = _moss()
    assert moss.backbone.name == "janus" and moss.image_grid == GRID
    wrapped = [n for n, m in moss.named_modules() if isinstance(m, MossLinear)]
    assert len(wrapped) == 2 * 7 and all(".language_model." in n for n in wrapped)
    with pytest.raises(ValueError, match=r"input_ids: hold the janus image placeholder \[299\]"):
        moss(input_ids=torch.tensor([[1, 299, 2]]))


def test_greedy_generation_is_what_the_full_forward_predicts():
    """generate_image's codes (KV cache, decode state) == the argmax of a full forward over the
    prompt and the codes before each; the ConvLoRA takes part (zeroing it changes them)."""
    moss = _moss()
    ids, mask = _prompts()
    codes = generate_image(moss, ids, mask, progress=False)
    assert codes.shape == (2, 16)
    with torch.no_grad():
        logits = _code_logits(moss, ids, mask, codes)
    assert torch.equal(logits.argmax(-1), codes)
    with torch.no_grad():
        for layer in moss.modules():
            if isinstance(layer, MossLinear):
                layer.image_B.zero_()
        changed = _code_logits(moss, ids, mask, codes)
    assert (changed - logits).abs().max() > 1e-3


def test_guided_generation_follows_u_plus_scale_c_minus_u():
    moss = _moss()
    ids, mask = _prompts()
    uncond = torch.where(mask.bool() & (ids != 1), 0, ids)  # the caption masked, as Janus does
    codes = generate_image(moss, ids, mask, guidance_scale=3.0, unconditional_ids=uncond,
                           progress=False)
    with torch.no_grad():
        c = _code_logits(moss, ids, mask, codes)
        u = _code_logits(moss, uncond, mask, codes)
    assert torch.equal((u + 3.0 * (c - u)).argmax(-1), codes)


@pytest.mark.parametrize("k", [0, 3, 5, 13])
def test_a_prompt_ending_inside_an_image_then_decoding_equals_the_full_forward(k):
    """Prefill with k codes of the image already in (explicit layout, KV cache), then one code
    embedding per call with its route: the code logits == the full forward's, across rows."""
    moss = _moss()
    ids, mask = _prompts()
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(k))
    embed = moss.model.prepare_embeddings_for_image_generation
    with torch.no_grad():
        full = _code_logits(moss, ids, mask, codes)
        batch = text_then_image(moss, ids, mask, codes[:, :k])
        cache = DynamicCache()
        out = moss(**batch, use_cache=True, past_key_values=cache, output_hidden_states=True)
        head = moss.model.model.generation_head
        got = [head(out.hidden_states[-1][:, -1])]
        am, pos = batch["attention_mask"], batch["position_ids"]
        for i in range(k, 15):
            am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
            pos = pos[:, -1:] + 1
            out = moss(inputs_embeds=embed(codes[:, i:i + 1]), attention_mask=am,
                       position_ids=pos, route=torch.ones(2, 1, dtype=torch.long),
                       use_cache=True, past_key_values=cache, output_hidden_states=True)
            got.append(head(out.hidden_states[-1][:, -1]))
    torch.testing.assert_close(torch.stack(got, 1), full[:, k:], rtol=1e-4, atol=1e-4)


def test_training_reaches_both_adapters_lowers_the_loss_and_round_trips(tmp_path):
    moss = _moss()
    ids, mask = _prompts()
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = text_then_image(moss, ids, mask, codes)
    params = [p for p in moss.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    moss.train()
    losses = []
    for step in range(8):
        loss = image_loss(moss, batch, codes)
        loss.backward()
        if step == 0:
            layer = next(m for m in moss.modules() if isinstance(m, MossLinear))
            assert layer.image_A.grad.abs().sum() > 0 and layer.text_A.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    moss.eval()
    moss.save_pretrained(tmp_path / "adapter")
    loaded = MossModel.from_pretrained(tiny_janus(), tmp_path / "adapter")
    with torch.no_grad():
        assert image_loss(loaded, batch, codes).item() == pytest.approx(
            image_loss(moss, batch, codes).item(), abs=1e-5)


def test_explicit_layout_decoding_refuses_what_it_cannot_follow():
    moss = _moss()
    ids, mask = _prompts()
    batch = text_then_image(moss, ids, mask, torch.zeros(2, 3, dtype=torch.long))
    with torch.no_grad():
        cache = DynamicCache()
        moss(**batch, use_cache=True, past_key_values=cache)
        with pytest.raises(ValueError, match="route: the prefill gave an explicit layout"):
            moss(input_ids=torch.tensor([[5], [6]]), use_cache=True, past_key_values=cache)
        odd = dict(batch, images=torch.tensor([[5, 2, 2], [13, 2, 2]]))  # not the runs
        with pytest.raises(ValueError, match="images: decoding an explicit layout needs"):
            moss(**odd, use_cache=True, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="unconditional_ids: expected a tensor of the prompts'"):
        generate_image(moss, ids, mask, guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="codes: 17 codes per row, more than one 4 x 4 image"):
        text_then_image(moss, ids, mask, torch.zeros(2, 17, dtype=torch.long))
    # Janus's own image generation calls its language model past MOSS's routing: the error
    # says which function generates images.
    moss.model.generation_config.generation_kwargs = {"boi_token_id": 1}
    with pytest.raises(RuntimeError, match="generate images with moss.embedding_fed"):
        moss.generate(input_ids=ids, attention_mask=mask, generation_mode="image",
                      guidance_scale=2.0)
