"""``moss generate``: interleaved output from a trained adapter, through transformers'
``generate`` and the layers' incremental decode state (``MossModel.generate``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import backbones
from .errors import input_errors
from .model import MossModel
from .render import render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", type=Path, required=True, help="a checkpoint folder of moss train")
    p.add_argument("--model", default=None,
                   help="the base it was trained on (default: built-in tiny)")
    p.add_argument("--prompt", default="Draw a red square.")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)


def generate(args: argparse.Namespace) -> str:
    """The generated continuation of ``--prompt``, rendered (moss/render.py)."""
    if args.max_new_tokens < 1:
        raise SystemExit("moss generate: --max-new-tokens must be >= 1")
    torch.manual_seed(args.seed)
    with input_errors("generate"):
        model, vocab, decode = backbones.load(args.model)
        moss = MossModel.from_pretrained(model, args.adapter, image_logits=True).eval()
    ids = ([vocab.bos] if vocab.bos is not None else []) + list(vocab.encode_text(args.prompt))
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = moss.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                            max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                            pad_token_id=vocab.pad, eos_token_id=vocab.eos)
    return render(out[0, prompt.shape[1]:].tolist(), vocab, decode)


def main(args: argparse.Namespace) -> int:
    print(generate(args))
    return 0
