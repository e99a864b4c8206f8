"""``moss bench``: how close each backend runs to the base GEMM, and how far ahead of what a
user has today, in one run on whatever hardware is present.

    moss bench                      the default case for this device, swept over rank and
                                    image fraction; table, CSV and PNG plots
    moss bench --quick              a small case and short sweeps (under 2 minutes on 2 cores)
    moss bench --case emu2-mlp-up --sweep kernel_size tokens --modes forward
    moss bench --model              a training step and greedy decoding of a small decoder:
                                    frozen, PEFT LoRA and MOSS per backend (model.py)

Everything is checked against float64 before it is timed (a wrong provider is reported and
left out); see cases.py (shapes, FLOP and byte counts), providers.py (what is timed),
runner.py (how) and report.py (table, CSV, plots).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..info import hardware
from . import context, model
from .cases import CPU_CASE, MODEL_CASES, QUICK_CASE, SWEEPS, Case, sweep
from .providers import ALTERNATIVES, available_providers
from .report import add_speedups, append_csv, format_table, plot
from .roofline import measure
from .runner import MODES, run_case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CASES = {CPU_CASE.name: CPU_CASE, QUICK_CASE.name: QUICK_CASE, **MODEL_CASES}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--case", choices=sorted(CASES), default=None,
                   help="base shape (default: chameleon-7b-qkvo on a GPU, cpu on a CPU)")
    p.add_argument("--tokens", type=int,
                   help="override the case's N (--model: the tokens of each sequence)")
    p.add_argument("--d-in", type=int, help="override the case's D_in")
    p.add_argument("--d-out", type=int, help="override the case's D_out")
    p.add_argument("--rank", type=int, help="override the case's rank (both adapters)")
    p.add_argument("--kernel-size", type=int, help="override the case's K")
    p.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"), help="override the grid")
    p.add_argument("--image-fraction", type=float, help="override the case's image fraction")
    p.add_argument("--sweep", nargs="*", choices=sorted(SWEEPS), default=None,
                   help="parameters to sweep around the case (default: rank image_fraction; "
                        "none with no names)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: all three")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2, quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="the small cpu-quick case and fewer rounds (under 2 minutes on 2 cores; "
                        "--model: a tiny decoder, seconds)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile providers")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the matmul rate and copy bandwidth first and show each time's "
                        "roofline (default: on a GPU)")
    p.add_argument("--out", type=Path, default=Path("moss-bench-results"),
                   help="folder for the CSV (appended) and the plots (default: %(default)s)")
    m = p.add_argument_group(
        "model benchmark", "--model times a training step and greedy decoding of a Llama-family "
        "decoder built from its config (random weights), frozen / PEFT LoRA / MOSS on each "
        "backend; --device, --dtype, --tokens (per sequence), --rank, --kernel-size, --grid, "
        "--reps, --warmup, --quick and --out apply too (default case: d 512, 4 layers, 8 "
        "heads, vocab 4096, 2 x 1000 tokens with three 16 x 16 images each, R 16, K 2, 64 "
        "decoded tokens)")
    m.add_argument("--model", action="store_true", help="run the model benchmark")
    m.add_argument("--d-model", type=int, help="hidden size")
    m.add_argument("--layers", type=int, help="decoder layers")
    m.add_argument("--heads", type=int, help="attention heads")
    m.add_argument("--vocab", type=int, help="vocabulary (its upper half: image tokens)")
    m.add_argument("--batch", type=int, help="sequences")
    m.add_argument("--images", type=int, help="images per sequence")
    m.add_argument("--decode-tokens", type=int, help="tokens decoded inside the last image")
    m.add_argument("--dropout", type=float, nargs="+",
                   help="adapter dropout, one run each (default: 0 0.05)")
    m.add_argument("--backends", nargs="+",
                   help="MOSS backends (default: every one running natively on the device)")


#: Options of one benchmark only, refused by the other (argparse's default: None or False).
LAYER_ONLY = ("case", "d_in", "d_out", "image_fraction", "sweep", "modes", "no_compile",
              "roofline")
MODEL_ONLY = ("d_model", "layers", "heads", "vocab", "batch", "images", "decode_tokens",
              "dropout", "backends")


def _refuse(args, names: tuple[str, ...], why: str) -> None:
    given = [n for n in names if getattr(args, n) not in (None, False)]
    if given:
        raise SystemExit(f"moss bench: --{given[0].replace('_', '-')} {why}")


def _base_case(args, gpu: bool) -> Case:
    name = args.case or (QUICK_CASE.name if args.quick else
                         "chameleon-7b-qkvo" if gpu else CPU_CASE.name)
    case = CASES[name]
    overrides = {"tokens": args.tokens, "d_in": args.d_in, "d_out": args.d_out,
                 "rank": args.rank, "kernel_size": args.kernel_size,
                 "grid": tuple(args.grid) if args.grid else None,
                 "image_fraction": args.image_fraction}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in ("tokens", "d_in", "d_out", "rank", "kernel_size"):
        if key in overrides and overrides[key] < 1:
            raise SystemExit(f"moss bench: --{key.replace('_', '-')} must be >= 1, got "
                             f"{overrides[key]}")
    if "grid" in overrides and min(overrides["grid"]) < 1:
        raise SystemExit(f"moss bench: --grid must be >= 1, got {overrides['grid']}")
    if not 0.0 <= overrides.get("image_fraction", 0.5) <= 1.0:
        raise SystemExit(f"moss bench: --image-fraction must be in [0, 1], got "
                         f"{overrides['image_fraction']}")
    return replace(case, **overrides)


def main(args: argparse.Namespace) -> int:
    if args.model:
        _refuse(args, LAYER_ONLY, "is the layer benchmark's, not --model's")
    else:
        _refuse(args, MODEL_ONLY, "is the model benchmark's: add --model")
    device = context.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    reps = args.reps if args.reps is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if reps < 1 or warmup < 0:
        raise SystemExit(f"moss bench: --reps must be >= 1 and --warmup >= 0, got {reps}, {warmup}")
    if args.model:
        return model.main(args, device, dtype, reps, warmup)
    base = _base_case(args, gpu)
    sweeps = ["rank", "image_fraction"] if args.sweep is None else args.sweep
    cases = [base]
    for name in sweeps:
        cases += [c for c in sweep(base, name) if c not in cases]

    found, skipped = available_providers(device, with_compile=not args.no_compile)
    alts = [p.name for p in found if not p.floor and not p.ours]  # shown; the CSV has them all
    print(f"moss bench on {hardware()}, torch {torch.__version__}, {dtype}; {len(cases)} "
          f"case(s), medians of {reps} interleaved rounds after {warmup} warm-up")
    print("providers: " + ", ".join(p.name for p in found))
    for name, why in skipped.items():
        print(f"  not run: {name}: {why}")
    ceilings = None
    if args.roofline if args.roofline is not None else gpu:
        ceilings = measure(device, dtype)
        print(f"ceilings measured here: {ceilings.describe()} (roofline: the longer of a row's "
              f"FLOPs and bytes at these rates)")

    from tqdm import tqdm

    run = context.run_context(device)
    rows, wrong, csv_path = [], {}, None
    with tqdm(total=len(cases) * (reps + warmup), desc="rounds", file=sys.stderr,
              disable=None) as bar:
        for case in cases:
            bar.set_postfix_str(case.label())
            case_rows, failures = run_case(case, found, device, dtype, reps, warmup,
                                           modes=args.modes or MODES, progress=bar, log=bar.write,
                                           ceilings=ceilings)
            add_speedups(case_rows, ALTERNATIVES)
            # Each case's rows are written as it finishes: a run cut short keeps them.
            if case_rows:
                csv_path = append_csv(args.out / f"moss_bench_{device.type}.csv", case_rows,
                                      run)
            rows += case_rows
            wrong.update({f"{p} on {case.label()}": why for p, why in failures.items()})
            bar.write(f"\n{case.label()}\n{format_table(case_rows, alts)}")
    print(f"\nappended {len(rows)} rows to {csv_path}")
    for name in sweeps:
        field = SWEEPS[name][0]
        swept = [r for r in rows if any(_same_case(r, c) for c in sweep(base, name))]
        title = f"{hardware()}, {dtype}: {base.label()}, varying {field}"
        png = plot(swept, field, args.out / f"{device.type}_ratio_vs_{field}.png", title)
        print(f"plot: {png}" if png else "plots need matplotlib (pip install matplotlib)")
    for what, why in wrong.items():
        print(f"WRONG: {what}: {why}")
    return 1 if any(w.startswith("moss:") for w in wrong) else 0


def _same_case(row: dict, case: Case) -> bool:
    return all(row[k] == getattr(case, k) for k in
               ("name", "tokens", "d_in", "d_out", "rank", "kernel_size", "image_fraction"))
