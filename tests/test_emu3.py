"""The Emu3 backbone (moss/backbones/emu3.py) on a tiny Emu3 built from its config: images as
rows of visual tokens closed by end-of-line tokens, sizes read from the sequence; routing by id
equals the explicit layout with row strides, training reaches the ConvLoRA, save / load round
trips, prefill + decode (token by token, several tokens a call, crops) equals the full forward;
placeholders are refused with a clear error."""

import pytest
import torch

from moss import MossConfig, MossModel, get_moss_model
from moss.layer import MossLinear

from helpers import EMU3_EOL, EMU3_PLACEHOLDER, EMU3_VISUAL, tiny_emu3

V = EMU3_VISUAL


def _batch():
    """Row 0: text, a 2 x 3 image (rows closed by EOL), end tokens, text, a 3 x 2 image still
    being generated (second row begun). Row 1 (left-padded): text and a 1 x 4 image."""
    a = [1, 5, V[0], V[1], V[2], EMU3_EOL, V[3], V[4], V[5], EMU3_EOL, 6, 7, 8, V[6], V[7],
         EMU3_EOL, V[8]]
    b = [0] * 8 + [1, 5, V[9], V[10], V[11], V[12], EMU3_EOL, 6, 2]
    ids = torch.tensor([a, b])
    mask = (ids != 0).long()
    n = ids.shape[1]
    # The same layout written out: (flat start, H, W, row stride), route per token.
    images = [[2, 2, 3, 4], [13, 3, 2, 3], [n + 10, 1, 4, 5]]
    route = torch.where(mask == 0, -1, torch.isin(ids, torch.tensor(V)).long())
    return ids, mask, route, images


def _moss(seed=0):
    moss = get_moss_model(tiny_emu3(seed), MossConfig(r_text=4, r_image=3))
    with torch.no_grad():  # non-zero B, so that the adapters change the output
        for layer in moss.modules():
            if isinstance(layer, MossLinear):
                layer.text_B.normal_(std=0.5)
                layer.image_B.normal_(std=0.5)
    return moss


def test_the_spec_finds_visual_tokens_row_ends_and_the_language_model():
    moss = _moss()
    assert moss.backbone.name == "emu3"
    assert moss.image_token_ids == V and moss.row_end_ids == [EMU3_EOL]
    assert moss.image_grid is None  # sizes come from the sequence
    wrapped = [n for n, m in moss.named_modules() if isinstance(m, MossLinear)]
    assert len(wrapped) == 2 * 7 and all(".text_model." in n for n in wrapped)
    with pytest.raises(ValueError, match="image_grid: Emu3 images carry their sizes"):
        get_moss_model(tiny_emu3(), MossConfig(image_grid=(2, 2)))


def test_routing_by_id_is_the_explicit_layout_with_row_strides():
    """Logits with images found from ids (widths from the row ends) == with the layout given
    explicitly; and the image adapter matters (zeroing it changes them)."""
    moss = _moss()
    ids, mask, route, images = _batch()
    with torch.no_grad():
        by_id = moss(input_ids=ids, attention_mask=mask).logits
        embeds = moss.model.get_input_embeddings()(ids)
        explicit = moss(inputs_embeds=embeds, attention_mask=mask, route=route,
                        images=images).logits
        real = mask.bool()
        torch.testing.assert_close(by_id[real], explicit[real])
        for layer in moss.modules():
            if isinstance(layer, MossLinear):
                layer.image_B.zero_()
        without = moss(input_ids=ids, attention_mask=mask).logits
    assert (without[real] - by_id[real]).abs().max() > 1e-3


def test_a_training_step_reaches_both_adapters_and_a_checkpoint_round_trips(tmp_path):
    moss = _moss()
    ids, mask, _, _ = _batch()
    labels = torch.where(mask == 1, ids, -100)
    moss.train()
    loss = moss(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    layer = next(m for m in moss.modules() if isinstance(m, MossLinear))
    assert torch.isfinite(loss) and layer.image_A.grad.abs().sum() > 0
    assert layer.text_A.grad.abs().sum() > 0
    moss.eval()
    moss.save_pretrained(tmp_path / "adapter")
    loaded = MossModel.from_pretrained(tiny_emu3(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   moss(input_ids=ids, attention_mask=mask).logits)


def test_placeholders_are_refused():
    moss = _moss()
    with pytest.raises(ValueError, match=r"input_ids: hold the emu3 image placeholder \[91\]"):
        moss(input_ids=torch.tensor([[1, EMU3_PLACEHOLDER, 2]]))


@pytest.mark.parametrize("prefix", [2, 4, 6, 10, 14])
def test_prefill_then_token_by_token_decode_equals_the_full_forward(prefix):
    """The prompt ends in text, inside an image's first row (width unknown yet), right after a
    row end, after an image, inside a second image's first row; then token by token across row
    ends, a new image and its rows, with a left-padded row of another image width beside."""
    import transformers

    moss = _moss()
    ids, mask, _, _ = _batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = moss(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        cache = transformers.DynamicCache()
        out = moss(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix],
                   position_ids=positions[:, :prefix], use_cache=True, past_key_values=cache)
        torch.testing.assert_close(out.logits, full[:, :prefix], rtol=1e-4, atol=1e-4)
        for t in range(prefix, ids.shape[1]):
            out = moss(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                       position_ids=positions[:, t:t + 1], use_cache=True, past_key_values=cache)
            torch.testing.assert_close(out.logits[:, -1], full[:, t], rtol=1e-4, atol=1e-4,
                                       msg=f"prefix {prefix}, step {t}")


def test_greedy_generation_is_what_the_full_forward_predicts():
    """generate() with the adapters (the image logits are all the model's: Emu3 masks none):
    each new token is the argmax of a full forward over what came before."""
    moss = _moss()
    ids, mask, _, _ = _batch()
    prompt = ids[:1, :8]
    out = moss.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = moss(input_ids=out[:, :-1]).logits
    assert torch.equal(out[0, 8:], logits[0, 7:].argmax(-1))


@pytest.mark.parametrize("prefix,chunk", [(4, 3), (6, 5), (14, 2)])
def test_decode_calls_of_several_tokens_and_crops_follow_the_rows(prefix, chunk):
    """Assisted decoding's moves on Emu3's layout: several tokens per cached call (across row
    ends and image starts) == the full forward; and a crop of such a call, or of the prefill's
    last tokens, then other tokens == as if the others had come first."""
    import transformers

    moss = _moss()
    ids, mask, _, _ = _batch()
    ids, mask = ids[:1], mask[:1]  # unpadded: positions are the token indices
    with torch.no_grad():
        full = moss(input_ids=ids).logits
        cache = transformers.DynamicCache()
        got = [moss(input_ids=ids[:, :prefix], use_cache=True, past_key_values=cache).logits]
        for t in range(prefix, ids.shape[1], chunk):
            got.append(moss(input_ids=ids[:, t:t + chunk], use_cache=True,
                            past_key_values=cache).logits)
        torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-4)
        # Tried: 3 other tokens after the prefix (an image row of other codes), cropped.
        tried = torch.tensor([[V[20], V[21], EMU3_EOL]])
        for first in ("prefill", "call"):
            cache = transformers.DynamicCache()
            if first == "prefill":
                moss(input_ids=torch.cat([ids[:, :prefix], tried], 1), use_cache=True,
                     past_key_values=cache)
            else:
                moss(input_ids=ids[:, :prefix], use_cache=True, past_key_values=cache)
                moss(input_ids=tried, use_cache=True, past_key_values=cache)
            cache.crop(-3)
            rest = moss(input_ids=ids[:, prefix:], use_cache=True, past_key_values=cache).logits
            torch.testing.assert_close(rest, full[:, prefix:], rtol=1e-4, atol=1e-4,
                                       msg=f"crop after the {first}")


def test_an_image_wider_than_the_decode_state_holds_is_refused(monkeypatch):
    """The rings are sized for the backbone's max_image_width: a wider row, in the prompt or
    generated, is a clear error (checked where the ids are on the host)."""
    import transformers

    moss = _moss()
    monkeypatch.setattr(moss.backbone, "max_image_width", 2)
    wide = torch.tensor([[1, V[0], V[1], V[2], EMU3_EOL]])
    with torch.no_grad(), pytest.raises(ValueError, match="wider than the backbone's "
                                                          r"max_image_width \(2\)"):
        moss(input_ids=wide, use_cache=True, past_key_values=transformers.DynamicCache())
    cache = transformers.DynamicCache()
    with torch.no_grad():
        moss(input_ids=wide[:, :3], use_cache=True, past_key_values=cache)
        with pytest.raises(ValueError, match=r"an image row of 3 tokens, wider"):
            moss(input_ids=wide[:, 3:4], use_cache=True, past_key_values=cache)  # row still open
