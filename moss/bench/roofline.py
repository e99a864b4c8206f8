"""The machine's two ceilings, measured in the run, and each measured time's roofline.

A row's roofline time is the longer of its FLOPs at the measured matrix rate and its
compulsory bytes at the measured copy bandwidth (moss/bench/cases.py counts both;
docs/design.md section 11 lists them per kernel). Measured, not taken from a datasheet: a large
GEMM in the run's dtype (random data: zeros run faster than real data), and a device-to-device
copy counting the bytes read and written. Seen on the H200 of this workplace: about 790 TFLOP/s
(bf16) and 4.3 TB/s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    flops: float  # FLOP/s of a large matrix product in the run's dtype
    bytes: float  # bytes/s of a large copy (read + write)

    def seconds(self, flops: int, nbytes: int) -> float:
        return max(flops / self.flops, nbytes / self.bytes)

    def describe(self) -> str:
        return f"{self.flops / 1e12:.1f} TFLOP/s matmul, {self.bytes / 1e9:.0f} GB/s copy"


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up: handles, kernels chosen, pages touched
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The ceilings on ``device``: an n^3 GEMM (n = 8192 on a GPU, 1024 on a CPU) and a copy of
    1 GiB (256 MiB on a CPU), medians of a few runs after a warm-up."""
    gpu = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    reps = 10 if gpu else 3

    def matmul_rate(n: int) -> float:
        a = torch.randn(n, n, generator=gen, device=device).to(dtype)
        b = torch.randn(n, n, generator=gen, device=device).to(dtype)
        return 2 * n**3 / _median_seconds(lambda: a @ b, device, reps)

    def copy_rate(numel: int) -> float:
        src = torch.randn(numel, generator=gen, device=device)
        dst = torch.empty_like(src)
        return 2 * src.numel() * src.element_size() / _median_seconds(lambda: dst.copy_(src),
                                                                      device, reps)

    return Ceilings(matmul_rate(8192 if gpu else 1024),
                    copy_rate((2**30 if gpu else 2**28) // 4))
