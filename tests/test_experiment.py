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


def test_the_digits_are_real_scans_split_by_digit_and_spelled_as_images():
    from moss.real_experiment import LEVELS, codes_vocabulary, examples, load, splits

    data = load("digits")
    codes, digit = data.codes, data.label
    assert codes.shape == (1797, 64) and codes.min() == 0 and codes.max() == LEVELS - 1
    parts = splits(data)
    assert set(digit[parts["pre"]]) == {0, 1, 2, 3, 4}
    assert set(digit[parts["train"]]) == set(digit[parts["held"]]) == {5, 6, 7, 8, 9}
    assert not set(parts["train"]) & set(parts["held"])
    assert len(parts["train"]) + len(parts["held"]) == int((digit >= 5).sum())
    vocab = codes_vocabulary(tiny.build())
    i = parts["held"][0]
    (ex,) = examples(data, [i], vocab)
    k = int(digit[i])
    names = ["five", "six", "seven", "eight", "nine"]
    want = ([vocab.bos] + vocab.encode_text(f"digit {k}") + vocab.image(codes[i].tolist())
            + vocab.encode_text(f"that is a {names[k - 5]}") + [vocab.eos])
    assert ex.input_ids == want and len(vocab.code_to_token) == LEVELS


def test_the_photo_patches_are_two_photographs_quantised():
    import numpy as np

    from moss.real_experiment import load, splits

    data = load("photos")
    assert data.codes.shape == (1800, 64) and data.codes.min() >= 0 and data.codes.max() <= 16
    assert data.new == [1] and np.bincount(data.label).tolist() == [900, 900]
    assert len(np.unique(data.codes, axis=0)) == 1800  # textured: no two patches alike
    assert min(len(np.unique(x)) for x in data.codes) >= 3
    parts = splits(data)
    assert set(data.label[parts["pre"]]) == {0} and set(data.label[parts["held"]]) == {1}
    assert data.prompt(1) == "a patch of the flower"


def test_the_scorer_reads_real_digits_and_tells_noise_from_them():
    import numpy as np

    from moss.real_experiment import Scorer, load, splits

    data = load("digits")
    parts = splits(data)
    scorer = Scorer(data, parts)
    train = parts["train"]
    real = np.stack([data.codes[train[data.label[train] == k]][:30] for k in data.new])
    noise = np.random.default_rng(0).integers(0, 17, real.shape)
    good, bad = scorer(real), scorer(noise)
    assert good["accuracy"] > 0.85 and bad["accuracy"] < 0.5
    assert bad["mmd"] > 10 * max(good["mmd"], 1e-3)


@pytest.mark.parametrize("dataset", ["digits", "photos"])
def test_a_miniature_real_run_reports_every_variant_with_curves_and_samples(dataset, tmp_path,
                                                                             capsys):
    from moss.real_experiment import run

    rows = run(dataset, quick=True, seeds=1, out=tmp_path, sizes=(3, 4, 2, 10))
    names = [r["variant"] for r in rows]
    assert names == ["frozen (no adapter)", "shared r=8", "moe r=8", "conv k=2 r=8",
                     "conv k=3 r=8", "conv k=2 r=3", "conv k=3 r=2", "full fine-tune"]
    assert {r["comparison"] for r in rows} == {"reference", "equal rank", "equal params"}
    for r in rows[1:]:
        assert [s for s, _ in r["curve"]] == [0, 2, 4] and 0 <= r["accuracy"] <= 1
    conv3 = next(r for r in rows if r["variant"] == "conv k=3 r=8")
    moe = next(r for r in rows if r["variant"] == "moe r=8")
    assert conv3["r_image"] == moe["r_image"] == 8 and conv3["params"] > moe["params"]
    assert "| conv k=3 r=2 | equal params |" in capsys.readouterr().out
    stem = f"{dataset}_experiment_quick"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{stem}.json", f"{stem}.md", f"{stem}_curves.png", f"{stem}_samples.png"]
