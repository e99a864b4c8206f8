"""Interleaved instruction data: JSONL records in a LEAF-INSTRUCT-like schema -> training batches.

One record a line::

    {"id": "shape-3",
     "segments": [
        {"role": "user", "type": "text", "text": "Draw a red square."},
        {"role": "assistant", "type": "image", "codes": [12, 12, 40, ...]},   # H*W VQ codes
        {"role": "assistant", "type": "text", "text": "A red square."}]}

Text goes through the backbone's tokenizer; an image is its VQ codes (row-major: a flat list
of H*W codes on the backbone's grid or on the segment's ``"grid": [H, W]``, or a list of H rows
of W codes; a size other than the backbone's only where images carry their sizes, as Emu3's do)
or an image file (``"path"``, relative to the JSONL file) that the backbone's VQ tokenizer
turns into codes; codes map to the backbone's image token ids, spelled as the backbone
writes images (begin / end of image; Emu3's size and row ends: its
:class:`~moss.backbones.Vocabulary`). Labels cover the assistant segments only (the response);
``include_image_loss=False`` leaves image tokens out of the loss. The layout needs nothing
more: image tokens are recognised by id (routing from ``input_ids``). Malformed records raise
``ValueError`` naming the file, line, record and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import Vocabulary

IGNORE = -100


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]


def _fail(where: str, field: str, what: str):
    raise ValueError(f"{where}: {field}: {what}")


def _image_codes(seg: dict, vocab: Vocabulary, where: str, field: str
                 ) -> tuple[list[int], tuple[int, int]]:
    """An image segment's codes (row-major) and grid: ``codes`` as H lists of W codes, or flat
    with the segment's ``"grid": [H, W]`` (default: the vocabulary's); a backbone whose images
    all share one grid (Chameleon) takes only that one."""
    if "codes" not in seg:
        _fail(where, f"{field}.codes", "missing (give codes or a path)")
    codes, grid = seg["codes"], seg.get("grid", vocab.grid)
    if isinstance(codes, list) and codes and all(isinstance(row, list) for row in codes):
        if len({len(row) for row in codes}) != 1:
            _fail(where, f"{field}.codes", f"rows of different lengths "
                  f"{sorted({len(row) for row in codes})}: an image is H rows of W codes")
        grid, codes = (len(codes), len(codes[0])), [c for row in codes for c in row]
    if (not isinstance(grid, (list, tuple)) or len(grid) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
        _fail(where, f"{field}.grid", f"expected [H, W], two ints >= 1, got {grid!r}")
    grid = (grid[0], grid[1])
    if not vocab.sized and grid != tuple(vocab.grid):
        _fail(where, f"{field}.codes", f"a {grid[0]} x {grid[1]} image; this backbone's images "
              f"are all {vocab.grid[0]} x {vocab.grid[1]}")
    n_codes, n_tokens = grid[0] * grid[1], len(vocab.code_to_token)
    if (not isinstance(codes, list) or len(codes) != n_codes or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n_tokens for c in codes)):
        _fail(where, f"{field}.codes", f"expected {n_codes} ints (a {grid[0]} x {grid[1]} grid, "
              f"flat or as rows) in [0, {n_tokens})")
    return codes, grid


def encode_record(record, vocab: Vocabulary, include_image_loss: bool, where: str,
                  base: Path = Path(".")) -> Example:
    if not isinstance(record, dict):
        _fail(where, "record", f"expected a JSON object, got {type(record).__name__}")
    rid = str(record.get("id", where))
    where = f"{where} (id {rid!r})"
    segments = record.get("segments")
    if not isinstance(segments, list) or not segments:
        _fail(where, "segments", "expected a non-empty list")
    ids = [vocab.bos] if vocab.bos is not None else []
    labels = [IGNORE] * len(ids)
    for i, seg in enumerate(segments):
        field = f"segments[{i}]"
        if not isinstance(seg, dict):
            _fail(where, field, "expected an object")
        role, kind = seg.get("role", "user"), seg.get("type")
        if role not in ("user", "assistant"):
            _fail(where, f"{field}.role", f"expected 'user' or 'assistant', got {role!r}")
        if kind == "text":
            text = seg.get("text")
            if not isinstance(text, str) or not text:
                _fail(where, f"{field}.text", "expected a non-empty string")
            toks = list(vocab.encode_text(text))
            learn = role == "assistant"
        elif kind == "image":
            if "path" in seg and "codes" not in seg:
                if vocab.encode_image_file is None:
                    _fail(where, f"{field}.path", "this backbone has no VQ tokenizer; give codes")
                file = base / str(seg["path"])
                if not file.is_file():
                    _fail(where, f"{field}.path", f"{file} " + (
                        "is not a file" if file.exists() else "does not exist"))
                try:
                    seg = {**seg, "codes": vocab.encode_image_file(file)}
                except (OSError, ValueError) as exc:  # PIL: unreadable or not an image
                    _fail(where, f"{field}.path", f"{file} could not be read as an image ({exc})")
            codes, grid = _image_codes(seg, vocab, where, field)
            toks = vocab.image(codes, grid)
            learn = role == "assistant" and include_image_loss
        else:
            _fail(where, f"{field}.type", f"expected 'text' or 'image', got {kind!r}")
        ids += toks
        labels += toks if learn else [IGNORE] * len(toks)
    if vocab.eos is not None:
        ids.append(vocab.eos)
        labels.append(vocab.eos if segments[-1].get("role", "user") == "assistant" else IGNORE)
    if all(label == IGNORE for label in labels):
        _fail(where, "segments", "no assistant segment to learn from")
    return Example(rid, ids, labels)


def load_jsonl(path: str | Path, vocab: Vocabulary,
               include_image_loss: bool = True) -> list[Example]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"data: expected a file path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} " + (
            "is not a file" if path.exists() else "does not exist"))
    examples = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            examples.append(encode_record(record, vocab, include_image_loss, where, path.parent))
    if not examples:
        raise ValueError(f"data: {path} holds no records")
    return examples


def collate(examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding never learned)."""
    if not examples:
        raise ValueError("examples: expected at least one Example to batch, got none")
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
