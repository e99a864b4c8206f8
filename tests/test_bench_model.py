"""``moss bench --model`` end to end on a tiny decoder: every candidate is checked, then timed
for a training step (each dropout) and for decoding; the table, CSV and plot are written; a
wrong candidate is reported and left out (bad arguments: tests/test_bad_inputs_cli.py)."""

import csv

from moss.bench import model as model_bench
from moss.cli import main
from moss_kernels import backends

from helpers import CPU_BACKENDS

TINY = ["bench", "--model", "--device", "cpu", "--d-model", "32", "--layers", "1", "--heads",
        "2", "--vocab", "64", "--tokens", "30", "--images", "2", "--grid", "3", "4", "--rank",
        "2", "--decode-tokens", "4", "--reps", "2", "--warmup", "0"]
OURS = [f"moss:{n}" for n in CPU_BACKENDS if not backends.backend(n).emulated]


def _rows(tmp_path) -> list[dict]:
    return list(csv.DictReader((tmp_path / "moss_bench_model_cpu.csv").open()))


def test_checks_then_times_every_candidate_and_reports(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checking them first" in out and "WRONG" not in out
    rows = _rows(tmp_path)
    train = {(r["provider"], r["dropout"]) for r in rows if r["measure"] == "train step"}
    assert train == {("frozen", "")} | {(p, d) for p in ["peft", *OURS] for d in ("0.0", "0.05")}
    decode = {(r["provider"], r["dropout"]) for r in rows if r["measure"] == "decode per token"}
    assert decode == {(p, "") for p in ["frozen", "peft", *OURS]}
    assert all(r["hardware"] and r["date"] and r["peft"] and float(r["median_ms"]) > 0
               and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
               for r in rows)
    assert all(float(r["ratio_to_frozen"]) == 1.0 for r in rows if r["provider"] == "frozen")
    assert all(float(r["x_peft"]) == 1.0 for r in rows if r["provider"] == "peft")
    assert all(float(r["x_peft"]) > 0 for r in rows if r["provider"] in OURS)
    # MOSS adds an image adapter beside PEFT's one LoRA; the frozen decoder trains nothing.
    params = {r["provider"]: int(r["trainable_params"]) for r in rows}
    assert params["frozen"] == 0 < params["peft"] < min(params[p] for p in OURS)
    for provider in ["frozen", "peft", *OURS]:
        assert provider in out
    assert (tmp_path / "cpu_model.png").stat().st_size > 10_000


def test_leaves_out_a_wrong_candidate(tmp_path, capsys, monkeypatch):
    real, wrong = model_bench.build, OURS[-1]

    def build(case, base, name, dropout):
        c = real(case, base, name, dropout)
        if name == wrong:
            c.model.model.get_output_embeddings().register_forward_hook(lambda m, i, y: y * 1.01)
        return c

    monkeypatch.setattr(model_bench, "build", build)
    assert main(TINY + ["--dropout", "0", "--reps", "1", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{wrong}: WRONG, not timed: logits with fresh adapters" in out
    rows = _rows(tmp_path)
    assert rows and wrong not in {r["provider"] for r in rows}
