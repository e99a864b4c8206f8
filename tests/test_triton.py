"""Triton launch settings that only a GPU would feel, checked where a CPU can: autotuning keyed
on bucketed sizes, the switch that turns it off, outputs poisoned with NaN in tests, and which
GEMMs a layer with an x_adapter launches. (The kernels' correctness: tests/test_backends.py, in
the interpreter; their compilation for sm_90: tests/test_triton_compile.py.)"""

import os
import subprocess
import sys

import pytest
import torch

import moss_kernels as mk

from helpers import ADAPTERS, make_params, special_layouts

pytest.importorskip("triton")
gemm = pytest.importorskip("moss_kernels.triton.gemm")


def test_autotuning_is_keyed_on_bucketed_sizes_not_token_counts():
    """Every new batch length would otherwise re-benchmark every config with a device sync
    (and break CUDA-graph capture of a step)."""
    keys = set(gemm._gemm.keys)
    assert not keys & {"M", "N", "K", "K2"}, keys
    assert {"M_BUCKET", "N_BUCKET", "K_BUCKET", "K2_BUCKET"} <= keys
    assert gemm.bucket(1000) == gemm.bucket(1001) == gemm.bucket(1024) == 1024
    assert gemm.bucket(1025) == 2048 and gemm.bucket(0) == gemm.bucket(1) == 1


@pytest.mark.parametrize("setting,configs", [(None, len(gemm.SHAPES)), ("0", 1), ("1", 8)])
def test_autotuning_can_be_switched_off(setting, configs):
    """MOSS_TRITON_AUTOTUNE=0: one config and no benchmarking (read at import, on a GPU; the
    interpreter always runs one config)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MOSS_TRITON_AUTOTUNE")}
    if setting is not None:
        env["MOSS_TRITON_AUTOTUNE"] = setting
    done = subprocess.run([sys.executable, "-c", "from moss_kernels.triton import gemm; "
                           "print(len(gemm._gemm.configs))"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == configs


def test_the_tests_run_with_poisoned_outputs():
    """conftest.py sets MOSS_KERNELS_POISON=1: what the route-skipping GEMM leaves unwritten
    (text columns of image-only tiles, tap columns of text-only ones) is NaN, not the zeros of
    fresh CPU memory, so every backend test would see a kernel that reads it."""
    assert gemm.POISON
    block = gemm.configs()[0].kwargs["BLOCK_M"]  # tiles of `block` rows and columns here
    x, a = torch.randn(2 * block, 8), torch.randn(8, 2 * block)
    route = torch.tensor([1] * block + [0] * block, dtype=torch.int8)  # image tile, text tile
    p = gemm.launch_gemm(x, a, route=route, r_t=block)  # text columns first, then the taps
    want = x @ a
    assert p[:block, :block].isnan().all() and p[block:, block:].isnan().all()  # skipped
    torch.testing.assert_close(p[:block, block:], want[:block, block:])
    torch.testing.assert_close(p[block:, :block], want[block:, :block])


def test_configs_too_large_for_shared_memory_are_pruned_for_their_dtypes():
    """fp32 operands in 128 x 256 x 64 tiles with 3 stages need 294,912 bytes of sm_90's 232,448
    (compile_check confirms the figures); bf16 ones fit; with nothing fitting, the smallest."""
    def args(*dtypes):
        return {name: torch.empty(0, dtype=d)
                for name, d in zip(("a_ptr", "b_ptr", "a2_ptr", "b2_ptr"), dtypes)}

    every = gemm.tile_configs(gemm.SHAPES)
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)  # noqa: E731
    fp32 = [shape(c) for c in gemm.fitting(every, args(*[torch.float32] * 4))]
    assert (128, 256, 3) not in fp32 and (128, 128, 4) not in fp32 and (64, 64, 4) in fp32
    assert gemm.shared_bytes(every[0].kwargs, 3, (torch.float32,) * 4) == 294_912
    assert len(gemm.fitting(every, args(*[torch.bfloat16] * 4))) == len(every)
    launch = gemm.tile_configs([gemm.DEFAULT_SHAPE])
    assert gemm.fitting(launch, args(*[torch.float32] * 4)) == launch  # fits every dtype
    huge = [c for c in every if c.kwargs["BLOCK_N"] == 256]
    assert gemm.fitting(huge, args(*[torch.float64] * 4)) == huge[:1]  # none fits: smallest


def test_launches_run_with_the_tensors_gpu_current(monkeypatch):
    """Triton launches on the current device; tensors on cuda:1 with cuda:0 current would run
    on the wrong GPU. Checked with a stand-in for the device switch (no GPU here)."""
    import contextlib
    from types import SimpleNamespace

    from moss_kernels import triton as backend

    switched = []
    monkeypatch.setattr(torch.cuda, "device",
                        lambda d: contextlib.nullcontext(switched.append(d)))
    guarded = backend._on_device(lambda a, *rest: ("ran", rest))
    on_gpu1 = SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda", 1)))
    assert guarded(on_gpu1, 7) == ("ran", (7,)) and switched == [torch.device("cuda", 1)]
    assert guarded(SimpleNamespace(weight=torch.zeros(1)), 7) == ("ran", (7,)) and len(
        switched) == 1
    assert backend.forward.__wrapped__ and backend.backward.__wrapped__


def test_the_adapter_input_is_read_by_the_tap_products_only(monkeypatch, gen):
    """With an x_adapter the tap-product GEMM reads it and the base GEMM (the expand fused in)
    reads x: one launch each, as without it; the backward launches dx_adapter = dP A_all, a
    reduction over the C tap columns, and no second GEMM over D (dx = dy W is cuBLAS's)."""
    from moss_kernels import triton as backend

    launches = []
    launch = backend.launch_gemm
    monkeypatch.setattr(backend, "launch_gemm",
                        lambda a, b, **kw: launches.append((a, b, kw)) or launch(a, b, **kw))
    layout = special_layouts()[3]
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=2)
    p = make_params(gen, layout.n, 9, 6, 3, 4, 2, dtype=torch.float32, x_adapter=True)
    x, x_adapter = p["x"].requires_grad_(), p["x_adapter"].requires_grad_()
    y = mk.moss_linear(x, p["weight"], p["bias"], plan, *(p[n] for n in ADAPTERS),
                       backend="triton", x_adapter=x_adapter)
    taps, base = launches
    assert taps[0].data_ptr() == x_adapter.data_ptr() and "route" in taps[2]
    assert base[0].data_ptr() == x.data_ptr() and base[2]["a2"] is not None
    y.backward(torch.ones_like(y))
    (dp, a_all, kw), = launches[2:]
    assert dp.shape == (layout.n, 3 + 4 * 4) and a_all.shape == (3 + 4 * 4, 9)
    assert kw.get("a2") is None and "poison" in kw
