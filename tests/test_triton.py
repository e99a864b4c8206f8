"""The Triton backend against the float64 reference (interpreted on CPU, compiled on a GPU)."""

import os
import subprocess
import sys

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends
from conftest import Layout, make_params, random_layout, special_layouts, within_tolerance

pytest.importorskip("triton")
if backends.unavailable_reason("triton"):
    pytest.skip(f"triton backend: {backends.unavailable_reason('triton')}", allow_module_level=True)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NAMES = ("x", "weight", "bias", "text_A", "text_B", "image_A", "image_B")
LAYOUTS = [random_layout(seed, p_image=0.6) for seed in range(10)] + special_layouts()


def _run(layout, k, causal, params, dtype, backend, device=DEVICE, scales=(1.5, 0.5)):
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     causal=causal, cu_seqlens=layout.cu_seqlens).to(device)
    leaves = {n: v.detach().to(device, dtype).requires_grad_()
              for n, v in params.items() if v is not None}
    y = mk.moss_linear(leaves["x"], leaves["weight"], leaves.get("bias"), plan,
                       *(leaves[n] for n in NAMES[3:]), *scales, backend=backend)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).view_as(y))
    return {"y": y.detach(), **{n: v.grad for n, v in leaves.items()}}


def _check(layout, k, causal, params, dtype, device=DEVICE):
    want = _run(layout, k, causal, params, torch.float64, "reference", device)
    ref = _run(layout, k, causal, params, dtype, "reference", device)
    got = _run(layout, k, causal, params, dtype, "triton", device)
    for name, value in got.items():
        assert value.dtype == dtype and value.shape == want[name].shape, name
        assert within_tolerance(value, ref[name], want[name], dtype), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,causal", [(1, True), (2, True), (3, True), (3, False), (2, False)])
@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_matches_reference_on_every_layout(index, k, causal, dtype, gen):
    layout = LAYOUTS[index]
    _check(layout, k, causal, make_params(gen, layout.n, 37, 29, 3, 5, k), dtype)


@pytest.mark.parametrize("r_t,r_i", [(1, 1), (4, 0), (0, 6), (17, 33), (256, 256)])
def test_ranks(r_t, r_i, gen):
    layout = random_layout(4, p_image=0.7)
    _check(layout, 3, True, make_params(gen, layout.n, 24, 19, r_t, r_i, 3), torch.float32)


def test_without_bias_and_with_frozen_x(gen):
    layout = random_layout(8, p_image=0.5)
    params = make_params(gen, layout.n, 21, 18, 4, 4, 2, bias=False)
    _check(layout, 2, True, params, torch.float32)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens).to(DEVICE)
    p = {n: v.to(DEVICE, torch.float32) for n, v in params.items() if v is not None}
    a = p["image_A"].requires_grad_()
    mk.moss_linear(p["x"], p["weight"], None, plan, p["text_A"], p["text_B"], a, p["image_B"],
                   backend="triton").sum().backward()
    assert a.grad is not None and p["x"].grad is None


def test_opcheck(gen):
    from moss_kernels.linear import linear_fwd

    layout = random_layout(2, p_image=0.6)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens).to(DEVICE)
    p = {n: v.to(DEVICE, torch.float32) for n, v in
         make_params(gen, layout.n, 20, 18, 3, 4, 2).items()}
    for n in NAMES[3:]:
        p[n].requires_grad_()
    torch.library.opcheck(linear_fwd, (*(p[n] for n in NAMES), plan.route, plan.nbr, plan.nbr_t,
                                       0.5, 2.0, "triton"))


def test_deterministic(gen):
    layout = random_layout(6, p_image=0.8)
    params = make_params(gen, layout.n, 30, 26, 5, 7, 3)
    first = _run(layout, 3, True, params, torch.float32, "triton")
    second = _run(layout, 3, True, params, torch.float32, "triton")
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_compiles_for_sm90_without_a_gpu():
    """Every kernel specialisation the backend launches compiles for Hopper (CI has no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "moss_kernels.triton.compile_check"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "specialisations for sm_90" in done.stdout


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (bf16 and large shapes)")
@pytest.mark.parametrize("r,k", [(16, 2), (256, 3), (64, 1)])
def test_gpu_bf16_large(r, k):
    gen = torch.Generator().manual_seed(0)
    grid = (32, 32)
    route, images = [], []
    while len(route) < 4096:  # text runs and 32 x 32 images, the last one partial
        route += [0] * 300
        images.append((len(route), *grid))
        route += [1] * min(1024, 4096 + 700 - len(route))
    layout = Layout((len(route),), route, [(s, h, w, min(h * w, len(route) - s))
                                           for s, h, w in images])
    _check(layout, k, True, make_params(gen, layout.n, 1000, 1500, r, r, k), torch.bfloat16,
           device="cuda")
