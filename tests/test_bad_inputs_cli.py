"""Bad arguments and input files to the `moss` command line: rows of docs/bad-inputs.md
(tests/catalogue.py)."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

from moss.cli import main

from catalogue import Catalogue, contains, jsonl
from helpers import tiny_llama

CLI = "the `moss` command line"
catalogue = Catalogue({CLI: "cli"})
behaviour = catalogue.behaviour
GPU = torch.cuda.is_available()


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``(exit status, message)`` of a command that must exit (in this process)."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    code = info.value.code
    return (1, code) if isinstance(code, str) else (code, err.getvalue())


def cli(input: str, status: int, fragment: str, *argvs, skip_if: bool = False, why: str = ""):
    """Commands that exit with ``status`` and ``fragment`` in their message, no traceback; an
    argv is a list, or ``f(tmp_path) -> list``."""
    def check(tmp):
        if skip_if:
            pytest.skip(why)
        for argv in argvs:
            got, message = run_cli(argv(tmp) if callable(argv) else argv)
            assert got == status and contains(message, fragment), (got, message)

    catalogue.add(CLI, input, f"exits {status}: `{fragment}`", check)


cli("`moss` (no command)", 2, "moss: error: the following arguments are required: command", [])
cli("`moss nope`", 2, "moss: error: argument command: invalid choice: 'nope'", ["nope"])
cli("`moss info --x`", 2, "moss: error: unrecognized arguments: --x", ["info", "--x"])
cli("`moss bench --tokens abc`", 2,
    "moss bench: error: argument --tokens: invalid int value: 'abc'",
    ["bench", "--tokens", "abc"])
cli("`moss bench --case nope`", 2, "moss bench: error: argument --case: invalid choice: 'nope'",
    ["bench", "--case", "nope"])
cli("`moss bench --tokens 0`", 1, "moss bench: --tokens must be >= 1, got 0",
    ["bench", "--tokens=0"])
cli("`moss bench --grid 0 3`", 1, "moss bench: --grid must be >= 1, got (0, 3)",
    ["bench", "--grid", "0", "3"])
cli("`moss bench --image-fraction 2` (or nan)", 1,
    "moss bench: --image-fraction must be in [0, 1], got",
    ["bench", "--image-fraction=2"], ["bench", "--image-fraction=nan"])
cli("`moss bench --reps 0` (or `--warmup -1`)", 1,
    "moss bench: --reps must be >= 1 and --warmup >= 0",
    ["bench", "--reps=0"], ["bench", "--warmup=-1"])
cli("`moss bench --device gpu`", 1, "moss bench: --device must be cpu or cuda[:index], got 'gpu'",
    ["bench", "--device", "gpu"])
cli("`moss bench --device cuda` without a GPU", 1,
    "moss bench: --device cuda: no CUDA GPU is visible",
    ["bench", "--device", "cuda"], skip_if=GPU, why="a GPU is visible")
cli("`moss bench --layers 2` (a `--model` option) without `--model`", 1,
    "moss bench: --layers is the model benchmark's: add --model", ["bench", "--layers", "2"])
cli("`moss bench --model --case cpu` (a layer-benchmark option)", 1,
    "moss bench: --case is the layer benchmark's, not --model's",
    ["bench", "--model", "--case", "cpu"])
cli("`moss bench --model --heads 3` (not dividing `--d-model` 512)", 1,
    "moss bench --model: --heads must divide --d-model (512) into an even head size",
    ["bench", "--model", "--heads", "3"])
cli("`moss bench --model --images 4` (4 x 256 tokens in a 1000-token sequence)", 1,
    "moss bench --model: --tokens must exceed --images x H x W = 1024",
    ["bench", "--model", "--images", "4"])
cli("`moss bench --model --decode-tokens 300` (past a 16 x 16 image)", 1,
    "moss bench --model: --decode-tokens must be at most H x W = 256",
    ["bench", "--model", "--decode-tokens", "300"])
cli("`moss bench --model --dropout 1`", 1, "moss bench --model: --dropout must be in [0, 1)",
    ["bench", "--model", "--dropout", "0", "1"])
cli("`moss bench --model --backends cuda-emulated` (or one not built)", 1,
    "moss bench --model: --backends: 'cuda-emulated' does not run natively on",
    ["bench", "--model", "--backends", "cuda-emulated"])


@behaviour(CLI, "`moss bench`, `train` or `experiment` with `--out` an existing file",
           "exits 1: `moss <command>: --out: ... is a file, not a folder`")
def _out_is_a_file(tmp):
    afile = jsonl(tmp, "x", "afile")
    for command in ("bench", "train", "experiment"):
        status, message = run_cli([command, "--out", str(afile)])
        assert status == 1 and contains(message, f"moss {command}: --out: ... afile is a file, "
                                                 f"not a folder"), message


cli("`moss train --steps abc`", 2, "moss train: error: argument --steps: invalid int value: 'abc'",
    ["train", "--steps", "abc"])
cli("`moss train --variant lora`", 2,
    "moss train: error: argument --variant: invalid choice: 'lora'",
    ["train", "--variant", "lora"])
cli("`moss train --backend fast`", 2,
    "moss train: error: argument --backend: invalid choice: 'fast'",
    ["train", "--backend", "fast"])
cli("`moss train --backend cuda` without a GPU", 1, "moss train: backend 'cuda' is not available",
    lambda tmp: ["train", "--backend", "cuda", "--out",
                 str(tmp)], skip_if=GPU, why="a GPU is visible")
cli("`moss train --steps 0`", 1, "moss train: --steps must be >= 1",
    lambda tmp: ["train", "--steps", "0", "--out", str(tmp)])
cli("`moss train --warmup -1`", 1, "moss train: --warmup must be >= 0, got -1",
    lambda tmp: ["train", "--warmup", "-1", "--out", str(tmp)])


@behaviour(CLI, "`moss train` with `--lr`, `--alpha` or `--max-grad-norm` 0, negative, NaN or Inf",
           "exits 1: `moss train: --<name> must be a finite number > 0, got <value>`")
def _train_floats(tmp):
    for name in ("lr", "alpha", "max-grad-norm"):
        for value in ("0", "-1", "nan", "inf"):
            status, message = run_cli(["train", f"--{name}", value, "--out", str(tmp)])
            assert status == 1 and f"moss train: --{name} must be a finite number > 0, got " \
                                   f"{float(value)}" in message, message


cli("`moss train --data bad.jsonl` (malformed)", 1, "moss train: ... bad.jsonl:1: not valid JSON",
    lambda tmp: ["train", "--data", str(jsonl(tmp, "{not json")), "--out", str(tmp)])
cli("`moss train --model nowhere/`", 1,
    "moss train: --model: ... nowhere is not a local checkpoint",
    lambda tmp: ["train", "--model", str(tmp / "nowhere"), "--out", str(tmp)])
cli("`moss train --model` a folder without a transformers `config.json`", 1,
    "moss train: --model: ... config.json is not a transformers config",
    lambda tmp: ["train", "--model", str(tmp), "--out", str(tmp / "run")])


def _llama_checkpoint(tmp) -> str:
    tiny_llama().save_pretrained(tmp / "llama")
    return str(tmp / "llama")


cli("`moss train` / `generate --model` a backbone with no image vocabulary (a Llama)", 1,
    "--model: ... holds a llama model, which has no image vocabulary moss can read (backbones "
    "with one: chameleon, emu3); adapt it from Python with an explicit layout",
    lambda tmp: ["train", "--model", _llama_checkpoint(tmp), "--out", str(tmp / "run")],
    lambda tmp: ["generate", "--model", _llama_checkpoint(tmp), "--adapter", str(tmp)])
cli("`moss train --resume` whose `latest` names a missing checkpoint", 1,
    "moss train --resume: path: ... checkpoint-9/moss_config.json does not exist", lambda tmp: [
        "train", "--resume", "--out", str(((tmp / "latest").write_text("checkpoint-9"), tmp)[1])])
cli("`moss train --resume` whose `latest` names no folder of the run (empty, a path)", 1,
    "moss train --resume: ... latest: names ... not a checkpoint folder in",
    *[lambda tmp, name=name: ["train", "--resume", "--out",
                              str(((tmp / "latest").write_text(name), tmp)[1])]
      for name in ("\n", "..", "../elsewhere")])


@behaviour(CLI, "`moss train --data missing.jsonl`, run as a process",
           "exits 1: `moss train: data: ... missing.jsonl does not exist` on stderr, no traceback")
def _cli_process(tmp):
    done = subprocess.run([sys.executable, "-m", "moss", "train", "--data",
                           str(tmp / "missing.jsonl"),
                           "--out", str(tmp)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1, done.stderr
    assert contains(done.stderr, "moss train: data: ... missing.jsonl does not exist"), done.stderr
    assert "Traceback" not in done.stderr


cli("`moss generate` (no --adapter)", 2,
    "moss generate: error: the following arguments are required: "
    "--adapter", ["generate"])
cli("`moss generate --adapter nowhere/`", 1,
    "moss generate: path: ... nowhere/moss_config.json does not exist",
    lambda tmp: ["generate", "--adapter", str(tmp / "nowhere")])
cli("`moss generate --max-new-tokens 0`", 1, "moss generate: --max-new-tokens must be >= 1",
    lambda tmp: ["generate", "--adapter", str(tmp), "--max-new-tokens", "0"])
cli("`moss generate --guidance-scale nan`", 1, "moss generate: --guidance-scale must be a number",
    lambda tmp: ["generate", "--adapter", str(tmp), "--guidance-scale", "nan"])
cli("`moss generate --prompts` a missing file", 1,
    "moss generate: --prompts: cannot read ... nowhere.txt",
    lambda tmp: ["generate", "--adapter", str(tmp), "--prompts", str(tmp / "nowhere.txt")])
cli("`moss generate --prompts` a file of blank lines", 1,
    "moss generate: --prompts: ... holds no prompt (one per line)",
    lambda tmp: ["generate", "--adapter", str(tmp), "--prompts",
                 str((tmp / "blank.txt").write_text("\n \n") and tmp / "blank.txt")])
cli("`moss generate --image-size` not HxW, or below 1", 1,
    "moss generate: --image-size: expected HxW (e.g. 4x6), got",
    lambda tmp: ["generate", "--adapter", str(tmp), "--image-size", "4"],
    lambda tmp: ["generate", "--adapter", str(tmp), "--image-size", "0x4"],
    lambda tmp: ["generate", "--adapter", str(tmp), "--image-size", "axb"])
cli("`moss generate --image-size` other than the backbone's only size (Chameleon)", 1,
    "moss generate: --image-size: this backbone's images are all 4x4, got 2x8",
    lambda tmp: ["generate", "--adapter", str(tmp), "--image-size", "2x8"])
cli("`moss experiment --seeds 0`", 1, "moss experiment: --seeds must be >= 1",
    ["experiment", "--seeds", "0"])
cli("`moss experiment --seeds x`", 2,
    "moss experiment: error: argument --seeds: invalid int value: 'x'",
    ["experiment", "--seeds", "x"])


test_row = catalogue.test()
