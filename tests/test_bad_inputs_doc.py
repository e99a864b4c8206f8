"""The bad-input catalogue's doc, docs/bad-inputs.md, lists exactly the rows of the
tests/test_bad_inputs_*.py files (regenerate its tables with ``python tests/catalogue.py``)."""

from pathlib import Path

from catalogue import BLOCK, DOC, MODULES, all_rows, entries, render, row_id


def test_every_row_file_is_in_the_catalogue():
    files = {p.stem for p in Path(__file__).parent.glob("test_bad_inputs_*.py")}
    assert set(MODULES) == files - {Path(__file__).stem}


def test_rows_are_distinct():
    ids = [row_id(r) for r in all_rows()]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_the_doc_lists_exactly_these_rows():
    rows = all_rows()
    blocks = BLOCK.findall(DOC.read_text())
    assert [entry for entry, _ in blocks] == entries(rows)
    for entry, table in blocks:
        assert table.splitlines() == render(rows, entry).splitlines(), entry
