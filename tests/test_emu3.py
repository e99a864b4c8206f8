"""The Emu3 backbone (moss/backbones/emu3.py) on a tiny Emu3 built from its config: images as
rows of visual tokens closed by end-of-line tokens, sizes read from the sequence; routing by id
equals the explicit layout with row strides, training reaches the ConvLoRA, save / load round
trips; placeholders and incremental decoding are refused with clear errors."""

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


def test_placeholders_and_incremental_decoding_are_refused():
    moss = _moss()
    ids, mask, _, _ = _batch()
    with pytest.raises(ValueError, match=r"input_ids: hold the emu3 image placeholder \[91\]"):
        moss(input_ids=torch.tensor([[1, EMU3_PLACEHOLDER, 2]]))
    with pytest.raises(NotImplementedError, match="row-end tokens, whose incremental decode"):
        moss.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2,
                      do_sample=False)
