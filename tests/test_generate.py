"""Image generation as users run it: constrained image decoding (moss/constrain.py), PNG output
(moss/picture.py), progress bars (moss/progress.py) and ``moss generate`` end to end on the tiny
Chameleon."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from moss import MossConfig, get_moss_model, tiny
from moss.backbones import load as backbone
from moss.cli import main
from moss.constrain import ImageSpans
from moss.guidance import ImageGuidance
from moss.picture import CELL, code_colour, save_png
from moss.progress import ImageProgress
from moss.render import CodeImage, images_of

MODEL, VOCAB, _ = backbone(None)
H, W = VOCAB.grid
CODES = set(VOCAB.code_to_token)


def _allowed(ids: list[int]) -> set[int]:
    scores = torch.zeros(1, MODEL.config.vocab_size)
    out = ImageSpans(VOCAB)(torch.tensor([ids]), scores)
    return set(torch.nonzero(out[0] == 0).flatten().tolist())


def test_inside_an_image_only_codes_then_exactly_its_end():
    text = VOCAB.encode_text("a cat")
    opened = [VOCAB.bos, *text, VOCAB.begin_image]
    assert _allowed(opened) == CODES
    codes = [VOCAB.code_to_token[i] for i in range(H * W)]
    assert _allowed(opened + codes[:-1]) == CODES
    assert _allowed(opened + codes) == {VOCAB.end_image}
    after = _allowed(opened + codes + [VOCAB.end_image])
    assert not after & (CODES | {VOCAB.end_image}) and VOCAB.begin_image in after
    assert not _allowed([VOCAB.bos, *text]) & CODES  # no stray codes in text


def test_generate_under_the_constraint_writes_whole_images(tmp_path):
    """A random adapted model, sampling: every image has exactly H x W codes and its end."""
    torch.manual_seed(0)
    moss = get_moss_model(tiny.build(), MossConfig(r_text=4, r_image=4), image_logits=True).eval()
    prompt = torch.tensor([[VOCAB.bos, *VOCAB.encode_text("draw"), VOCAB.begin_image]] * 3)
    spans = ImageSpans(VOCAB)
    progress = ImageProgress(spans, ["a", "b", None], disable=True)
    with torch.no_grad():
        out = moss.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                            max_new_tokens=3 * (H * W + 2), do_sample=True,
                            pad_token_id=VOCAB.pad, eos_token_id=VOCAB.eos,
                            logits_processor=LogitsProcessorList([spans, progress]))
    progress.close()
    for i, row in enumerate(out[:, prompt.shape[1] - 1:].tolist()):
        images = images_of(row, VOCAB)
        assert images and all(len(im.codes) == H * W for im in images if im.finished)
        assert row[H * W + 1] == VOCAB.end_image  # the prompt's image, closed on time
        if i < 2:  # a bar for every image of a labelled row, none for the last
            assert progress.done[i] == len(images)
    assert progress.done[2] == 0


def test_png_of_a_code_grid_is_labelled_and_one_cell_per_code(tmp_path):
    codes = [(7 * i) % 64 for i in range(H * W)]
    image = CodeImage(codes, (H, W), True)
    assert save_png(image, VOCAB, tmp_path / "a.png", "chameleon") == "code grid"
    img = Image.open(tmp_path / "a.png").convert("RGB")
    assert img.height == H * CELL + 14 and img.width >= W * CELL
    for i, c in enumerate(codes):  # each cell's centre has its code's colour
        r, col = divmod(i, W)
        assert img.getpixel((col * CELL + CELL // 2, 14 + r * CELL + CELL // 2)) == code_colour(c)
    unfinished = CodeImage(codes[:5], (H, W), False)
    assert save_png(unfinished, VOCAB, tmp_path / "b.png", "chameleon") == "code grid"


def test_moss_generate_writes_a_png_per_image_for_a_file_of_prompts(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    get_moss_model(tiny.build(), MossConfig(r_text=4, r_image=4)).save_pretrained(adapter)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Draw a red square.\n\nDraw a blue bar, please.\n")
    out = tmp_path / "pngs"
    assert main(["generate", "--adapter", str(adapter), "--prompts", str(prompts), "--image",
                 "--max-new-tokens", str(H * W + 1), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "[1] Draw a red square." in shown and "[2] Draw a blue bar, please." in shown
    for i in (1, 2):
        path = out / f"prompt{i}_image1.png"
        assert f"wrote {path} (code grid)" in shown and path.is_file()


def test_guidance_mixes_logits_inside_images_and_keeps_each_pair_together():
    """Row 0 is inside an image, row 1 in text: row 0 takes argmax u + s (c - u), row 1 argmax
    c, and each unconditional twin is made to take its pair's token."""
    opened = [VOCAB.bos, *VOCAB.encode_text("a"), VOCAB.begin_image]
    text = [VOCAB.bos, *VOCAB.encode_text("ab")]
    ids = torch.tensor([opened, text, opened, text])
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, MODEL.config.vocab_size, generator=g)
    scores[:, 7] = float("-inf")  # a masked token stays masked
    out = ImageGuidance(ImageSpans(VOCAB), 3.0)(ids, scores)
    c, u = scores[:2], scores[2:]
    want = [int((u[0] + 3.0 * (c[0] - u[0])).nan_to_num(float("-inf")).argmax()),
            int(c[1].argmax())]
    chosen = [int(row.argmax()) for row in out]
    assert chosen == want + want
    assert (out == 0).sum(1).tolist() == [1, 1, 1, 1]


def test_moss_generate_takes_the_latest_checkpoint_of_a_training_run(tmp_path, capsys):
    """--adapter given moss train's --out folder: the checkpoint its ``latest`` names."""
    from moss import checkpoint

    out, pngs = tmp_path / "run", tmp_path / "pngs"
    moss = get_moss_model(tiny.build(), MossConfig(r_text=4, r_image=4))
    for step in (2, 4):
        checkpoint.save_run_checkpoint(out, step, moss.save_pretrained, {"step": step})
    assert checkpoint.latest_checkpoint(out).name.endswith("4")
    assert main(["generate", "--adapter", str(out), "--prompt", "A red square.", "--image",
                 "--max-new-tokens", str(H * W + 1), "--out", str(pngs)]) == 0
    assert (pngs / "prompt1_image1.png").is_file()
    (out / "latest").unlink()  # no checkpoint named: the adapter folder's own error
    with pytest.raises(SystemExit, match="moss_config.json does not exist"):
        main(["generate", "--adapter", str(out)])


def test_moss_generate_with_guidance_writes_the_conditional_rows(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    get_moss_model(tiny.build(), MossConfig(r_text=4, r_image=4)).save_pretrained(adapter)
    out = tmp_path / "pngs"
    assert main(["generate", "--adapter", str(adapter), "--prompt", "A red square.", "--image",
                 "--guidance-scale", "3", "--sample", "--max-new-tokens", str(H * W + 1),
                 "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"wrote {out / 'prompt1_image1.png'} (code grid)" in shown
    assert not (out / "prompt2_image1.png").exists()  # the unconditional twin is not shown


def test_guided_generation_keeps_both_rows_of_a_pair_on_the_same_tokens():
    torch.manual_seed(1)
    moss = get_moss_model(tiny.build(), MossConfig(r_text=4, r_image=4), image_logits=True).eval()
    cond = [VOCAB.bos, *VOCAB.encode_text("red"), VOCAB.begin_image]
    uncond = [VOCAB.pad] * 3 + [VOCAB.bos, VOCAB.begin_image]  # left-padded twin
    ids = torch.tensor([cond, uncond])
    spans = ImageSpans(VOCAB)
    with torch.no_grad():
        out = moss.generate(input_ids=ids, attention_mask=(ids != VOCAB.pad).long(),
                            max_new_tokens=H * W + 4, do_sample=False, pad_token_id=VOCAB.pad,
                            eos_token_id=VOCAB.eos, logits_processor=LogitsProcessorList(
                                [spans, ImageGuidance(spans, 4.0, sample=True)]))
    new = out[:, ids.shape[1]:]
    assert torch.equal(new[0], new[1]) and new[0, H * W].item() == VOCAB.end_image
