"""Bad input to moss_linear: rows of docs/bad-inputs.md (tests/catalogue.py)."""

import warnings

import pytest
import torch

import moss_kernels as mk
from moss_kernels import RoutingPlan, backends

from catalogue import INF, NAN, OK_SPANS, Catalogue, R
from helpers import ADAPTERS, CPU_BACKENDS, PARAMS, make_params, random_layout

catalogue = Catalogue()
error, errors, behaviour = catalogue.error, catalogue.errors, catalogue.behaviour


LINEAR = "moss_linear"


def linear_inputs(seed=0):
    """The 12-token layout R (text, two images, padding), D_in 9, D_out 6, R_t 3, R_i 4, K 2."""
    return RoutingPlan.from_spans(R, OK_SPANS), make_params(
        torch.Generator().manual_seed(seed), 12, 9, 6, 3, 4, 2, dtype=torch.float32)


def linear(backend=None, **over):
    """moss_linear on :func:`linear_inputs`, arguments replaced by a value or by
    ``f(arguments)``."""
    plan, p = linear_inputs()
    args = {**p, "plan": plan}
    args.update({k: v(args) if callable(v) else v for k, v in over.items()})
    return mk.moss_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("plan"),
                          **args, backend=backend)


error(LINEAR, "`x` not a tensor", TypeError, "x: expected a torch.Tensor, got list",
      lambda: linear(x=lambda a: a["x"].tolist()))
errors(LINEAR, "`x` integer, bool or complex", TypeError,
       "x: expected a floating-point tensor, got {dtype}",
       [(dict(dtype=dt), lambda dt=dt: linear(x=lambda a: a["x"].to(dt)))
        for dt in (torch.long, torch.bool, torch.complex64)])
error(LINEAR, "`x` 0-dim, or its last dim not D_in", ValueError,
      "x: expected last dim D_in=9 (weight is [6, 9]), got shape",
      lambda: linear(x=torch.tensor(1.0)), lambda: linear(x=lambda a: a["x"][:, :-1]))
error(LINEAR, "`x`'s leading dims not the plan's N tokens", ValueError,
      "x: its leading dims (11,) hold 11 tokens but the plan was built for 12",
      lambda: linear(x=lambda a: a["x"][:-1]))
error(LINEAR, "`weight` integer", TypeError,
      "weight: expected a floating-point tensor, got torch.int64",
      lambda: linear(weight=lambda a: a["weight"].long()))
error(LINEAR, "`weight` not 2-D", ValueError, "weight: expected 2 dims, got shape (9,)",
      lambda: linear(weight=lambda a: a["weight"][0]))
error(LINEAR, "`bias` not `[D_out]`", ValueError, "bias: expected shape (6,), got (1, 6)",
      lambda: linear(bias=lambda a: a["bias"][None]))
errors(LINEAR, "`weight`, `bias` or an adapter tensor in another dtype than `x`", TypeError,
       "{name}: expected dtype torch.float32 like x, got torch.float64",
       [(dict(name=n), lambda n=n: linear(**{n: lambda a: a[n].double()})) for n in PARAMS[1:]])
errors(LINEAR, "`weight`, `bias` or an adapter tensor on another device than `x`", ValueError,
       "{name}: expected device cpu like x, got meta",
       [(dict(name=n), lambda n=n: linear(**{n: lambda a: a[n].to("meta")})) for n in PARAMS[1:]])
error(LINEAR, "`x_adapter` not a tensor", TypeError,
      "x_adapter: expected a torch.Tensor, got list",
      lambda: linear(x_adapter=lambda a: a["x"].tolist()))
error(LINEAR, "`x_adapter` integer", TypeError,
      "x_adapter: expected a floating-point tensor, got torch.int64",
      lambda: linear(x_adapter=lambda a: a["x"].long()))
error(LINEAR, "`x_adapter` in another dtype than `x`", TypeError,
      "x_adapter: expected dtype torch.float32 like x, got torch.float64",
      lambda: linear(x_adapter=lambda a: a["x"].double()))
error(LINEAR, "`x_adapter` on another device than `x`", ValueError,
      "x_adapter: expected device cpu like x, got meta",
      lambda: linear(x_adapter=lambda a: a["x"].to("meta")))
error(LINEAR, "`x_adapter` not `x`'s shape (even with as many elements)", ValueError,
      "x_adapter: expected shape (12, 9), got",
      lambda: linear(x_adapter=lambda a: a["x"][:-1]),
      lambda: linear(x_adapter=lambda a: a["x"].reshape(2, 6, 9)))
error(LINEAR, "`plan` not a RoutingPlan", TypeError,
      "plan: expected a moss_kernels.RoutingPlan, got str", lambda: linear(plan="plan"))
error(LINEAR, "`plan` on another device than `x`", ValueError,
      "plan: on meta but x is on cpu; use plan.to(x.device)",
      lambda: linear(plan=lambda a: a["plan"].to("meta")))
errors(LINEAR, "an adapter's A without its B, or B without A", ValueError,
       "{missing}: must be given together with {given} (or both None)",
       [(dict(missing=m, given=g), lambda m=m: linear(**{m: None}))
        for m, g in [("text_B", "text_A"), ("text_A", "text_B"), ("image_B", "image_A"),
                     ("image_A", "image_B")]])
error(LINEAR, "`text_A` not `[R_t, D_in]`", ValueError,
      "text_A: expected [R, D_in] = [3, 9], got (3, 8)",
      lambda: linear(text_A=lambda a: a["text_A"][:, :-1]))
errors(LINEAR, "`text_B` / `image_B` not `[D_out, R]`, R the rank of its A", ValueError,
       "{name}: expected shape (6, {r}), got (6, {r_bad})",
       [(dict(name="text_B", r=3, r_bad=2), lambda: linear(text_B=lambda a: a["text_B"][:, :-1])),
        (dict(name="image_B", r=4, r_bad=3),
         lambda: linear(image_B=lambda a: a["image_B"][:, 1:]))])
error(LINEAR, "`image_A`'s K not the plan's kernel_size", ValueError,
      "image_A: expected [R, D_in, K, K] with K = plan.kernel_size = [4, 9, 2, 2], got "
      "(4, 9, 1, 1)",
      lambda: linear(image_A=lambda a: a["image_A"][..., :1, :1]))
error(LINEAR, "`image_A` not 4-D", ValueError, "image_A: expected 4 dims, got shape (4, 9, 2)",
      lambda: linear(image_A=lambda a: a["image_A"][:, :, 0]))
errors(LINEAR, "`text_scale` / `image_scale` not a number (a str, a bool)", TypeError,
       "{name}: expected a float, got {kind}",
       [(dict(name=n, kind=type(v).__name__), lambda n=n, v=v: linear(**{n: v}))
        for n in ("text_scale", "image_scale") for v in ("2", True)])
errors(LINEAR, "`text_scale` / `image_scale` NaN or Inf", ValueError,
       "{name}: expected a finite number, got {value}",
       [(dict(name=n, value=v), lambda n=n, v=v: linear(**{n: v}))
        for n in ("text_scale", "image_scale") for v in (NAN, INF, -INF)])
error(LINEAR, "`backend` not a backend name", ValueError,
      "backend='fast': expected one of reference, cpu, cuda, triton, cuda-emulated",
      lambda: linear("fast"))

errors(LINEAR, "`adapter_dropout` not a probability in [0, 1) (1, negative, NaN, a bool, a str)",
       ValueError, "adapter_dropout: expected a probability in [0, 1), got {p}",
       [(dict(p=repr(p)), lambda p=p: linear(adapter_dropout=p))
        for p in (1.0, -0.1, NAN, True, "0.1")])
error(LINEAR, "`adapter_dropout` with an `x_adapter`", ValueError,
      "adapter_dropout: the adapters read x through dropout, so x_adapter must be None",
      lambda: linear(adapter_dropout=0.1, x_adapter=lambda a: a["x"].clone()))


@behaviour(LINEAR, "`MOSS_KERNELS_BACKEND` not a backend name",
           "`ValueError`: `MOSS_KERNELS_BACKEND='fastest': expected one of`")
def _env_backend():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backends.ENV_VAR, "fastest")
        with pytest.raises(ValueError, match="MOSS_KERNELS_BACKEND='fastest': expected one of"):
            linear()


@behaviour(LINEAR, "`backend` names one that cannot run here (not built, no GPU)",
           "`BackendUnavailableError` (a `RuntimeError`): `backend 'cuda' is not available: ` "
           "and why, or `backend 'cuda' does not run on 'cpu' tensors`")
def _unavailable_backend():
    for name in backends.BACKENDS:
        reason = backends.backend(name).unavailable
        if reason is not None:
            assert reason
            with pytest.raises(mk.BackendUnavailableError,
                               match=f"backend '{name}' is not available: "):
                linear(name)
        elif not backends.backend(name).runs_on("cpu"):
            with pytest.raises(mk.BackendUnavailableError,
                               match=f"backend '{name}' does not run on 'cpu' tensors"):
                linear(name)


@behaviour(LINEAR, "a dtype the chosen backend does not support",
           "`TypeError`: `backend 'triton' does not support torch.float64` (and what it supports)")
def _unsupported_dtype():
    names = [n for n in CPU_BACKENDS if not backends.backend(n).supports(torch.float64)]
    if not names:
        pytest.skip("every backend here runs float64")
    for name in names:
        with pytest.raises(TypeError, match=f"backend '{name}' does not support torch.float64"):
            linear(name, **{n: (lambda a, n=n: a[n].double()) for n in PARAMS})


@behaviour(LINEAR, "empty `x` (N = 0 tokens, any leading dims)",
           "an empty `[..., 0, D_out]` output; backward gives empty `dx`, zero adapter grads")
def _empty_x():
    plan = RoutingPlan.from_spans(torch.zeros(2, 0, dtype=torch.long), [])
    p = make_params(torch.Generator().manual_seed(0), 0, 5, 4, 2, 3, 2, dtype=torch.float32)
    x = p["x"].reshape(2, 0, 5).requires_grad_()
    adapters = [p[n].requires_grad_() for n in ADAPTERS]
    for name in CPU_BACKENDS:
        y = mk.moss_linear(x, p["weight"], p["bias"], plan, *adapters, backend=name)
        assert y.shape == (2, 0, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape and all(not a.grad.any() for a in adapters)


@behaviour(LINEAR, "D_in = 0 or D_out = 0",
           "as `F.linear`: `y = bias` (D_in = 0), a `[..., 0]` output (D_out = 0)")
def _zero_features():
    gen = torch.Generator().manual_seed(0)
    plan = RoutingPlan.from_spans(R, OK_SPANS)
    for d_in, d_out in [(0, 4), (5, 0)]:
        shapes = [(12, d_in), (d_out, d_in), (d_out,), (2, d_in), (d_out, 2), (3, d_in, 2, 2),
                  (d_out, 3)]
        p = [torch.randn(*shape, generator=gen) for shape in shapes]
        for name in CPU_BACKENDS:
            y = mk.moss_linear(*p[:3], plan, *p[3:], backend=name)
            torch.testing.assert_close(y, torch.nn.functional.linear(*p[:3]))


@behaviour(LINEAR, "an adapter of rank 0 (`text_A` `[0, D_in]`)", "no adapter: the same as None")
def _rank_zero():
    plan, p = linear_inputs()
    for name in CPU_BACKENDS:
        zero = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, p["x"].new_zeros(0, 9),
                              p["x"].new_zeros(6, 0), backend=name)
        none = mk.moss_linear(p["x"], p["weight"], p["bias"], plan, backend=name)
        torch.testing.assert_close(zero, none)


@behaviour(LINEAR, "NaN in `x[t]`",
           "propagates, never masked: NaN in the outputs of t and of the image tokens whose "
           "window reads t, every other output finite (every backend; hypothesis, random layouts)")
def _nan_in_x():
    pytest.importorskip("hypothesis")
    from hypothesis import given
    from hypothesis import strategies as st

    @given(seed=st.integers(0, 10_000), k=st.integers(1, 3), token=st.integers(0, 10_000))
    def nan_reaches_exactly_its_readers(seed, k, token):
        layout = random_layout(seed, p_image=0.6)
        params = make_params(torch.Generator().manual_seed(seed), layout.n, 7, 5, 2, 3, k)
        t = token % layout.n
        params["x"][t, 2] = NAN
        plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                         cu_seqlens=layout.cu_seqlens)
        readers = (plan.nbr == t).any(1)
        readers[t] = True
        for name in CPU_BACKENDS:
            y = mk.moss_linear(*(params[n].float() for n in PARAMS[:3]), plan,
                               *(params[n].float() for n in ADAPTERS), 1.0, 1.0, backend=name)
            assert torch.isnan(y[t]).all(), name
            assert torch.equal(torch.isnan(y).any(1), readers), name

    nan_reaches_exactly_its_readers()


def _nonfinite(edit, grad: bool = False, separate: bool = False) -> dict[str, torch.Tensor]:
    """Per backend, which outputs ``[N, D_out]`` (``grad``: which entries of dx ``[N, D_in]``)
    are NaN or Inf after ``edit(params)``. ``separate``: the adapters read ``x_adapter``, a copy
    of x that ``edit`` may change apart, and with ``grad`` dx and dx_adapter are returned side
    by side (``[N, 2 D_in]``)."""
    plan, p = linear_inputs()
    if separate:
        p["x_adapter"] = p["x"].clone()
    edit(p)
    found = {}
    with warnings.catch_warnings():  # numpy, under Triton's interpreter: "invalid value"
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in CPU_BACKENDS:
            x = p["x"].clone().requires_grad_(grad)
            x_adapter = p["x_adapter"].clone().requires_grad_(grad) if separate else None
            y = mk.moss_linear(x, p["weight"], p["bias"], plan, *(p[n] for n in ADAPTERS),
                               backend=name, x_adapter=x_adapter)
            if grad:
                y.backward(torch.ones_like(y))
                found[name] = ~torch.cat([x.grad, x_adapter.grad] if separate else [x.grad],
                                         1).isfinite()
            else:
                found[name] = ~y.isfinite()
    return found


@behaviour(LINEAR, "Inf in `x[t]`",
           "non-finite (Inf or NaN, by backend) in exactly the outputs that read t")
def _inf_in_x():
    plan, _ = linear_inputs()
    t = 3  # an image token, read by the next one
    readers = (plan.nbr == t).any(1)
    readers[t] = True
    for name, bad in _nonfinite(lambda p: p["x"][t].fill_(INF)).items():
        assert torch.equal(bad.any(1), readers) and bad[t].all(), name


@behaviour(LINEAR, "NaN / Inf in `x_adapter[t]`",
           "non-finite in exactly the outputs whose adapter reads t: t's unless it is padding, "
           "and the image tokens whose window reads t (the base layer reads `x`)")
def _nan_in_x_adapter():
    plan, _ = linear_inputs()
    for t in range(plan.num_tokens):
        readers = (plan.nbr == t).any(1)  # image tokens, t itself included if it is one
        readers[t] |= bool(plan.route[t] == 0)
        for value in (NAN, INF):
            edit = lambda p, t=t, v=value: p["x_adapter"][t].fill_(v)  # noqa: E731
            for name, bad in _nonfinite(edit, separate=True).items():
                assert torch.equal(bad.any(1), readers), (t, value, name)


@behaviour(LINEAR, "NaN / Inf in `weight[j]` or `bias[j]`",
           "output column j of every token, nothing else")
def _nan_in_weight():
    for edit in (lambda p: p["weight"][2, 0].fill_(NAN), lambda p: p["bias"][2].fill_(INF)):
        for name, bad in _nonfinite(edit).items():
            assert bad[:, 2].all() and not bad[:, [0, 1, 3, 4, 5]].any(), name


@behaviour(LINEAR, "NaN / Inf in `text_A` or `image_A`",
           "the outputs of the tokens that read it: text tokens (`text_A`); image tokens whose "
           "window holds that tap (`image_A[:, :, p, q]`); never other tokens")
def _nan_in_down_projection():
    plan, _ = linear_inputs()
    text = plan.route == 0
    for name, bad in _nonfinite(lambda p: p["text_A"][1, 4].fill_(NAN)).items():
        assert torch.equal(bad.any(1), text) and bad[text].all(), name
    tap = 0  # (p, q) = (0, 0): the top-left neighbour, present for some image tokens only
    readers = plan.nbr[:, tap] >= 0
    assert 0 < readers.sum() < (plan.route == 1).sum()
    for name, bad in _nonfinite(lambda p: p["image_A"][1, 4, 0, 0].fill_(INF)).items():
        assert torch.equal(bad.any(1), readers), name


@behaviour(LINEAR, "NaN / Inf in `text_B[j]` or `image_B[j]`",
           "output column j of exactly that adapter's tokens (every backend: the expand is "
           "kept to each route's rows, never a full-width `0 * NaN`)")
def _nan_in_up_projection():
    plan, _ = linear_inputs()
    for adapter, kind in (("text_B", 0), ("image_B", 1)):
        mine = plan.route == kind
        for value in (NAN, INF):
            edit = lambda p, a=adapter, v=value: p[a][2, 1].fill_(v)  # noqa: E731
            for name, bad in _nonfinite(edit).items():
                assert torch.equal(bad[:, 2], mine), (adapter, value, name)
                assert not bad[:, [0, 1, 3, 4, 5]].any(), (adapter, value, name)


@behaviour(LINEAR, "NaN / Inf in `text_A[:, d]` or `image_A[:, d]`, in the backward",
           "`x.grad` column d of exactly the tokens of that adapter's route (the transposed "
           "expand `dP A_all` is kept to each route's rows); with an `x_adapter`, "
           "`x_adapter.grad`'s, and `x.grad` (the base layer's) stays finite")
def _nan_in_down_projection_backward():
    plan, _ = linear_inputs()
    d_in = 9
    for adapter, kind in (("text_A", 0), ("image_A", 1)):
        mine = plan.route == kind
        edit = lambda p, a=adapter: p[a][1, 4].fill_(NAN)  # noqa: E731
        for separate in (False, True):
            col = 4 + d_in * separate  # dx_adapter's column 4, after dx's D_in columns
            for name, bad in _nonfinite(edit, grad=True, separate=separate).items():
                assert torch.equal(bad[:, col], mine) and bad.sum() == mine.sum(), (
                    adapter, separate, name)


test_row = catalogue.test()
