"""``moss bench --model``: a training step and greedy decoding of a small decoder, for the frozen
decoder, PEFT's LoRA and MOSS on each backend, with the same targets, ranks and dropout, in one
interleaved run:

    moss bench --model             the CPU target: fp32, d 512, 4 layers, 2 x 1000 tokens with
                                   three 16 x 16 images each, R 16, K 2; dropout 0 and 0.05
    moss bench --model --quick     a tiny decoder and fewer rounds (seconds)
    moss bench --model --d-model 1024 --layers 8 --dropout 0.1 --backends cpu

decoder.py is the case, candidates.py what is timed and how it is checked first; the timing is
runner.py's (interleaved rounds, each timed call after an untimed one of its own, medians with
p20/p80) and the table, CSV and plot report.py's. Each row's ratios are to measurements of the
same run: ``ratio_to_frozen`` (time / the frozen decoder's) and ``x_peft`` (PEFT's time / this
one, same dropout). ``peak_mb``: the allocator's peak above its level at the start of the
measured call (CUDA: in the timed rounds; CPU: training steps only, in one more call under the
profiler, :func:`moss_kernels.memory.cpu_peak_bytes`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import replace

import torch

import moss_kernels as mk
from moss_kernels import backends as mk_backends
from moss_kernels.memory import cpu_peak_bytes

from ..info import hardware
from . import context
from .candidates import build, check
from .decoder import CPU_MODEL, QUICK_MODEL, ModelCase
from .report import SPREAD, Column, add_speedups, append_csv, bar_plot, speedup, table
from .runner import interleave, summary, time_once

TRAIN, DECODE = "train step", "decode per token"
DROPOUTS = (0.0, 0.05)


def model_case(args: argparse.Namespace) -> ModelCase:
    base = QUICK_MODEL if args.quick else CPU_MODEL
    overrides = {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                 "vocab": args.vocab, "batch": args.batch, "tokens": args.tokens,
                 "images": args.images, "grid": tuple(args.grid) if args.grid else None,
                 "rank": args.rank, "kernel_size": args.kernel_size,
                 "decode_tokens": args.decode_tokens}
    case = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    problems = case.problems()
    if problems:
        raise SystemExit(f"moss bench --model: {problems[0]}")
    return case


def moss_backends(names: list[str] | None, device: torch.device) -> list[str]:
    """``--backends``, or every backend that runs natively on ``device``: an emulated one's
    times would mean nothing."""
    native = [n for n in mk.available_backends(device) if not mk_backends.backend(n).emulated]
    for name in names or ():
        if name not in native:
            raise SystemExit(f"moss bench --model: --backends: {name!r} does not run natively on "
                             f"{device.type} here; choose from {', '.join(native)}")
    return list(dict.fromkeys(names)) if names else native


def main(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, reps: int,
         warmup: int) -> int:
    """``moss bench --model`` (the device, dtype and rounds resolved as for the layers)."""
    gpu = device.type == "cuda"
    case = model_case(args)
    dropouts = list(dict.fromkeys(args.dropout if args.dropout is not None else DROPOUTS))
    if not all(0.0 <= p < 1.0 for p in dropouts):
        raise SystemExit(f"moss bench --model: --dropout must be in [0, 1), got {dropouts}")
    names = [f"moss:{b}" for b in moss_backends(args.backends, device)]
    print(f"moss bench --model on {hardware()}, torch {torch.__version__}, {dtype}; "
          f"{case.label()}; dropout {', '.join(f'{p:g}' for p in dropouts)}; medians of {reps} "
          f"interleaved rounds after {warmup} warm-up")
    if importlib.util.find_spec("peft") is None:
        print("  not run: peft: peft is not installed (pip install peft; a benchmark-only "
              "dependency)")
    else:
        names.insert(0, "peft")

    base = case.decoder(device, dtype)
    ids = case.input_ids(device)
    frozen = build(case, base, "frozen", None)
    candidates = [frozen] + [build(case, base, n, p) for p in dropouts for n in names]
    # Decoding runs in eval mode, where dropout is off: once per candidate is enough.
    decoders = [frozen] + [c for c in candidates if c.dropout == dropouts[0]]
    print("candidates: " + ", ".join(dict.fromkeys(c.name for c in candidates))
          + "; checking them first")
    wrong = check(case, base, candidates, decoders, ids)
    prompt = ids[:, :case.image_starts()[-1]]
    measured = ([(c, TRAIN, c.train_step(ids), 1) for c in candidates]
                + [(c, DECODE, c.decoding(prompt, case.decode_tokens, case.image_ids),
                    case.decode_tokens) for c in decoders])
    measured = [m for m in measured if m[0].name not in wrong]

    from tqdm import tqdm

    with tqdm(total=reps + warmup, desc="rounds", file=sys.stderr, disable=None) as bar:
        kept = interleave([lambda make=make: time_once(make, device) for _, _, make, _ in measured],
                          reps, warmup, bar)
    rows = []
    for (c, measure, make, per), got in zip(measured, kept):
        if gpu:
            peak = max(p for _, p in got)
        elif measure == TRAIN:  # profiled in one more, untimed call (profiling slows it)
            peak = cpu_peak_bytes(make())
        else:  # a decoding step holds little beside the KV cache: not worth a profiled call
            peak = float("nan")
        rows.append({**_case_columns(case), "dtype": str(dtype).split(".")[-1],
                     "measure": measure, "provider": c.name,
                     "dropout": c.dropout if measure == TRAIN else None,
                     "trainable_params": sum(p.numel() for p in c.trainable()),
                     **summary([t / per for t, _ in got]), "peak_mb": peak / 2**20})
    add_speedups(rows, ["peft"], same=("measure", "dropout"))
    floor = {r["measure"]: r["median_ms"] for r in rows if r["provider"] == "frozen"}
    for r in rows:
        r["ratio_to_frozen"] = (r["median_ms"] / floor[r["measure"]] if r["measure"] in floor
                                else float("nan"))

    csv_path = append_csv(args.out / f"moss_bench_model_{device.type}.csv", rows,
                          context.run_context(device, ("transformers", "peft")))
    print(f"\n{case.label()}\n{_table(rows)}")
    print(f"\nappended {len(rows)} rows to {csv_path}")
    png = bar_plot(rows, "measure", "dropout", args.out / f"{device.type}_model.png",
                   f"{hardware()}, {dtype}\n{case.label()}", label=_dropout_label)
    print(f"plot: {png}" if png else "plots need matplotlib (pip install matplotlib)")
    for name, why in wrong.items():
        print(f"WRONG: {name}: {why}")
    return 1 if any(name.startswith("moss:") for name in wrong) else 0


def _case_columns(case: ModelCase) -> dict:
    return {**{k: v for k, v in vars(case).items() if k != "grid"},
            "grid": f"{case.grid[0]}x{case.grid[1]}"}


def _dropout_label(p: float | None) -> str:
    return "no dropout (frozen; eval-mode decoding)" if p is None else f"dropout {p:g}"


def _table(rows: list[dict]) -> str:
    return table(rows, [
        Column("measure", 16, lambda r: r["measure"], left=True),
        Column("provider", 16, lambda r: r["provider"], left=True),
        Column("dropout", 7, lambda r: "" if r["dropout"] is None else f"{r['dropout']:g}"),
        *SPREAD,
        Column("x frozen", 8, lambda r: f"{r['ratio_to_frozen']:.3f}x"),
        Column("vs peft", 14, lambda r: "" if r["provider"] == "peft"
               else speedup(r["x_peft"])),
        Column("peak MB", 9, lambda r: "" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.1f}"),
        Column("trainable", 10, lambda r: f"{r['trainable_params']:,}"),
    ])

