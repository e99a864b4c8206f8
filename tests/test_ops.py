"""The shared custom ops: opcheck, torch.compile, backend dispatch (bad arguments:
tests/test_bad_inputs_*.py). On the device the tests run on (helpers.DEVICE), so on a GPU the
``cuda`` and ``triton`` backends are checked on CUDA tensors."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.linear import linear_bwd, linear_fwd

from helpers import ADAPTERS, BACKENDS, DEVICE, PARAMS, make_params, random_layout, special_layouts


def _setup(gen, dtype=torch.float32, seed=11, k=2, bias=True):
    """A layout's plan and parameters, with a distinct adapter input ``x_adapter``."""
    layout = random_layout(seed, p_image=0.6)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     cu_seqlens=layout.cu_seqlens).to(DEVICE)
    p = make_params(gen, layout.n, 9, 6, 3, 4, k, dtype=dtype, bias=bias, x_adapter=True)
    return layout, plan, {n: None if v is None else v.to(DEVICE) for n, v in p.items()}


def _transposed(t):
    """The same values in a column-major layout (a non-contiguous view)."""
    return t.t().contiguous().t()


def _fwd_args(p, plan, backend, x=None, separate=False):
    return (p["x"] if x is None else x, p["weight"], p["bias"],
            p["x_adapter"] if separate else None, p["text_A"], p["text_B"], p["image_A"],
            p["image_B"], plan.route, plan.nbr, plan.nbr_t, 0.5, 2.0, backend)


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS for d in (
    torch.float32, torch.float64) if backends.backend(b).supports(d)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("separate", [False, True])
def test_opcheck_forward(gen, dtype, bias, separate, backend):
    _, plan, p = _setup(gen, dtype, bias=bias)
    for name in ("text_A", "text_B", "image_A", "image_B"):
        p[name].requires_grad_()
    torch.library.opcheck(linear_fwd, _fwd_args(p, plan, backend, separate=separate))
    # A non-contiguous x (a transposed copy) must give the same answer; so must x_adapter.
    if separate:
        p["x_adapter"] = _transposed(p["x_adapter"])
    torch.library.opcheck(linear_fwd, _fwd_args(p, plan, backend, x=_transposed(p["x"]),
                                                separate=separate))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_backward(gen, backend, layout):
    """Also with x, x_adapter and the weight column-major: the fake implementations must give
    the gradients the strides the kernels give them (dense row-major), or Inductor
    miscompiles. With an x_adapter, also without x (what a frozen layer's backward gets)."""
    _, plan, p = _setup(gen)
    if layout == "transposed":
        p["x"], p["weight"] = _transposed(p["x"]), _transposed(p["weight"])
        p["x_adapter"] = _transposed(p["x_adapter"])
    dy = torch.randn(p["x"].shape[0], p["weight"].shape[0], generator=gen).to(DEVICE)
    for separate, needs in [(False, [(True, True, True, False), (False, False, False, False),
                                     (True, False, True, False)]),
                            (True, [(True, True, True, True), (False, False, False, True),
                                    (True, False, False, False)])]:
        _, z = linear_fwd(*_fwd_args(p, plan, backend, separate=separate))
        for need in needs:
            # x only where the backward reads it: dW, or the adapters' gradients without x_adapter
            x = p["x"] if need[1] or not separate else None
            args = (dy, x, p["weight"], p["x_adapter"] if separate else None,
                    p["text_A"], p["text_B"], p["image_A"], p["image_B"], z, plan.route,
                    plan.nbr_t, 0.5, 2.0, *need, backend)
            torch.library.opcheck(linear_bwd, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_with_a_dropout_mask(gen, backend, layout):
    """The ops with LoRA dropout's packed mask, forward and backward (the ``cpu`` backend reads
    it in its kernels, the others get the masked input materialised)."""
    _, plan, p = _setup(gen)
    if layout == "transposed":
        p["x"], p["weight"] = _transposed(p["x"]), _transposed(p["weight"])
    mask = mk.dropout.dropout_mask(p["x"], 0.3)
    args = _fwd_args(p, plan, backend) + (mask, 1 / 0.7)
    torch.library.opcheck(linear_fwd, args)
    _, z = linear_fwd(*args)
    dy = torch.randn(p["x"].shape[0], p["weight"].shape[0], generator=gen).to(DEVICE)
    for need in [(True, True, True, False), (True, False, False, False),
                 (False, False, False, False)]:
        torch.library.opcheck(linear_bwd, (
            dy, p["x"], p["weight"], None, p["text_A"], p["text_B"], p["image_A"], p["image_B"],
            z, plan.route, plan.nbr_t, 0.5, 2.0, *need, backend, mask, 1 / 0.7))
    with pytest.raises(ValueError, match="dropout_mask: the adapters read x through it"):
        linear_fwd(*_fwd_args(p, plan, backend, separate=True), mask, 1 / 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_refuses_missing_inputs(gen, backend):
    """The backward op needs x for dW, and for the adapters' gradients without an x_adapter;
    a dx_adapter needs an x_adapter."""
    _, plan, p = _setup(gen)
    _, z = linear_fwd(*_fwd_args(p, plan, backend))
    dy = torch.randn(p["x"].shape[0], p["weight"].shape[0], generator=gen).to(DEVICE)
    rest = (p["weight"], None, p["text_A"], p["text_B"], p["image_A"], p["image_B"], z,
            plan.route, plan.nbr_t, 0.5, 2.0)
    with pytest.raises(ValueError, match="x: the backward reads it for dW"):
        linear_bwd(dy, None, *rest, True, False, False, False, backend)
    with pytest.raises(ValueError, match="need_dx_adapter: True, but x_adapter is None"):
        linear_bwd(dy, p["x"], *rest, True, False, False, True, backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda", "cuda-emulated")])
def test_extension_ops_check_the_adapter_input(gen, backend):
    """The compiled ops' own checks (csrc/linear.cpp), which guard direct calls of them."""
    _, plan, p = _setup(gen)
    record = backends.backend(backend)
    inputs = backends.LinearInputs(
        p["x"], p["weight"], p["bias"], p["x_adapter"][:-1], *(p[n] for n in ADAPTERS),
        plan.route, plan.nbr, plan.nbr_t, 0.5, 2.0)
    with pytest.raises(RuntimeError, match="x_adapter: expected x's shape"):
        record.forward(inputs)
    _, z = record.forward(replace(inputs, x_adapter=None))
    dy = torch.randn(p["x"].shape[0], p["weight"].shape[0], generator=gen).to(DEVICE)
    with pytest.raises(RuntimeError, match="x: the backward reads it for dW"):
        record.backward(replace(inputs, x=None, x_adapter=None), dy, z,
                        backends.Needs(True, False, False, False))
    with pytest.raises(RuntimeError, match="need_dx_adapter: true, but x_adapter is None"):
        record.backward(replace(inputs, x_adapter=None), dy, z,
                        backends.Needs(True, False, False, True))
    if record.fuses_dropout:  # the kernels read the mask: its format is checked there too
        bits = mk.dropout.dropout_mask(p["x"], 0.5)
        for bad in (bits[:, :-8], bits.view(torch.int8), bits[:-1]):
            with pytest.raises(RuntimeError, match=r"dropout_mask: expected a contiguous uint8"):
                record.forward(replace(inputs, x_adapter=None, dropout_mask=bad))


def test_backward_accepts_an_expanded_gradient(gen):
    """``y.sum()`` hands the backward a stride-0 gradient; it must read it correctly."""
    _, plan, p = _setup(gen, torch.float64)
    x = p["x"].clone().requires_grad_()
    mk.moss_linear(x, p["weight"], p["bias"], plan, p["text_A"], p["text_B"], p["image_A"],
                   p["image_B"]).sum().backward()
    x2 = p["x"].clone().requires_grad_()
    y = mk.moss_linear(x2, p["weight"], p["bias"], plan, p["text_A"], p["text_B"],
                       p["image_A"], p["image_B"])
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("separate", [False, True])
def test_torch_compile_fullgraph_parity(gen, backend, layout, separate):
    """With a frozen weight; with an x_adapter the compiled backward then never reads x."""
    # Every case compiles afresh: they share step's code object, which Dynamo recompiles at
    # most 8 times (with fullgraph, the next one fails).
    torch._dynamo.reset()
    _, plan, p = _setup(gen)

    def step(x, weight, bias, text_A, text_B, image_A, image_B, x_adapter=None):
        y = mk.moss_linear(x, weight, bias, plan, text_A, text_B, image_A, image_B, 0.5, 2.0,
                           backend=backend, x_adapter=x_adapter)
        return F.gelu(y)

    names = PARAMS + (("x_adapter",) if separate else ())
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        leaves = [p[n].clone().requires_grad_(n != "weight") for n in names]
        if layout == "transposed":  # dx of a column-major x: what the fake said it would be
            leaves = [_transposed(v.detach()).requires_grad_() if n in ("x", "x_adapter") else v
                      for n, v in zip(names, leaves)]
        out = fn(*leaves)
        out.square().sum().backward()
        grads.append([out.detach()] + [v.grad for v in leaves if v.requires_grad])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_leading_dims_flatten(gen):
    layout = special_layouts()[1]  # [2, 6]
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans())
    p = make_params(gen, layout.n, 5, 4, 2, 2, 2, dtype=torch.float32)
    adapters = [p[n] for n in ADAPTERS]
    flat = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, *adapters)
    for shape in [(2, 6, 5), (12, 5), (2, 3, 2, 5)]:
        y = mk.moss_linear(p["x"].reshape(shape), p["weight"], p["bias"], plan, *adapters)
        assert y.shape == (*shape[:-1], 4)
        assert torch.equal(y.reshape(12, 4), flat)


# ------------------------------------------------------------------------- backend dispatch
def _auto(device_type: str, dtype=torch.float32) -> str:
    """What `auto` must pick: the available, non-emulated backend with the highest
    preference that runs there."""
    runs = [backends.backend(n) for n in mk.available_backends(device_type)]
    return max((b for b in runs if not b.emulated and b.supports(dtype)),
               key=lambda b: b.preference).name


def test_available_backends_and_default():
    names = mk.available_backends()
    assert "reference" in names and set(names) <= set(backends.BACKENDS)
    assert mk.available_backends("cpu") == [n for n in names if backends.backend(n).runs_on("cpu")]
    assert backends.resolve(None, "cpu") == _auto("cpu")
    assert backends.resolve(None, "cpu", torch.float64) == _auto("cpu", torch.float64)
    if "cpu" in names:  # the compiled kernels beat the reference on CPU tensors
        assert backends.resolve(None, "cpu") == "cpu"


def test_every_backend_states_its_contract():
    """One record per backend: unavailable with a reason, or its entry points, devices and
    dtypes (None: any)."""
    for name in backends.BACKENDS:
        record = backends.backend(name)
        assert record.name == name
        if record.unavailable is None:
            assert callable(record.forward) and callable(record.backward)
            assert record.devices is None or set(record.devices) <= {"cpu", "cuda"}
        else:
            assert record.unavailable and record.forward is None


def test_environment_variable_selects_the_backend(monkeypatch, gen):
    _, plan, p = _setup(gen)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve(None, "cpu") == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.resolve(None, "cpu") == _auto("cpu")  # "auto" means no preference
    # The argument wins over the environment.
    y = mk.moss_linear(p["x"], p["weight"], None, plan, backend="reference")
    torch.testing.assert_close(y, F.linear(p["x"], p["weight"]))
