"""``moss generate``: interleaved output from a trained adapter, through transformers'
``generate`` and the layers' incremental decode state (``MossModel.generate``).

Images are decoded under :class:`moss.constrain.ImageSpans` (inside an image only codes, exactly
H x W, then its end token; no stray codes outside), with a progress bar per image
(moss/progress.py), and each is written as a PNG (moss/picture.py: pixels where the backbone
has a VQ decoder, else a labelled picture of its code grid). ``--prompts FILE`` generates for
every line of a file, as one left-padded batch; ``--image`` opens an image after each prompt;
``--guidance-scale`` adds classifier-free guidance (moss/guidance.py) in the same batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from . import backbones, checkpoint
from .constrain import ImageSpans
from .errors import input_errors
from .guidance import ImageGuidance
from .model import MossModel
from .picture import save_png
from .progress import ImageProgress
from .render import images_of, render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", type=Path, required=True,
                   help="a checkpoint folder of moss train, or its --out folder (the latest "
                        "checkpoint in it)")
    p.add_argument("--model", default=None,
                   help="the base it was trained on (default: built-in tiny)")
    p.add_argument("--prompt", default="Draw a red square.")
    p.add_argument("--prompts", type=Path, default=None,
                   help="a text file, one prompt per line (instead of --prompt), run as a batch")
    p.add_argument("--image", action="store_true",
                   help="start each continuation with an image (the prompt is its caption)")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="the grid of codes of each generated image, for backbones whose images "
                        "carry their sizes (Emu3); default: the backbone's")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance for image tokens: each prompt also runs "
                        "without its caption in the same batch, and image tokens follow "
                        "u + scale * (c - u) (moss/guidance.py); default off")
    p.add_argument("--out", type=Path, default=Path("moss-generated"),
                   help="folder for the generated images' PNG files (default: moss-generated)")


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        return [args.prompt]
    try:
        lines = args.prompts.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"moss generate: --prompts: cannot read {args.prompts} ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit(f"moss generate: --prompts: {args.prompts} holds no prompt (one per line)")
    return prompts


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    h, sep, w = text.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit() or min(int(h), int(w)) < 1:
        raise SystemExit(f"moss generate: --image-size: expected HxW (e.g. 4x6), got {text!r}")
    return int(h), int(w)


def _adapter_folder(path: Path) -> Path:
    """``--adapter``: an adapter folder, or the ``--out`` folder of ``moss train``, whose
    ``latest`` names its newest whole checkpoint (moss/checkpoint.py)."""
    if (path / checkpoint.CONFIG_NAME).exists() or (path / checkpoint.PEFT_CONFIG_NAME).exists():
        return path
    return checkpoint.latest_checkpoint(path) or path  # (none: from_pretrained says what lacks)


def generate(args: argparse.Namespace) -> str:
    """What ``moss generate`` prints: each prompt's continuation, rendered (moss/render.py), and
    where its images were written."""
    if args.max_new_tokens < 1:
        raise SystemExit("moss generate: --max-new-tokens must be >= 1")
    if args.guidance_scale is not None and args.guidance_scale != args.guidance_scale:
        raise SystemExit("moss generate: --guidance-scale must be a number")
    prompts, grid = _prompts(args), _image_size(args.image_size)
    torch.manual_seed(args.seed)
    with input_errors("generate"):
        model, vocab, decode = backbones.load(args.model)
        if grid is not None and not vocab.sized and grid != tuple(vocab.grid):
            raise SystemExit(f"moss generate: --image-size: this backbone's images are all "
                             f"{vocab.grid[0]}x{vocab.grid[1]}, got {grid[0]}x{grid[1]}")
        moss = MossModel.from_pretrained(model, _adapter_folder(args.adapter),
                                         image_logits=True).eval()
    bos = [vocab.bos] if vocab.bos is not None else []
    opening = vocab.opening(grid) if args.image else []
    ids = [bos + list(vocab.encode_text(p)) + opening for p in prompts]
    guided = args.guidance_scale is not None
    if guided:  # the unconditional twins: no caption
        ids += [bos + opening for _ in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[vocab.pad] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    spans = ImageSpans(vocab, grid)
    progress = ImageProgress(spans, [f"prompt {i + 1}" for i in range(len(prompts))])
    processors = [spans, progress]
    if guided:  # it chooses each pair's token, so generate itself decodes greedily
        processors.append(ImageGuidance(spans, args.guidance_scale, sample=args.sample))
    try:
        with torch.no_grad():
            out = moss.generate(input_ids=input_ids, attention_mask=mask,
                                max_new_tokens=args.max_new_tokens,
                                do_sample=args.sample and not guided,
                                pad_token_id=vocab.pad, eos_token_id=vocab.eos,
                                logits_processor=LogitsProcessorList(processors))
    finally:
        progress.close()
    backbone = backbones.spec_for(model).name
    shown = []
    for i, prompt in enumerate(prompts):
        tokens = opening + out[i, width:].tolist()
        lines = [f"[{i + 1}] {prompt}"] if len(prompts) > 1 else []
        lines.append(render(tokens, vocab, decode))
        for j, image in enumerate(images_of(tokens, vocab)):
            path = args.out / f"prompt{i + 1}_image{j + 1}.png"
            kind = save_png(image, vocab, path, backbone)
            lines.append(f"wrote {path} ({kind}{'' if image.finished else ', unfinished'})")
        shown.append("\n".join(lines))
    return "\n\n".join(shown)


def main(args: argparse.Namespace) -> int:
    print(generate(args))
    return 0
