"""The reference backend against the independent per-image F.conv2d formulation."""

import pytest
import torch
import torch.nn.functional as F

import moss_kernels as mk

from helpers import (
    ADAPTERS,
    PARAMS,
    TOLERANCE,
    conv2d_formulation,
    make_params,
    random_layout,
    rel_err,
    special_layouts,
)

LAYOUTS = ([random_layout(seed) for seed in range(24)] + special_layouts()
           + [random_layout(seed, p_image=0.7, separators=True) for seed in range(12)])


def _both(layout, k, causal, p, scales=(1.5, 0.75)):
    """Forward and every gradient, from moss_linear and from the F.conv2d formulation."""
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     causal=causal, cu_seqlens=layout.cu_seqlens)
    results = []
    for fn in ("moss", "conv2d"):
        leaves = {n: v.clone().requires_grad_() for n, v in p.items() if v is not None}
        args = [leaves.get(n) for n in PARAMS]
        if fn == "moss":
            x = args[0].reshape(*layout.shape, -1)  # leading dims follow the layout
            y = mk.moss_linear(x, args[1], args[2], plan, *args[3:], *scales, backend="reference")
            y = y.reshape(layout.n, -1)
        else:
            y = conv2d_formulation(*args[:3], layout, *args[3:], *scales, causal)
        dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        y.backward(dy)
        # A layout without images (or text) leaves that adapter out of the F.conv2d graph.
        grads = {n: torch.zeros_like(v) if v.grad is None else v.grad for n, v in leaves.items()}
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("k,causal", [(1, True), (2, True), (3, True), (3, False), (2, False)])
@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_reference_matches_conv2d_formulation(index, k, causal, gen):
    layout = LAYOUTS[index]
    p = make_params(gen, layout.n, 11, 7, 3, 5, k)
    (y, grads), (y_want, grads_want) = _both(layout, k, causal, p)
    assert rel_err(y, y_want) < TOLERANCE[torch.float64]
    for name, g in grads_want.items():
        assert rel_err(grads[name], g) < TOLERANCE[torch.float64], name


@pytest.mark.parametrize("k,causal", [(1, True), (2, True), (3, False)])
def test_gradcheck_float64(k, causal, gen):
    layout = special_layouts()[3]
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     causal=causal)
    p = make_params(gen, layout.n, 5, 4, 2, 3, k)
    inputs = tuple(p[n].requires_grad_() for n in PARAMS)
    assert torch.autograd.gradcheck(
        lambda *a: mk.moss_linear(a[0], a[1], a[2], plan, *a[3:], 0.5, 2.0, backend="reference"),
        inputs,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_against_float64(dtype, gen):
    layout = random_layout(7, p_image=0.7, max_hw=7)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens)
    p = make_params(gen, layout.n, 64, 48, 8, 8, 2)
    outs = {}
    for dt in (torch.float64, dtype):
        leaves = {n: v.detach().to(dt).requires_grad_() for n, v in p.items()}
        y = mk.moss_linear(*(leaves[n] for n in PARAMS[:3]), plan,
                           *(leaves[n] for n in ADAPTERS), 2.0, 2.0, backend="reference")
        assert y.dtype == dt
        y.backward(torch.ones_like(y))
        outs[dt] = (y, {n: v.grad for n, v in leaves.items()})
        assert all(g.dtype == dt for g in outs[dt][1].values())
    (y64, g64), (y, g) = outs[torch.float64], outs[dtype]
    assert rel_err(y, y64) < TOLERANCE[dtype]
    for name in PARAMS:
        assert rel_err(g[name], g64[name]) < TOLERANCE[dtype], name


def test_padding_rows_are_the_base_layer_exactly(gen):
    layout = special_layouts()[5]
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans())
    p = make_params(gen, layout.n, 6, 5, 2, 2, 2, dtype=torch.float32)
    y = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, p["text_A"], p["text_B"],
                       p["image_A"], p["image_B"], 3.0, 3.0)
    base = F.linear(p["x"], p["weight"], p["bias"])
    pad = plan.route == -1
    assert torch.equal(y[pad], base[pad]) and not torch.allclose(y[~pad], base[~pad])


def test_absent_adapters_are_rank_zero(gen):
    layout = random_layout(3, p_image=0.6)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens)
    p = make_params(gen, layout.n, 6, 5, 2, 2, 2)
    base = F.linear(p["x"], p["weight"], p["bias"])
    only_text = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, p["text_A"], p["text_B"])
    zero_image = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, p["text_A"], p["text_B"],
                                p["image_A"], torch.zeros_like(p["image_B"]))
    assert torch.allclose(only_text, zero_image, rtol=0, atol=1e-14)
    none = mk.moss_linear(p["x"], p["weight"], p["bias"], plan)
    assert torch.allclose(none, base, rtol=0, atol=1e-14)
    a = p["image_A"].clone().requires_grad_()
    mk.moss_linear(p["x"], p["weight"], None, plan, None, None, a, p["image_B"]).sum().backward()
    assert a.grad.shape == a.shape


def test_zero_B_gives_the_base_layer(gen):
    """B starts at zero in training: the wrapped layer must then equal the frozen one."""
    layout = random_layout(5)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(),
                                     cu_seqlens=layout.cu_seqlens)
    p = make_params(gen, layout.n, 6, 5, 2, 2, 2, dtype=torch.float32)
    y = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, p["text_A"],
                       torch.zeros_like(p["text_B"]), p["image_A"], torch.zeros_like(p["image_B"]))
    assert torch.allclose(y, F.linear(p["x"], p["weight"], p["bias"]), rtol=0, atol=1e-6)
