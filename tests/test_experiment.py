"""moss experiment: the synthetic data, the matched budgets, and a miniature run."""

import pytest
import torch

pytest.importorskip("transformers")

from moss import tiny  # noqa: E402
from moss.config import MossConfig  # noqa: E402
from moss.experiment import (  # noqa: E402
    GRID,
    adapter_params,
    dataset,
    make_record,
    matched_config,
    run,
    vocabulary,
)


def test_images_have_local_structure_and_the_splits_differ():
    rng = torch.Generator().manual_seed(0)
    for split in ("A", "B"):
        rec = make_record(split, rng, 0)
        codes = torch.tensor(rec["segments"][1]["codes"]).reshape(GRID)
        colour = codes // 8
        # Neighbours mostly share a colour (a shape on a background), unlike noise.
        same = ((colour[1:] == colour[:-1]).float().mean()
                + (colour[:, 1:] == colour[:, :-1]).float().mean())
        assert same / 2 > 0.6
        colours = set(range(4)) if split == "A" else set(range(4, 8))
        assert set(colour.unique().tolist()) <= colours
        assert rec["segments"][0]["text"].startswith("draw a ")
    vocab = vocabulary(tiny.build())
    a, b = dataset("A", 8, 1, vocab), dataset("A", 8, 1, vocab)
    assert [e.input_ids for e in a] == [e.input_ids for e in b]  # seeded


def test_variants_get_matched_parameter_budgets():
    layers = [(64, 64), (64, 32), (64, 128), (128, 64)]
    target = adapter_params(MossConfig(r_text=4, r_image=4, image_adapter="moe"), layers)
    for variant, k in [("shared", 2), ("conv", 2), ("conv", 3), ("conv_rank", 2)]:
        cfg = matched_config(variant, k, 4, 4, layers)
        assert abs(adapter_params(cfg, layers) - target) / target < 0.25, (variant, k)


def test_a_miniature_run_reports_every_variant(tmp_path, capsys):
    rows = run(quick=True, seeds=1, out=tmp_path, sizes=(3, 3, 16))
    names = {r["variant"] for r in rows}
    assert names == {"frozen (no adapter)", "shared", "moe", "conv k=2", "conv k=3",
                     "conv_rank k=2"}
    assert all(r["image"] > 0 and r["text"] > 0 for r in rows)
    assert "| conv k=2 |" in capsys.readouterr().out
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
