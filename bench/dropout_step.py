"""A training step with LoRA dropout against one without, on the CPU (issue #15, item 2).

    PYTHONPATH=. python bench/dropout_step.py [--tokens 2048] [--dim 512] [--layers 4]
                                              [--rounds 15] [--threads N]

(From the repository root: a script's own folder, not the working directory, is on sys.path,
so without PYTHONPATH an installed moss would be timed; the last line says which was.)

A stack of ``MossLinear`` layers (frozen ``nn.Linear(dim, dim)``, GELU between, text and 16 x 16
images half and half, r 16, K 2) runs forward + backward with ``dropout`` 0.05 and 0, interleaved
(A B A B ...) so that a drifting machine hits both alike; it prints each median with p20 / p80
and their ratio. Also timed, for what drawing the masks costs: ``dropout_mask`` (the layer's) on
the same ``[N, dim]`` activations, once per layer. With ``--threads 1``
the clock is the process's CPU time, which other processes on a shared machine barely move
(wall time there drifts by 2x between rounds); with more threads it is wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moss_kernels as mk
from moss.config import MossConfig
from moss.layer import MossLinear
from moss.router import Router
from moss_kernels.dropout import dropout_mask


def stack(dim: int, layers: int, backend: str) -> tuple[nn.ModuleList, Router]:
    torch.manual_seed(0)
    router = Router()
    cfg = MossConfig(backend=backend)
    mods = nn.ModuleList()
    for _ in range(layers):
        base = nn.Linear(dim, dim).requires_grad_(False)
        layer = MossLinear(base, cfg, router)
        nn.init.normal_(layer.text_B, std=0.02)  # B starts at zero: make the adapters do work
        nn.init.normal_(layer.image_B, std=0.02)
        mods.append(layer)
    return mods.train(), router


def layout(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text runs of 256 tokens, then one 16 x 16 image, repeated: half the tokens image."""
    route, images = [], []
    while len(route) < n:
        route += [0] * 256
        images.append((len(route), 16, 16))
        route += [1] * 256
    return torch.tensor(route[:n]), torch.tensor([im for im in images if im[0] < n])


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ts, n=10)
    return statistics.median(ts), q[1], q[7]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # One thread does all the work on the calling thread (autograd runs CPU backwards there).
    clock = time.process_time if args.threads == 1 else time.perf_counter

    mods, router = stack(args.dim, args.layers, args.backend)
    route, images = layout(args.tokens)
    plan = mk.RoutingPlan.from_spans(route, images, kernel_size=2)
    x0 = torch.randn(args.tokens, args.dim)

    def step(p: float) -> float:
        for m in mods:
            m.dropout = p
            m.zero_grad(set_to_none=True)
        start = clock()
        router.begin_plan(lambda window, with_images: plan)
        try:
            h = x0
            for m in mods:
                h = F.gelu(m(h))
            h.square().mean().backward()
        finally:
            router.end()
        return clock() - start

    def masks_alone() -> float:
        start = clock()
        for _ in mods:
            dropout_mask(x0, args.p)
        return clock() - start

    for _ in range(3):  # warm-up: allocator, thread pool, first-touch pages
        step(args.p), step(0.0), masks_alone()
    times = {"dropout": [], "none": [], "masks": []}
    for _ in range(args.rounds):
        times["dropout"].append(step(args.p))
        times["none"].append(step(0.0))
        times["masks"].append(masks_alone())
    meds = {}
    for name, ts in times.items():
        med, p20, p80 = quantiles(ts)
        meds[name] = med
        print(f"{name:>10}: median {med * 1e3:8.2f} ms (p20 {p20 * 1e3:.2f}, p80 {p80 * 1e3:.2f})")
    print(f"step with dropout {args.p} / without: {meds['dropout'] / meds['none']:.3f}x; "
          f"drawing {args.layers} masks: {meds['masks'] / meds['none']:.3f} "
          f"of a step without (N {args.tokens}, D {args.dim}, {args.threads} threads, "
          f"{'CPU' if clock is time.process_time else 'wall'} time, backend {args.backend}, "
          f"moss from {Path(mk.__file__).parents[1]})")


if __name__ == "__main__":
    main()
