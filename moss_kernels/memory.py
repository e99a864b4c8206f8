"""What an op holds: the peak bytes of the CPU allocator during a call.

Used by ``moss bench`` (its ``peak_mb`` column on CPUs) and by tests/test_memory.py, so that a
kernel test and the benchmark measure memory the same way.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto writes "USDT: ... profiler_start/stop" lines straight to file descriptor 2 on
    every profile, through the progress bar; point it at /dev/null meanwhile."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by the CPU allocator during ``fn()`` above its level at the start.

    The profiler reports every allocation and free of the CPU allocator (any thread, C++
    extensions included); their running sum in time order is what is held. Python's cycle
    collector is run before and paused during the call, so garbage caught in a reference cycle
    counts until the call ends instead of until a collection happens to free it: the figure is
    deterministic and never below the truth. Memory that bypasses the allocator (BLAS scratch,
    numpy) is not counted.
    """
    gc.collect()
    gc.disable()
    try:
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak
