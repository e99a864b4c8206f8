"""Bad input to the data loader (moss.data): rows of docs/bad-inputs.md (tests/catalogue.py)."""

import dataclasses
from functools import lru_cache

import pytest

from moss import backbones
from moss.data import collate, load_jsonl

from catalogue import Catalogue, jsonl

DATA = "the data loader (moss.data)"
catalogue = Catalogue({DATA: "data"})
error, errors, behaviour = catalogue.error, catalogue.errors, catalogue.behaviour


@lru_cache(maxsize=1)
def _vocab():
    return backbones.load(None)[1]


def load_data(path, vocab=None):
    return load_jsonl(path, vocab or _vocab())


A = '{"role": "assistant", "type": "text", "text": "ok"}'


def records(input: str, fragment: str, *lines: str):
    """A row of JSONL lines that each fail with ``fragment``."""
    error(DATA, input, ValueError, fragment,
          *[lambda tmp, line=line: load_data(jsonl(tmp, line)) for line in lines])


error(DATA, "`path` not a path (None)", TypeError,
      "data: expected a file path (str or os.PathLike), got NoneType", lambda: load_data(None))
error(DATA, "a file that does not exist", FileNotFoundError,
      "data: ... missing.jsonl does not exist",
      lambda tmp: load_data(tmp / "missing.jsonl"))
error(DATA, "a folder instead of a file", FileNotFoundError, "data: ... is not a file",
      lambda tmp: load_data(tmp))
error(DATA, "an empty file (or only blank lines)", ValueError,
      "data: ... bad.jsonl holds no records",
      lambda tmp: load_data(jsonl(tmp, "", raw=b"")), lambda tmp: load_data(jsonl(tmp, "  \n")))
error(DATA, "a line that is not UTF-8", ValueError,
      "bad.jsonl:1: not UTF-8 (invalid continuation byte",
      lambda tmp: load_data(jsonl(tmp, "", raw=b'{"segments": "caf\xe9"}\n')))
records("a line that is not JSON", "bad.jsonl:1: not valid JSON", "{not json")
records("a record that is not an object", "bad.jsonl:1: record: expected a JSON object", "[1, 2]")
records("`segments` missing, empty or not a list",
        "bad.jsonl:1 (id 'a'): segments: expected a non-empty list",
        '{"id": "a"}', '{"id": "a", "segments": []}', '{"id": "a", "segments": {"type": "text"}}')
records("a segment that is not an object", "segments[0]: expected an object", '{"segments": [1]}')
records("a segment `type` other than text / image",
        "segments[0].type: expected 'text' or 'image', got",
        '{"segments": [{"type": "video"}]}', '{"segments": [{"text": "a"}]}')
records("a `role` other than user / assistant",
        "segments[0].role: expected 'user' or 'assistant', got 'bot'",
        '{"segments": [{"type": "text", "text": "a", "role": "bot"}]}')
records("`text` empty or not a str", "segments[0].text: expected a non-empty string",
        '{"segments": [{"type": "text", "text": ""}]}',
        '{"segments": [{"type": "text", "text": 5}]}')
records("`codes` of the wrong count, out of range (negative, >= codebook size) or not ints",
        "segments[0].codes: expected 16 ints (a 4 x 4 grid, flat or as rows) in [0, 64)",
        *['{"segments": [{"type": "image", "codes": [%s]}]}' % ", ".join([first] + ["1"] * n)
          for first, n in [("1", 1), ("64", 15), ("-1", 15), ("1.0", 15), ("true", 15),
                           ("NaN", 15)]])
records("`codes` as rows of different lengths",
        "segments[0].codes: rows of different lengths [1, 2]: an image is H rows of W codes",
        '{"segments": [{"type": "image", "codes": [[1, 2], [3]]}]}')
records("an image of another size than the backbone's only one (Chameleon)",
        "segments[0].codes: a 2 x 8 image; this backbone's images are all 4 x 4",
        '{"segments": [{"type": "image", "codes": [%s]}]}' % ", ".join(
            "[%s]" % ", ".join(["1"] * 8) for _ in range(2)),
        '{"segments": [{"type": "image", "grid": [2, 8], "codes": [%s]}]}' % ", ".join(
            ["1"] * 16))
records("a `grid` that is not two ints >= 1",
        "segments[0].grid: expected [H, W], two ints >= 1, got",
        '{"segments": [{"type": "image", "grid": [4], "codes": [1]}]}',
        '{"segments": [{"type": "image", "grid": [0, 4], "codes": [1]}]}',
        '{"segments": [{"type": "image", "grid": "4x4", "codes": [1]}]}')
records("an image with neither `codes` nor `path`",
        "segments[0].codes: missing (give codes or a path)",
        '{"segments": [{"type": "image"}]}')
records("an image `path` that does not exist", "segments[0].path: ... cat.png does not exist",
        '{"segments": [{"type": "image", "path": "cat.png"}]}')
records("no assistant segment (nothing to learn)", "segments: no assistant segment to learn from",
        '{"segments": [{"type": "text", "text": "a"}]}')


@behaviour(DATA, "an image `path` that is a folder, or not an image",
           "`ValueError`: `segments[0].path: ... is not a file` / "
           "`... could not be read as an image`")
def _not_an_image(tmp):
    (tmp / "img").mkdir()
    (tmp / "fake.png").write_text("not a png")
    for path, what in [("img", "is not a file"), ("fake.png", "could not be read as an image")]:
        line = '{"segments": [{"type": "image", "path": "%s"}, %s]}' % (path, A)
        with pytest.raises(ValueError, match=f"segments\\[0\\].path: .*{what}"):
            load_data(jsonl(tmp, line))


error(DATA, "an image `path` on a backbone without a VQ tokenizer", ValueError,
      "segments[0].path: this backbone has no VQ tokenizer; give codes",
      lambda tmp: load_data(jsonl(tmp,
                                  '{"segments": [{"type": "image", "path": "a.png"}, %s]}' % A),
                            dataclasses.replace(_vocab(), encode_image_file=None)))


def _collate_nothing():
    collate([], 0)


error(DATA, "`collate` of no examples", ValueError,
      "examples: expected at least one Example to batch",
      _collate_nothing)


test_row = catalogue.test()
