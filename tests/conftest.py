"""Fixtures and session set-up; what tests share otherwise is in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton backend runs in Triton's interpreter, which must be switched on
# before any kernel is defined (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, not as memory that happens to be zero (fresh on a CPU, stale on
# a GPU), so an element a kernel fails to write fails the test; one config, no autotuning.
os.environ.setdefault("MOSS_KERNELS_POISON", "1")
os.environ.setdefault("MOSS_TRITON_AUTOTUNE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built from configs, never fetched

try:  # hypothesis profiles: ``ci`` (default, bounded), ``long`` (HYPOTHESIS_PROFILE=long)
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
    settings.register_profile("long", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
