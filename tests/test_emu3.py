"""The Emu3 backbone (moss/backbones/emu3.py) on a tiny Emu3 built from its config: images as
rows of visual tokens closed by end-of-line tokens, sizes read from the sequence; routing by id
equals the explicit layout with row strides, training reaches the ConvLoRA, save / load round
trips, prefill + decode (token by token, several tokens a call, crops) equals the full forward;
placeholders are refused with a clear error. Then the command line's side: the vocabulary spells
images as Emu3's processor does, the constraint keeps generated rows well formed, beam search
scores what the full forward scores, and ``moss train`` / ``moss generate`` run on a saved tiny
Emu3 (its tokenizer, its VQ-VAE encoding image files and decoding generated codes to PNGs)."""

import json

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from moss import MossConfig, MossModel, backbones, get_moss_model
from moss.cli import main
from moss.constrain import ImageSpans
from moss.layer import MossLinear
from moss.render import images_of

from helpers import (
    EMU3_EOL,
    EMU3_MARKERS,
    EMU3_PLACEHOLDER,
    EMU3_VISUAL,
    emu3_checkpoint,
    randomize_B,
    tiny_emu3,
)

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
    randomize_B(moss, scale=0.5)
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


@pytest.mark.parametrize("keep", [7, 9, 10, 12])
def test_a_crop_of_the_prefill_back_into_the_first_image_follows_it(keep):
    """A prompt that ends inside the second image, cropped back into the first image (inside a
    row, at its end, just after its row end) or into the text after it: the re-seeded rings
    hold the first image's tap products only (the second image's are dropped), and decoding on
    == the full forward."""
    import transformers

    moss = _moss()
    ids = _batch()[0][:1]
    with torch.no_grad():
        full = moss(input_ids=ids).logits
        cache = transformers.DynamicCache()
        moss(input_ids=ids[:, :15], use_cache=True, past_key_values=cache)
        cache.crop(keep - 15)  # transformers 5: the number of tokens to remove, negated
        rest = moss(input_ids=ids[:, keep:], use_cache=True, past_key_values=cache).logits
    torch.testing.assert_close(rest, full[:, keep:], rtol=1e-4, atol=1e-4)


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


BEGIN, END, SIZE_END, EOF = (EMU3_MARKERS[k] for k in ("<|image start|>", "<|image end|>",
                                                        "<|image token|>", "<|extra_201|>"))


def _vocab(model):
    """The spec's vocabulary, text as single byte-level characters (what the saved tokenizer
    does for digits and '*')."""
    chars = {name: tok for name, tok in model.config.vocabulary_map.items() if len(name) == 1}
    text = backbones.TextCodec(lambda s: [chars[c] for c in s], 1, 2, 0)
    return backbones.spec_for(model).vocabulary(model, text)


def test_images_are_spelled_as_emu3s_processor_writes_them():
    """begin, "H*W", <|image token|>, H rows of W visual tokens each closed by end-of-line,
    end-of-frame, end (transformers' Emu3Processor.replace_image_token, with the rows the model's
    get_image_tokens puts in place of its placeholders); read back as an H x W image."""
    model = tiny_emu3()
    vocab = _vocab(model)
    digits = vocab.encode_text("2*3")
    assert vocab.image([5, 6, 7, 8, 9, 10], (2, 3)) == (
        [BEGIN, *digits, SIZE_END] + [V[5], V[6], V[7], EMU3_EOL, V[8], V[9], V[10], EMU3_EOL]
        + [EOF, END])
    (image,) = images_of([7, *vocab.image([5, 6, 7, 8, 9, 10], (2, 3)), 7], vocab)
    assert (image.codes, image.grid, image.finished) == ([5, 6, 7, 8, 9, 10], (2, 3), True)
    (cut,) = images_of(vocab.image([5, 6, 7, 8, 9, 10], (2, 3))[:10], vocab)
    assert (cut.codes, cut.grid, cut.finished) == ([5, 6, 7, 8], (2, 3), False)


def test_an_image_file_is_encoded_by_the_models_vq_vae(tmp_path):
    """A 40 x 30 picture through the 2x VQ-VAE: 15 rows of 20 codes, the model's own."""
    model = tiny_emu3()
    vocab = _vocab(model)
    picture = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8)
    Image.fromarray(picture.numpy()).save(tmp_path / "p.png")
    rows = vocab.encode_image_file(tmp_path / "p.png")
    pixels = (picture.float() / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = model.model.vqmodel.encode(pixels, torch.tensor([[30, 40]])).image_tokens[0]
    assert rows == want.tolist() and (len(rows), len(rows[0])) == (15, 20)


def test_the_constraint_writes_the_size_rows_and_ends():
    """Outside an image no visual token, row end, end-of-frame or image end; after begin the
    size and marker, then W codes and a row end per row, end-of-frame, end; a begin the model
    chooses itself gets the processor's size."""
    vocab = _vocab(tiny_emu3())
    spans = ImageSpans(vocab, (2, 3))
    scores = torch.zeros(1, len(tiny_emu3().config.vocabulary_map))

    def allowed(ids):
        return set(torch.nonzero(spans(torch.tensor([ids]), scores.clone())[0] == 0)[:, 0]
                   .tolist())

    outside = allowed([1, 7])
    assert BEGIN in outside and not outside & {*V, EMU3_EOL, EOF, END}
    script = vocab.image([0] * 6, (2, 3))
    for t in range(1, len(script)):
        want = set(V) if script[t] == V[0] else {script[t]}
        assert allowed([1, 7] + script[:t]) == want, f"after {script[:t]}"
    assert BEGIN in allowed([1, 7] + script)


def test_beam_search_across_rows_scores_what_the_full_forward_scores():
    """Three beams inside a constrained 2 x 3 image (codes, row ends, end-of-frame): each
    returned sequence's score == its log-probability under a full forward."""
    moss = _moss()
    vocab = _vocab(moss.model)
    prompt = torch.tensor([[1, 7, *vocab.opening((2, 3)), V[4]]])
    with torch.no_grad():
        out = moss.generate(input_ids=prompt, max_new_tokens=9, num_beams=3,
                            num_return_sequences=3, do_sample=False, length_penalty=0.0,
                            logits_processor=LogitsProcessorList([ImageSpans(vocab, (2, 3))]),
                            return_dict_in_generate=True, output_scores=True)
        logp = moss(input_ids=out.sequences).logits.log_softmax(-1)
    n = prompt.shape[1]
    assert EMU3_EOL in out.sequences[0, n:].tolist()  # the beams crossed a row end
    for i, (seq, score) in enumerate(zip(out.sequences, out.sequences_scores)):
        total = sum(logp[i, t - 1, seq[t]].item() for t in range(n, seq.shape[0]))
        assert score.item() == pytest.approx(total, abs=1e-4), f"sequence {i}"


def test_moss_train_and_generate_on_a_saved_emu3_write_decoded_pixels(tmp_path, capsys):
    """A user's Emu3 checkpoint folder: ``moss train`` on records with images as rows (and one
    as a file), then ``moss generate --image --image-size 3x4``: the image is written through
    the VQ decoder (6 x 8 pixels at 2x), its tokens spelled as Emu3 spells them."""
    folder = emu3_checkpoint(tmp_path / "emu3")
    Image.new("RGB", (8, 6), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"segments": [{"role": "user", "type": "text", "text": "red"},
                             {"role": "assistant", "type": "image", "path": "red.png"}]}]
    records += [{"segments": [{"role": "user", "type": "text", "text": f"draw {i}"},
                              {"role": "assistant", "type": "image",
                               "codes": [[(i + r * 4 + c) % 64 for c in range(4)]
                                         for r in range(3)]}]} for i in range(5)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(data), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--rank", "4"]) == 0
    capsys.readouterr()
    pngs = tmp_path / "pngs"
    assert main(["generate", "--model", str(folder), "--adapter", str(out / "checkpoint-3"),
                 "--prompt", "draw 1", "--image", "--image-size", "3x4", "--max-new-tokens",
                 "20", "--out", str(pngs), "--sample"]) == 0
    shown = capsys.readouterr().out
    assert "[image 3x4 VQ codes]" in shown and "(pixels)" in shown, shown
    with Image.open(pngs / "prompt1_image1.png") as png:
        assert png.size == (8, 6)


def test_a_config_without_emu3s_image_markers_has_no_vocabulary():
    model = tiny_emu3()
    del model.config.vocabulary_map["<|image start|>"]
    with pytest.raises(ValueError, match=r"vocabulary_map lacks \['<\|image start\|>'\]"):
        _vocab(model)
