"""``moss bench``: every available backend of ``moss_linear`` against the ``F.linear`` floor.

One realistic shape (DESIGN section 7's CPU shape on a CPU, Chameleon-7B's on a GPU), checked
against the float64 reference before anything is timed. Candidates are interleaved
(A B A B ...) so a drifting machine hits all of them alike; we report medians with p20/p80 and
the ratio to the floor measured in the same run. Modes:

* ``forward``: inference, no autograd.
* ``forward+backward``: the floor is ``F.linear`` forward plus its ``dx`` backward (the frozen
  base layer of adapter training); MOSS adds its adapters' forward and all their gradients.

FLOPs (for TFLOP/s): the floor is ``2 N D_in D_out`` (twice that with its dx backward); MOSS
adds ``2 N D_in (R_t + K^2 R_i)`` for the tap products and ``2 N D_out (R_t + R_i)`` for the
expand (the rank-space routing is O(N K^2 R) and left out), three times that in training.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels.backends import implementation

from .info import hardware

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Max |error| / max |reference| allowed against float64 before timing, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass
class Shape:
    tokens: int
    d_in: int
    d_out: int
    rank: int
    kernel_size: int
    grid: tuple[int, int]
    image_fraction: float

    def flops(self, mode: str, with_adapter: bool) -> int:
        """Floor: forward, plus the dx GEMM in training. Adapter: forward, plus twice that."""
        training = mode == "forward+backward"
        base = 2 * self.tokens * self.d_in * self.d_out * (2 if training else 1)
        if not with_adapter:
            return base
        k2 = self.kernel_size ** 2
        adapter = 2 * self.tokens * (self.d_in * self.rank * (1 + k2) + self.d_out * 2 * self.rank)
        return base + adapter * (3 if training else 1)


def layout(shape: Shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat route and image spans: text runs and whole images alternating in the requested
    proportion (the last image may be partial, as during generation)."""
    h, w = shape.grid
    hw = h * w
    f = shape.image_fraction
    text_run = shape.tokens if f <= 0 else round(hw * (1 - f) / f)
    route = torch.zeros(shape.tokens, dtype=torch.int8)
    images, t = [], 0
    while t < shape.tokens:
        t += text_run
        if t >= shape.tokens or f <= 0:
            break
        route[t : t + hw] = 1
        images.append((t, h, w))
        t += hw
    return route.to(device), torch.tensor(images, dtype=torch.int64).reshape(-1, 3).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def run(shape: Shape, device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    d_in, d_out, r, k = shape.d_in, shape.d_out, shape.rank, shape.kernel_size
    route, images = layout(shape, device)
    plan = mk.RoutingPlan.from_spans(route, images, kernel_size=k)
    master = {
        "x": rand(shape.tokens, d_in), "weight": rand(d_out, d_in) / d_in ** 0.5,
        "bias": rand(d_out), "text_A": rand(r, d_in) / d_in ** 0.5,
        "text_B": rand(d_out, r) / r ** 0.5, "image_A": rand(r, d_in, k, k) / d_in ** 0.5,
        "image_B": rand(d_out, r) / r ** 0.5,
    }
    dy = rand(shape.tokens, d_out).to(dtype)
    adapters = ("text_A", "text_B", "image_A", "image_B")

    def inputs(dt, grad):
        """Fresh leaves (copies), so gradients of different candidates never accumulate."""
        return {n: v.to(dt, copy=True).requires_grad_(grad and n in ("x", *adapters))
                for n, v in master.items()}

    def moss(t, backend):
        return mk.moss_linear(t["x"], t["weight"], t["bias"], plan, *(t[a] for a in adapters),
                              text_scale=2.0, image_scale=2.0, backend=backend)

    backends = [n for n in mk.available_backends(device)
                if not getattr(implementation(n), "INTERPRETED", False)]
    # Correctness first: every backend against float64, outputs and gradients.
    ref_t = inputs(torch.float64, True)
    y_ref = moss(ref_t, "reference")
    y_ref.backward(dy.to(torch.float64))
    for name in backends:
        t = inputs(dtype, True)
        y = moss(t, name)
        y.backward(dy)
        for what, got, want in [("y", y, y_ref)] + [
            (f"d{n}", t[n].grad, ref_t[n].grad) for n in ("x", *adapters)
        ]:
            err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
            if not err <= TOLERANCE[dtype]:
                raise RuntimeError(f"backend {name!r}: {what} is off by {err:.2e} (relative to "
                                   f"max |reference|), above the {dtype} tolerance "
                                   f"{TOLERANCE[dtype]:.0e}; not timing a wrong kernel")
    print(f"correctness: outputs and gradients of {', '.join(backends)} match the float64 "
          f"reference")

    fwd_t, bwd_t = inputs(dtype, False), inputs(dtype, True)
    bwd_t["x"].requires_grad_(True)

    def floor_fwd():
        with torch.no_grad():
            F.linear(fwd_t["x"], fwd_t["weight"], fwd_t["bias"])

    def floor_fwd_bwd():
        F.linear(bwd_t["x"], bwd_t["weight"], bwd_t["bias"]).backward(dy)

    candidates = [("F.linear", "forward", floor_fwd), ("F.linear", "forward+backward", floor_fwd_bwd)]
    for name in backends:
        def fwd(name=name):
            with torch.no_grad():
                moss(fwd_t, name)

        def fwd_bwd(name=name):
            moss(bwd_t, name).backward(dy)

        candidates += [(f"moss/{name}", "forward", fwd), (f"moss/{name}", "forward+backward", fwd_bwd)]

    times: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
    for rep in range(warmup + reps):
        for i, (_, _, fn) in enumerate(candidates):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if rep >= warmup:
                times[i].append(time.perf_counter() - start)
        for v in bwd_t.values():
            v.grad = None
        print(f"\rtiming: {rep + 1}/{warmup + reps} rounds", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows, floor = [], {}
    for i, (provider, mode, _) in enumerate(candidates):
        med, p20, p80 = _quantiles(times[i])
        if provider == "F.linear":
            floor[mode] = med
        flops = shape.flops(mode, provider != "F.linear")
        rows.append({
            "provider": provider, "mode": mode, "median_ms": med * 1e3, "p20_ms": p20 * 1e3,
            "p80_ms": p80 * 1e3, "ratio_to_floor": med / floor[mode],
            "tflops": flops / med / 1e12,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'provider':<16} {'mode':<17} {'median ms':>10} {'p20':>9} {'p80':>9} {'x floor':>8} {'TFLOP/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['provider']:<16} {r['mode']:<17} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} "
            f"{r['p80_ms']:>9.3f} {r['ratio_to_floor']:>7.3f}x {r['tflops']:>8.3f}"
        )
    return "\n".join(lines)


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def append_csv(path: Path, rows: list[dict], context: dict) -> None:
    """Append rows (with the run's hardware, versions, git sha, date and shape) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{**context, **r} for r in rows]
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        if new:
            writer.writeheader()
        writer.writerows(records)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--tokens", type=int, default=None, help="N (default: 4096 CPU, 16384 GPU)")
    p.add_argument("--d-in", type=int, default=None, help="default: 1024 CPU, 4096 GPU")
    p.add_argument("--d-out", type=int, default=None, help="default: --d-in")
    p.add_argument("--rank", type=int, default=16, help="rank of both adapters")
    p.add_argument("--kernel-size", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image grid (default: 16 16 CPU, 32 32 GPU)")
    p.add_argument("--image-fraction", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 15, --quick 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a quarter of the tokens, fewer rounds")
    p.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV file")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    d_in = pick(args.d_in, 4096 if gpu else 1024)
    tokens = pick(args.tokens, (16384 if gpu else 4096) // (4 if args.quick else 1))
    grid = tuple(pick(args.grid, (32, 32) if gpu else (16, 16)))
    reps = pick(args.reps, 5 if args.quick else 15)
    for name, value in (("--tokens", tokens), ("--d-in", d_in), ("--d-out", pick(args.d_out, 1)),
                        ("--rank", args.rank), ("--kernel-size", args.kernel_size),
                        ("--grid", min(grid)), ("--reps", reps)):
        if value < 1:
            raise SystemExit(f"moss bench: {name} must be >= 1, got {value}")
    if not 0.0 <= args.image_fraction <= 1.0:
        raise SystemExit(f"moss bench: --image-fraction must be in [0, 1], got {args.image_fraction}")
    shape = Shape(tokens, d_in, pick(args.d_out, d_in), args.rank, args.kernel_size, grid,
                  args.image_fraction)
    print(f"moss bench on {hardware()}, torch {torch.__version__}, {dtype}, N={shape.tokens} "
          f"D_in={shape.d_in} D_out={shape.d_out} R={shape.rank} K={shape.kernel_size} "
          f"grid={grid[0]}x{grid[1]} image fraction={shape.image_fraction}; medians of {reps}")
    rows = run(shape, device, dtype, reps, args.warmup)
    print(format_table(rows))
    if args.csv:
        context = {
            "date": datetime.date.today().isoformat(), "git": _git_sha(), "hardware": hardware(),
            "torch": torch.__version__, "device": device.type, "dtype": str(dtype).split(".")[-1],
            "tokens": shape.tokens, "d_in": shape.d_in, "d_out": shape.d_out, "rank": shape.rank,
            "kernel_size": shape.kernel_size, "grid": f"{grid[0]}x{grid[1]}",
            "image_fraction": shape.image_fraction, "threads": os.cpu_count(),
        }
        append_csv(args.csv, rows, context)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0
