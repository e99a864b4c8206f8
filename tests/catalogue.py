"""The bad-input catalogue (docs/bad-inputs.md): its rows, how they are checked, and the doc.

A row is (entry point, input, what happens) plus the code that shows it. An error row names the
exception and a fragment of its message, matched literally (`` ... `` stands for any text, a
temporary path say; ``<name>`` for the field that varies between the row's cases); a behaviour
row says what happens in words and its check asserts it.

The rows live beside the entry points they test, one file per group, each with a
:class:`Catalogue` of its own and the test it makes (``test_row = catalogue.test()``); MODULES
lists them in the doc's order. tests/test_bad_inputs_doc.py checks that docs/bad-inputs.md
holds exactly their rows; ``python tests/catalogue.py`` rewrites the doc's tables after a
change.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
#: The row files, in the order the doc shows their entry points.
MODULES = ("test_bad_inputs_routing", "test_bad_inputs_linear", "test_bad_inputs_model",
           "test_bad_inputs_checkpoint", "test_bad_inputs_peft", "test_bad_inputs_data",
           "test_bad_inputs_cli")
NAN, INF = float("nan"), float("inf")
#: The layout several entry points' rows use: [B, T] = [2, 6], text, two images, padding.
R = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, -1, -1]])
OK_SPANS = [[1, 2, 2], [6, 1, 2]]


def jsonl(tmp: Path, text: str, name="bad.jsonl", raw: bytes | None = None) -> Path:
    """A data file several entry points' rows read: ``text`` as one line, or ``raw`` bytes."""
    path = tmp / name
    path.write_bytes(raw if raw is not None else (text + "\n").encode())
    return path


@dataclass(frozen=True)
class Row:
    entry: str  # the doc's section
    input: str  # Markdown
    outcome: str  # Markdown
    check: Callable  # asserts the outcome; takes tmp_path if it names a parameter
    short: str  # the entry's name in test ids


def run(fn: Callable, tmp: Path):
    """``fn(tmp)`` if ``fn`` has a parameter without a default (lambdas bind loop variables
    through defaults), else ``fn()``."""
    params = inspect.signature(fn).parameters.values()
    return fn(tmp) if any(p.default is p.empty for p in params) else fn()


def contains(message: str, fragment: str) -> bool:
    """``fragment`` in ``message``, `` ... `` in the fragment standing for any text."""
    at = 0
    for part in fragment.split(" ... "):
        at = message.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


def raises(exc: type[BaseException], fragment: str, call: Callable, tmp: Path) -> None:
    with pytest.raises(exc) as info:
        run(call, tmp)
    assert contains(str(info.value), fragment), f"{fragment!r} not in {str(info.value)!r}"


class Catalogue:
    """The rows of one file. ``short`` names an entry in test ids (default: its first word)."""

    def __init__(self, short: dict[str, str] | None = None):
        self.rows: list[Row] = []
        self._short = short or {}

    def add(self, entry: str, input: str, outcome: str, check: Callable) -> None:
        self.rows.append(Row(entry, input, outcome, check,
                             self._short.get(entry, entry.split()[0])))

    def error(self, entry: str, input: str, exc: type[BaseException], fragment: str,
              *calls: Callable) -> None:
        """A row whose every call raises ``exc`` with ``fragment`` in its message."""
        def check(tmp):
            for call in calls:
                raises(exc, fragment, call, tmp)

        self.add(entry, input, f"`{exc.__name__}`: `{fragment}`", check)

    def errors(self, entry: str, input: str, exc: type[BaseException], template: str,
               cases: list[tuple[dict, Callable]]) -> None:
        """A row of cases that differ in a name or value: case ``(fields, call)`` raises
        ``exc`` with ``template.format(**fields)``; the doc shows each ``{field}`` as
        ``<field>``."""
        def check(tmp):
            for fields, call in cases:
                raises(exc, template.format(**fields), call, tmp)

        shown = re.sub(r"\{(\w+)(?:![rs])?\}", r"<\1>", template)
        self.add(entry, input, f"`{exc.__name__}`: `{shown}`", check)

    def behaviour(self, entry: str, input: str, outcome: str):
        """Decorator: a row whose check is the decorated function."""
        def register(fn):
            self.add(entry, input, outcome, fn)
            return fn
        return register

    def test(self):
        """The test of this file's rows, one case per row."""
        @pytest.mark.parametrize("row", self.rows, ids=[row_id(r) for r in self.rows])
        def test_row(row: Row, tmp_path):
            run(row.check, tmp_path)

        return test_row


def row_id(row: Row) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{row.short} {row.input}").strip("-")


def all_rows() -> list[Row]:
    return [row for name in MODULES for row in importlib.import_module(name).catalogue.rows]


def entries(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.entry for r in rows))


def render(rows: list[Row], entry: str) -> str:
    lines = ["| input | what happens |", "|---|---|"]
    lines += [f"| {r.input} | {r.outcome} |" for r in rows if r.entry == entry]
    return "\n".join(lines)


BLOCK = re.compile(r"<!-- catalogue: (.+?) -->\n(.*?)\n<!-- /catalogue -->", re.S)


def write_doc() -> None:
    rows = all_rows()
    names = entries(rows)
    text = DOC.read_text()
    missing = [e for e in names if f"<!-- catalogue: {e} -->" not in text]
    text += "".join(f"\n## {e}\n\n<!-- catalogue: {e} -->\n\n<!-- /catalogue -->\n"
                    for e in missing)
    text = BLOCK.sub(lambda m: f"<!-- catalogue: {m[1]} -->\n{render(rows, m[1])}\n"
                               f"<!-- /catalogue -->" if m[1] in names else "", text)
    DOC.write_text(text)


if __name__ == "__main__":
    import os

    if not torch.cuda.is_available():  # as conftest.py sets it for the test files
        os.environ.setdefault("TRITON_INTERPRET", "1")
    write_doc()
