"""Every fused backend against the float64 reference, on the device this machine has.

Without a GPU that is the ``cpu`` backend (C++), ``cuda-emulated`` (the CUDA backend's source on
CPU tensors) and ``triton`` in Triton's interpreter; with one, ``triton`` and ``cuda`` compiled.
Each is checked in the dtypes its record says it supports here; float64 gets gradcheck. Each is
also checked with the adapters reading an input of their own (``x_adapter``): ``dx`` then is the
base layer's gradient and ``dx_adapter`` the adapters'; and through LoRA dropout's mask
(``adapter_dropout``), which the ``cpu`` backend applies inside its kernels.
"""

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends, reference

from helpers import (
    ADAPTERS,
    BACKENDS,
    DEVICE,
    FUSED,
    GPU,
    NATIVE,
    PARAMS,
    TOLERANCE,
    Layout,
    check_backend,
    make_params,
    random_layout,
    rel_err,
    run_layer,
    seeded_mask,
    special_layouts,
    within_tolerance,
)

LAYOUTS = ([random_layout(seed, p_image=0.6) for seed in range(10)] + special_layouts()
           + [random_layout(seed, p_image=0.8, separators=True) for seed in (1, 2, 5)])
HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)
CASES = [(b, d) for b in FUSED for d in HALF_AND_SINGLE if backends.backend(b).supports(d)]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("k,causal", [(1, True), (2, True), (3, True), (3, False), (2, False)])
@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_matches_reference_on_every_layout(index, k, causal, backend, dtype, gen):
    layout = LAYOUTS[index]
    check_backend(layout, k, causal, make_params(gen, layout.n, 37, 29, 3, 5, k), dtype, backend)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("k,causal", [(1, True), (2, True), (3, False)])
@pytest.mark.parametrize("index", [3, 7, 10, 13, 16])
@pytest.mark.parametrize("frozen", [(), ("weight", "bias"), ("weight", "bias", "x_adapter")])
def test_separate_adapter_input_matches_reference(index, k, causal, frozen, backend, dtype, gen):
    """A distinct x_adapter: y, dx (= dy W), dx_adapter, dW, db and the adapters' gradients;
    with the layer frozen (LoRA dropout: no dW, so the backward never reads x); and with an
    adapter input that needs no gradient either."""
    layout = LAYOUTS[index]
    params = make_params(gen, layout.n, 37, 29, 3, 5, k, x_adapter=True)
    check_backend(layout, k, causal, params, dtype, backend, frozen=frozen)


@pytest.mark.parametrize("backend,dtype", CASES + [("cpu", torch.float64)] * ("cpu" in FUSED))
@pytest.mark.parametrize("k,causal", [(1, True), (2, True), (3, False)])
@pytest.mark.parametrize("index", [0, 3, 7, 10, 13, 16])
@pytest.mark.parametrize("frozen", [(), ("weight", "bias")])
def test_dropout_matches_reference(index, k, causal, frozen, backend, dtype, gen):
    """adapter_dropout: y, dx (dy W + the masked adapters' input gradient), dW, db and the
    adapters' gradients, the mask the same for every backend and dtype (helpers.seeded_mask)."""
    layout = LAYOUTS[index]
    params = make_params(gen, layout.n, 37, 29, 3, 5, k)
    check_backend(layout, k, causal, params, dtype, backend, frozen=frozen, dropout=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_the_masked_input_as_x_adapter(backend, gen):
    """The mask's meaning, on every backend: y as with x_adapter = x * mask / (1 - p), and dx
    = that layer's dx + mask * dx_adapter / (1 - p)."""
    layout = random_layout(5, p_image=0.6)
    params = make_params(gen, layout.n, 40, 18, 4, 4, 2)
    p = 0.4
    dtype = torch.float64 if backends.backend(backend).supports(torch.float64) else torch.float32
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    mask = mk.dropout.unpack(seeded_mask(params["x"].to(DEVICE), p), 40).cpu()
    dropped = run_layer(layout, 2, True, params, dtype, backend, dropout=p)
    split = run_layer(layout, 2, True, params | {"x_adapter": params["x"] * mask / (1 - p)},
                      dtype, backend)
    assert 0.2 < 1 - mask.double().mean() < 0.6  # about p of the elements dropped
    for name in ("y", "weight", "bias", *ADAPTERS):
        torch.testing.assert_close(dropped[name], split[name], **tol)
    torch.testing.assert_close(dropped["x"], split["x"] + mask.to(DEVICE, dtype)
                               * split["x_adapter"] / (1 - p), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_input_equal_to_x_is_the_plain_layer(backend, gen):
    """x_adapter = x gives y as without it, and dx + dx_adapter is the plain layer's dx."""
    layout = random_layout(2, p_image=0.6)
    params = make_params(gen, layout.n, 21, 18, 4, 4, 2)
    plain = run_layer(layout, 2, True, params, torch.float32, backend)
    split = run_layer(layout, 2, True, params | {"x_adapter": params["x"]}, torch.float32,
                      backend)
    for name in ("y", "weight", "bias", *ADAPTERS):
        torch.testing.assert_close(split[name], plain[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split["x"] + split["x_adapter"], plain["x"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("r_t,r_i", [(1, 1), (4, 0), (0, 6), (17, 33), (256, 256)])
def test_ranks(r_t, r_i, backend, gen):
    layout = random_layout(4, p_image=0.7)
    params = make_params(gen, layout.n, 24, 19, r_t, r_i, 3)
    check_backend(layout, 3, True, params, torch.float32, backend)


@pytest.mark.parametrize("backend", FUSED)
def test_long_layout_crosses_row_blocks(backend, gen):
    """Images and text runs straddling the compiled CPU backend's 256-row blocks."""
    route, images = [], []
    while len(route) < 700:
        route += [0] * 37 + [-1] * 3
        images.append((len(route), 13, 11, 143))
        route += [1] * 143
    layout = Layout((len(route),), route, images)
    params = make_params(gen, layout.n, 16, 12, 3, 4, 2)
    check_backend(layout, 2, True, params, torch.float32, backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS
                                     if backends.backend(b).supports(torch.float64)])
@pytest.mark.parametrize("adapter_input", ["x", "x_adapter", "dropout"])
def test_gradcheck_float64(backend, adapter_input, gen):
    layout = special_layouts()[3]
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     kernel_size=2).to(DEVICE)
    separate = adapter_input == "x_adapter"
    p = make_params(gen, layout.n, 5, 4, 2, 3, 2, x_adapter=separate)
    names = PARAMS + (("x_adapter",) if separate else ())
    inputs = tuple(p[n].to(DEVICE).requires_grad_() for n in names)

    def layer(x, weight, bias, *rest):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout mask in every evaluation
            return mk.moss_linear(x, weight, bias, plan, *rest[:4], 0.5, 2.0, backend=backend,
                                  x_adapter=rest[4] if separate else None,
                                  adapter_dropout=0.5 if adapter_input == "dropout" else 0.0)

    assert torch.autograd.gradcheck(layer, inputs)


@pytest.mark.parametrize("backend", FUSED)
def test_without_bias_and_with_frozen_x(backend, gen):
    layout = random_layout(8, p_image=0.5)
    params = make_params(gen, layout.n, 21, 18, 4, 4, 2, bias=False)
    check_backend(layout, 2, True, params, torch.float32, backend)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens).to(DEVICE)
    p = {n: v.to(DEVICE, torch.float32) for n, v in params.items() if v is not None}
    a = p["image_A"].requires_grad_()
    mk.moss_linear(p["x"], p["weight"], None, plan, p["text_A"], p["text_B"], a, p["image_B"],
                   backend=backend).sum().backward()
    assert a.grad is not None and p["x"].grad is None


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS for d in HALF_AND_SINGLE
                                           if backends.backend(b).supports(d)])
def test_deterministic(backend, dtype, gen):
    """Two runs give bitwise-equal outputs and gradients (no atomics, no racy reductions)."""
    layout = random_layout(6, p_image=0.8)
    params = make_params(gen, layout.n, 30, 26, 5, 7, 3)
    first = run_layer(layout, 3, True, params, dtype, backend)
    second = run_layer(layout, 3, True, params, dtype, backend)
    assert all(torch.equal(first[n], second[n]) for n in first)


# ------------------------------------------------------------------------- fp16's range
#: Each case pushes a rank-space intermediate past fp16's largest value (65504) while every
#: output and gradient fits: ``taps`` the tap products and their routed sums z (large x A,
#: small B; a small dy keeps dB in range), ``grads`` the gradient dz = dy Bcat and its gather
#: dP (large dy B; small A and x keep dA in range). Factors multiply make_params' O(1) values.
RANGE_CASES = {"taps": dict(x=1.0, A=3e4, B=2e-3, dy=1e-2),
               "grads": dict(x=1e-2, A=1e-1, B=3e3, dy=20.0)}
FP16_MAX = torch.finfo(torch.float16).max


@pytest.mark.parametrize("backend,dtype", [
    (b, d) for b in BACKENDS for d in (torch.float16, torch.bfloat16)
    if backends.backend(b).supports(d)])
@pytest.mark.parametrize("case", sorted(RANGE_CASES))
@pytest.mark.parametrize("separate", [False, True])
def test_half_inputs_with_intermediates_past_fp16_range(case, separate, backend, dtype, gen):
    """Sums that fit in fp32 never overflow: outputs and gradients match float64 (the
    reference within its dtype's tolerance, a fused backend within twice its error); also
    with an x_adapter, whose gradient dP A_all is then computed on its own."""
    layout, f = LAYOUTS[3], RANGE_CASES[case]
    params = make_params(gen, layout.n, 37, 29, 3, 5, 2, x_adapter=separate)
    for names, factor in ((("x", "x_adapter"), f["x"]), (("text_A", "image_A"), f["A"]),
                          (("text_B", "image_B"), f["B"])):
        for name in names:
            if name in params:
                params[name] = params[name] * factor
    # dy of one sign: db = sum dy must not cancel, or its error would measure the rounding of
    # dy to the dtype, not the range.
    grad = (0.25 * f["dy"], f["dy"])
    want = run_layer(layout, 2, True, params, torch.float64, "reference", grad=grad)
    # The premise, in float64: the intermediate passes fp16's range and every output fits.
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens)
    _, z = reference.forward(backends.LinearInputs(
        *(params[n] for n in PARAMS[:3]), params.get("x_adapter"),
        *(params[n] for n in ADAPTERS), plan.route, plan.nbr, plan.nbr_t, 1.5, 0.5))
    dy = torch.linspace(*grad, want["y"].numel(), dtype=torch.float64).view_as(want["y"])
    dz = dy @ torch.cat([params["text_B"] * 1.5, params["image_B"] * 0.5], dim=1)
    assert (z if case == "taps" else dz).abs().max() > 2 * FP16_MAX
    assert all(v.abs().max() < FP16_MAX / 2 for v in want.values())

    ref = run_layer(layout, 2, True, params, dtype, "reference", grad=grad)
    for name, value in ref.items():
        assert rel_err(value, want[name]) <= TOLERANCE[dtype], name  # inf or NaN fails
    if backend != "reference":
        got = run_layer(layout, 2, True, params, dtype, backend, grad=grad)
        for name, value in got.items():
            assert value.dtype == dtype, name
            assert within_tolerance(value, ref[name], want[name], dtype), name


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,k", [(16, 2), (20, 3), (64, 1)] + ([(256, 3)] if GPU else []))
def test_long_runs_wide_rows(r, k, dtype, backend):
    """Text runs and 32 x 32 images (the last partial), so that every kernel tile and column
    chunk is full somewhere and ragged somewhere: runs longer than any row tile, and widths
    (D and K*K*R) past several 64-byte vectors with a tail. Large shapes on a GPU."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out = (4096, 1000, 1500) if GPU else (2400, 150, 133)
    route, images = [], []
    while len(route) < n:
        route += [0] * 300
        images.append((len(route), 32, 32))
        route += [1] * min(1024, n + 700 - len(route))
    layout = Layout((len(route),), route, [(s, h, w, min(h * w, len(route) - s))
                                           for s, h, w in images])
    check_backend(layout, k, True, make_params(gen, layout.n, d_in, d_out, r, r, k), dtype, backend)
