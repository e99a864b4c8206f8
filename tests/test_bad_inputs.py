"""The bad-input catalogue (docs/bad-inputs.md): one test per row, and the doc kept in step.

A row is (entry point, input, what happens) plus the code that shows it. An error row names the
exception and a fragment of its message, matched literally (`` ... `` stands for any text, a
temporary path say; ``<name>`` for the field that varies between the row's cases); a behaviour
row says what happens in words and its check asserts it. The doc's tables are rendered from
``ROWS``: ``test_the_doc_lists_exactly_these_rows`` fails on any difference, and
``python tests/test_bad_inputs.py`` rewrites the tables in place after a change here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import moss_kernels as mk
from moss_kernels import RoutingPlan, backends
from conftest import make_params, random_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Row:
    entry: str  # the doc's section
    input: str  # Markdown
    outcome: str  # Markdown
    check: Callable  # asserts the outcome; takes tmp_path if it names a parameter


ROWS: list[Row] = []


def run(fn: Callable, tmp: Path):
    """``fn(tmp)`` if ``fn`` has a parameter without a default (lambdas bind loop variables
    through defaults), else ``fn()``."""
    params = inspect.signature(fn).parameters.values()
    return fn(tmp) if any(p.default is p.empty for p in params) else fn()


def contains(message: str, fragment: str) -> bool:
    """``fragment`` in ``message``, `` ... `` in the fragment standing for any text."""
    at = 0
    for part in fragment.split(" ... "):
        at = message.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


def raises(exc: type[BaseException], fragment: str, call: Callable, tmp: Path) -> None:
    with pytest.raises(exc) as info:
        run(call, tmp)
    assert contains(str(info.value), fragment), f"{fragment!r} not in {str(info.value)!r}"


def error(entry: str, input: str, exc: type[BaseException], fragment: str, *calls: Callable):
    """A row whose every call raises ``exc`` with ``fragment`` in its message."""
    def check(tmp):
        for call in calls:
            raises(exc, fragment, call, tmp)

    ROWS.append(Row(entry, input, f"`{exc.__name__}`: `{fragment}`", check))


def errors(entry: str, input: str, exc: type[BaseException], template: str,
           cases: list[tuple[dict, Callable]]):
    """A row of cases that differ in a name or value: case ``(fields, call)`` raises ``exc``
    with ``template.format(**fields)``; the doc shows each ``{field}`` as ``<field>``."""
    def check(tmp):
        for fields, call in cases:
            raises(exc, template.format(**fields), call, tmp)

    shown = re.sub(r"\{(\w+)(?:![rs])?\}", r"<\1>", template)
    ROWS.append(Row(entry, input, f"`{exc.__name__}`: `{shown}`", check))


def behaviour(entry: str, input: str, outcome: str):
    """Decorator: a row whose check is the decorated function."""
    def register(fn):
        ROWS.append(Row(entry, input, outcome, fn))
        return fn
    return register


# ============================================================================ RoutingPlan
SPANS = "RoutingPlan.from_spans"
R = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, -1, -1]])  # [B, T] = [2, 6]
OK_SPANS = [[1, 2, 2], [6, 1, 2]]


def spans(route=R, images=OK_SPANS, **kw):
    return RoutingPlan.from_spans(route, images, **kw)


error(SPANS, "`route` not a tensor (a list)", TypeError, "route: expected a torch.Tensor, got list",
      lambda: spans(R.tolist()))
error(SPANS, "`route` float, bool or complex", ValueError,
      "route: expected an integer tensor of shape [N] or [B, T], got dtype",
      lambda: spans(R.float()), lambda: spans(R.bool()), lambda: spans(R.to(torch.complex64)))
error(SPANS, "`route` of rank 3", ValueError,
      "route: expected an integer tensor of shape [N] or [B, T], got dtype torch.int64 and "
      "shape (1, 2, 6)", lambda: spans(R[None]))
error(SPANS, "a `route` value other than -1, 0, 1", ValueError,
      "route[1, 3] = 2: expected -1 (padding), 0 (text) or 1 (image)",
      lambda: spans(R.clone().index_put_((torch.tensor(1), torch.tensor(3)), torch.tensor(2))))


@behaviour(SPANS, "`route` of another integer dtype (uint8, int32)", "read as int64: the same plan")
def _route_dtypes():
    route = torch.tensor([0, 1, 1, 0])
    want = spans(route, [[1, 1, 2]])
    for dtype in (torch.uint8, torch.int32):
        got = spans(route.to(dtype), [[1, 1, 2]])
        assert torch.equal(got.route, want.route) and torch.equal(got.nbr, want.nbr)


@behaviour(SPANS, "empty `route` (`[0]` or `[B, 0]`)", "an empty plan (N = 0)")
def _empty_route():
    for shape in [(0,), (2, 0)]:
        plan = spans(torch.zeros(shape, dtype=torch.long), [])
        assert plan.num_tokens == 0 and plan.nbr.shape == (0, 4) and plan.images.shape == (0, 3)


error(SPANS, "`images` not a table of numbers (None, ragged rows)", TypeError,
      "images: expected ints (a list or an integer tensor), got",
      lambda: spans(images=None), lambda: spans(images=[[1, 2], [6, 1, 2]]))
error(SPANS, "`images` float or bool (would truncate)", TypeError,
      "images: expected integers, got dtype",
      lambda: spans(images=[[1.5, 2, 2]]), lambda: spans(images=torch.ones(2, 3, dtype=torch.bool)))
error(SPANS, "`images` not of shape `[n_img, 3]` (rank 1, or 2 columns)", ValueError,
      "images: expected shape [n_img, 3] with rows (start, height, width), got",
      lambda: spans(images=[1, 2, 2]), lambda: spans(images=[[1, 2]]))
error(SPANS, "`images` empty while `route` has image tokens", ValueError,
      "route[0, 1] is an image token outside every image span", lambda: spans(images=[]))


@behaviour(SPANS, "`images` empty and no image token", "a plan without images (a `[0, 3]` table)")
def _no_images():
    plan = spans(torch.tensor([0, 0, -1]), [])
    assert plan.images.shape == (0, 3) and (plan.nbr == -1).all()


errors(SPANS, "an image of height or width 0 or negative", ValueError,
       "images[0] = {row}: height and width must be >= 1",
       [(dict(row=row), lambda row=row: spans(images=[row, [6, 1, 2]]))
        for row in ([1, 0, 2], [1, 2, -2])])
error(SPANS, "an image start at or past N", ValueError,
      "images[1] = [12, 1, 2]: start is outside the 12 tokens",
      lambda: spans(images=[[1, 2, 2], [12, 1, 2]]))
error(SPANS, "a negative image start", ValueError,
      "images[1] = [-1, 1, 2]: start is outside the 12 tokens",
      lambda: spans(images=[[1, 2, 2], [-1, 1, 2]]))
error(SPANS, "an image starting on a text or padding token", ValueError,
      "images[0] starts at token 0 (route[0, 0] = 0), which is not an image token",
      lambda: spans(images=[[0, 2, 2], [6, 1, 2]]))
errors(SPANS, "overlapping image spans (a shared start included)", ValueError,
       "images[{b}] starts at token {start}, inside images[{a}] (tokens {first}..",
       [(dict(a=1, b=2, start=3, first=1), lambda: spans(images=[[6, 1, 2], [1, 2, 2], [3, 1, 1]])),
        (dict(a=0, b=1, start=1, first=1),
         lambda: spans(images=[[1, 2, 2], [1, 1, 1], [6, 1, 2]]))])
error(SPANS, "an image token that no span covers", ValueError,
      "route[1, 0] is an image token outside every image span", lambda: spans(images=[[1, 2, 2]]))
error(SPANS, "a run of image tokens longer than its span's height * width", ValueError,
      "route[0, 3] is an image token outside every image span",
      lambda: spans(images=[[1, 1, 2], [6, 1, 2]]))
error(SPANS, "an image crossing a `cu_seqlens` boundary", ValueError,
      "route[4] is an image token outside every image span",
      lambda: spans(torch.tensor([0, 1, 1, 1, 1, 1, 0]), [[1, 1, 5]], cu_seqlens=[0, 4, 7]))
error(SPANS, "`cu_seqlens` with a `[B, T]` route", ValueError,
      "cu_seqlens: only for a flat [N] layout", lambda: spans(cu_seqlens=[0, 12]))
error(SPANS, "`cu_seqlens` not from 0 to N, or decreasing", ValueError,
      "cu_seqlens: expected non-decreasing offsets from 0 to N=12, got",
      lambda: spans(R.flatten(), cu_seqlens=[0, 5, 11]),
      lambda: spans(R.flatten(), cu_seqlens=[0, 7, 5, 12]))
error(SPANS, "`cu_seqlens` float", TypeError,
      "cu_seqlens: expected integers, got dtype torch.float32",
      lambda: spans(R.flatten(), cu_seqlens=[0.0, 6.5, 12.0]))
error(SPANS, "`cu_seqlens` of rank 2", ValueError,
      "cu_seqlens: expected a 1-D list of offsets, got shape (2, 2)",
      lambda: spans(R.flatten(), cu_seqlens=[[0, 6], [6, 12]]))
errors(SPANS, "`kernel_size` 0, negative, or not an int (2.0, True)", ValueError,
       "kernel_size: expected an int >= 1, got {k!r}",
       [(dict(k=k), lambda k=k: spans(kernel_size=k)) for k in (0, -1, 2.0, True)])
error(SPANS, "`causal` not a bool", TypeError, "causal: expected a bool, got int",
      lambda: spans(causal=1))


@behaviour(SPANS, "`images` / `cu_seqlens` on another device than `route`",
           "moved to `route`'s device")
def _spans_moved():
    route = R.flatten().to("meta")  # a second device that needs no GPU; meta cannot validate
    plan = spans(route, torch.tensor(OK_SPANS), cu_seqlens=torch.tensor([0, 6, 12]),
                 validate=False)
    assert plan.images.device.type == "meta" and plan.nbr.device.type == "meta"


@behaviour(SPANS, "any inconsistent layout with `validate=False`",
           "not checked (no host sync, no error); the tables are then unspecified")
def _unvalidated():
    bad = R.clone()
    bad[0, 0] = 5
    spans(bad, [[0, 9, 9], [30, 0, 0]], validate=False)


IDS_ENTRY = "RoutingPlan.from_input_ids"
IDS = torch.tensor([[1, 9, 9, 2]])


def from_ids(input_ids=IDS, image_token_ids=(9,), grid=(2, 2), **kw):
    return RoutingPlan.from_input_ids(input_ids, image_token_ids, grid, **kw)


error(IDS_ENTRY, "`input_ids` not a tensor", TypeError,
      "input_ids: expected a torch.Tensor, got list",
      lambda: from_ids(IDS.tolist()))
error(IDS_ENTRY, "`input_ids` float, bool or complex", ValueError,
      "input_ids: expected an integer tensor of shape [T] or [B, T], got dtype",
      lambda: from_ids(IDS.float()), lambda: from_ids(IDS.bool()),
      lambda: from_ids(IDS.to(torch.complex64)))
error(IDS_ENTRY, "`input_ids` of rank 3", ValueError,
      "input_ids: expected an integer tensor of shape [T] or [B, T], got dtype torch.int64 and "
      "shape (1, 1, 4)", lambda: from_ids(IDS[None]))


@behaviour(IDS_ENTRY, "empty `input_ids` (`[0]` or `[B, 0]`)", "an empty plan (N = 0)")
def _empty_ids():
    for shape in [(0,), (2, 0)]:
        assert from_ids(torch.zeros(shape, dtype=torch.long)).num_tokens == 0


errors(IDS_ENTRY, "`image_token_ids` not a list (an int, None, a str)", TypeError,
       "image_token_ids: expected a list of ints or an integer tensor, got {kind}",
       [(dict(kind=type(v).__name__), lambda v=v: from_ids(image_token_ids=v))
        for v in (9, None, "9")])
error(IDS_ENTRY, "`image_token_ids` float (would truncate)", TypeError,
      "image_token_ids: expected integers, got dtype torch.float32",
      lambda: from_ids(image_token_ids=[9.7]),
      lambda: from_ids(image_token_ids=torch.tensor([9.0])))


@behaviour(IDS_ENTRY, "`image_token_ids` empty, or ids that never occur",
           "every unpadded token is text")
def _no_image_ids():
    for ids in ([], [12345]):
        assert from_ids(image_token_ids=ids).route.tolist() == [0, 0, 0, 0]


errors(IDS_ENTRY, "`grid` not two ints >= 1 (a side 0, (2,), None, (2.0, 2), (True, 2))",
       ValueError,
       "grid: expected (height, width) with positive ints, got {grid!r}",
       [(dict(grid=g), lambda g=g: from_ids(grid=g))
        for g in [(0, 2), (2,), None, (2.0, 2), (True, 2)]])
errors(IDS_ENTRY, "`attention_mask` of another shape, or not a tensor", ValueError,
       "attention_mask: expected shape (1, 4) like input_ids, got {got}",
       [(dict(got="(4,)"), lambda: from_ids(attention_mask=torch.ones(4))),
        (dict(got="list"), lambda: from_ids(attention_mask=[[1, 1, 1, 1]]))])
errors(IDS_ENTRY, "an `attention_mask` value other than 0 or 1 (NaN included)", ValueError,
       "attention_mask[0, {t}] = {v}: expected 0 or 1",
       [(dict(t=2, v=2), lambda: from_ids(attention_mask=torch.tensor([[1, 1, 2, 1]]))),
        (dict(t=1, v=NAN), lambda: from_ids(attention_mask=torch.tensor([[1, NAN, 1, 1]])))])


@behaviour(IDS_ENTRY, "`attention_mask` float or bool", "accepted: 0 / False is padding")
def _float_mask():
    for mask in (torch.tensor([[1.0, 0.0, 1.0, 1.0]]), torch.tensor([[True, False, True, True]])):
        assert from_ids(attention_mask=mask).route.tolist() == [0, -1, 1, 0]


@behaviour(IDS_ENTRY, "`attention_mask` / `image_token_ids` on another device than `input_ids`",
           "moved to `input_ids`' device")
def _ids_moved():
    ids = IDS.to("meta")
    plan = from_ids(ids, torch.tensor([9]), attention_mask=torch.ones(1, 4), validate=False)
    assert plan.route.device.type == "meta"


errors(IDS_ENTRY, "`kernel_size` 0, negative, or not an int", ValueError,
       "kernel_size: expected an int >= 1, got {k!r}",
       [(dict(k=k), lambda k=k: from_ids(kernel_size=k)) for k in (0, -1, 1.5)])
error(IDS_ENTRY, "`causal` not a bool", TypeError, "causal: expected a bool, got str",
      lambda: from_ids(causal="no"))


# ============================================================================ moss_linear
LINEAR = "moss_linear"
NAMES = ("x", "weight", "bias", "text_A", "text_B", "image_A", "image_B")
ADAPTERS = NAMES[3:]


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
       [(dict(name=n), lambda n=n: linear(**{n: lambda a: a[n].double()})) for n in NAMES[1:]])
errors(LINEAR, "`weight`, `bias` or an adapter tensor on another device than `x`", ValueError,
       "{name}: expected device cpu like x, got meta",
       [(dict(name=n), lambda n=n: linear(**{n: lambda a: a[n].to("meta")})) for n in NAMES[1:]])
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
      "backend='fast': expected one of reference, cpu, cuda, triton", lambda: linear("fast"))


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
        reason = backends.unavailable_reason(name)
        if reason is not None:
            assert reason
            with pytest.raises(mk.BackendUnavailableError,
                               match=f"backend '{name}' is not available: "):
                linear(name)
        elif not backends.runs_on(name, "cpu"):
            with pytest.raises(mk.BackendUnavailableError,
                               match=f"backend '{name}' does not run on 'cpu' tensors"):
                linear(name)


@behaviour(LINEAR, "a dtype the chosen backend does not support",
           "`TypeError`: `backend 'triton' does not support torch.float64` (and what it supports)")
def _unsupported_dtype():
    names = [n for n in mk.available_backends("cpu") if not backends.supports(n, torch.float64)]
    if not names:
        pytest.skip("every backend here runs float64")
    for name in names:
        with pytest.raises(TypeError, match=f"backend '{name}' does not support torch.float64"):
            linear(name, **{n: (lambda a, n=n: a[n].double()) for n in NAMES})


@behaviour(LINEAR, "empty `x` (N = 0 tokens, any leading dims)",
           "an empty `[..., 0, D_out]` output; backward gives empty `dx`, zero adapter grads")
def _empty_x():
    plan = RoutingPlan.from_spans(torch.zeros(2, 0, dtype=torch.long), [])
    p = make_params(torch.Generator().manual_seed(0), 0, 5, 4, 2, 3, 2, dtype=torch.float32)
    x = p["x"].reshape(2, 0, 5).requires_grad_()
    adapters = [p[n].requires_grad_() for n in ADAPTERS]
    for name in mk.available_backends("cpu"):
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
        for name in mk.available_backends("cpu"):
            y = mk.moss_linear(*p[:3], plan, *p[3:], backend=name)
            torch.testing.assert_close(y, torch.nn.functional.linear(*p[:3]))


@behaviour(LINEAR, "an adapter of rank 0 (`text_A` `[0, D_in]`)", "no adapter: the same as None")
def _rank_zero():
    plan, p = linear_inputs()
    for name in mk.available_backends("cpu"):
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
        for name in mk.available_backends("cpu"):
            y = mk.moss_linear(*(params[n].float() for n in NAMES[:3]), plan,
                               *(params[n].float() for n in ADAPTERS), 1.0, 1.0, backend=name)
            assert torch.isnan(y[t]).all(), name
            assert torch.equal(torch.isnan(y).any(1), readers), name

    nan_reaches_exactly_its_readers()


def _nonfinite(edit) -> dict[str, torch.Tensor]:
    """Per backend, which outputs ``[N, D_out]`` are NaN or Inf after ``edit(params)``."""
    plan, p = linear_inputs()
    edit(p)
    with warnings.catch_warnings():  # numpy, under Triton's interpreter: "invalid value"
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: ~mk.moss_linear(p["x"], p["weight"], p["bias"], plan,
                                      *(p[n] for n in ADAPTERS), backend=name).isfinite()
                for name in mk.available_backends("cpu")}


@behaviour(LINEAR, "Inf in `x[t]`",
           "non-finite (Inf or NaN, by backend) in exactly the outputs that read t")
def _inf_in_x():
    plan, _ = linear_inputs()
    t = 3  # an image token, read by the next one
    readers = (plan.nbr == t).any(1)
    readers[t] = True
    for name, bad in _nonfinite(lambda p: p["x"][t].fill_(INF)).items():
        assert torch.equal(bad.any(1), readers) and bad[t].all(), name


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
           "output column j of that adapter's tokens; the fused expand GEMM multiplies it by "
           "the zeros of the other tokens (0 * NaN), so their column j may be NaN too, by backend")
def _nan_in_up_projection():
    plan, _ = linear_inputs()
    for adapter, kind in (("text_B", 0), ("image_B", 1)):
        mine = plan.route == kind
        for name, bad in _nonfinite(lambda p: p[adapter][2, 1].fill_(NAN)).items():
            assert bad[mine, 2].all() and not bad[:, [0, 1, 3, 4, 5]].any(), (adapter, name)


# ============================================================================ moss/
CONFIG = "MossConfig"


def config(**kw):
    from moss import MossConfig

    return MossConfig(**kw)


errors(CONFIG, "`r_text`, `r_image` or `kernel_size` 0, negative, or not an int (2.0, True)",
       ValueError, "{name}: expected an int >= 1, got {v!r}",
       [(dict(name=n, v=v), lambda n=n, v=v: config(**{n: v}))
        for n in ("r_text", "r_image", "kernel_size") for v in (0, -1, 2.0, True)])
errors(CONFIG, "`alpha_text` / `alpha_image` 0, negative, NaN, Inf, or not a number", ValueError,
       "{name}: expected a finite number > 0, got {v!r}",
       [(dict(name=n, v=v), lambda n=n, v=v: config(**{n: v}))
        for n in ("alpha_text", "alpha_image") for v in (0, -1.0, NAN, INF, "32", True)])
errors(CONFIG, "`dropout` outside [0, 1) (NaN included)", ValueError,
       "dropout: expected a number in [0, 1), got {v!r}",
       [(dict(v=v), lambda v=v: config(dropout=v)) for v in (1.0, -0.1, NAN)])
error(CONFIG, "`causal` not a bool", TypeError, "causal: expected a bool, got str",
      lambda: config(causal="yes"))
error(CONFIG, "`image_adapter` not a variant", ValueError,
      "image_adapter: expected one of shared, moe, conv, conv_rank, got 'lora'",
      lambda: config(image_adapter="lora"))
errors(CONFIG, "`target_modules` a str, empty, or holding a non-str", ValueError,
       "target_modules: expected a non-empty list of module names, got {v!r}",
       [(dict(v=v), lambda v=v: config(target_modules=v)) for v in ("q_proj", [], ["q_proj", 3])])
errors(CONFIG, "`image_token_ids` empty, negative, or not ints", ValueError,
       "image_token_ids: expected non-negative ints, got {v!r}",
       [(dict(v=v), lambda v=v: config(image_token_ids=v)) for v in ([], [-1], [1.0], [True])])
errors(CONFIG, "`image_grid` with a side 0, or not two ints (floats, bools, three sides)",
       ValueError, "image_grid: expected (height, width) >= 1, got {v!r}",
       [(dict(v=v), lambda v=v: config(image_grid=v)) for v in ((0, 2), (2.0, 2), (True, 2),
                                                                 (2, 2, 2))])
errors(CONFIG, "`image_token_ids` / `image_grid` not a list (an int, a str)", TypeError,
       "{name}: expected a list, got {kind}",
       [(dict(name=n, kind=type(v).__name__), lambda n=n, v=v: config(**{n: v}))
        for n in ("image_token_ids", "image_grid") for v in (4, "12")])
error(CONFIG, "`backend` not a backend name", ValueError,
      "backend: expected one of reference, cpu, cuda, triton or None, got 'fast'",
      lambda: config(backend="fast"))
error(CONFIG, "`MossConfig.from_dict` of a non-dict", TypeError,
      "config: expected a dict (a JSON object), got list", lambda: config().from_dict([1]))
error(CONFIG, "`from_dict` of another format_version", ValueError,
      "format_version: this moss reads adapter configs of version 1, the file says 99",
      lambda: config().from_dict({**config().to_dict(), "format_version": 99}))
error(CONFIG, "`from_dict` with unknown fields", ValueError, "config: unknown fields ['rank']",
      lambda: config().from_dict({**config().to_dict(), "rank": 3}))

INJECT = "get_moss_model"


def tiny_llama(**kw):
    from test_moss_model import tiny_llama as build

    return build(**kw)


def wrap(model=None, image_logits=False, **kw):
    from moss import get_moss_model

    return get_moss_model(tiny_llama() if model is None else model,
                          config(r_text=4, r_image=4, **kw), image_logits=image_logits)


def _get_moss_model(model, cfg):
    from moss import get_moss_model

    return get_moss_model(model, cfg)


error(INJECT, "`model` not an `nn.Module`", TypeError, "model: expected a torch nn.Module, got str",
      lambda: wrap("llama"))
error(INJECT, "`cfg` not a `MossConfig` (a dict)", TypeError,
      "cfg: expected a moss.MossConfig, got dict",
      lambda: _get_moss_model(tiny_llama(), {"r_text": 4}))
error(INJECT, "`image_logits` not a bool", TypeError, "image_logits: expected a bool, got str",
      lambda: wrap(image_logits="yes"))
error(INJECT, "a model that already holds MOSS layers", ValueError,
      "model: already holds MOSS layers (call unload() first)", lambda: wrap(wrap().model))


@behaviour(INJECT, "`target_modules` that match no `nn.Linear`",
           "`ValueError`: `target_modules: no nn.Linear named ['nope'] in LlamaForCausalLM`; "
           "the model is left untouched")
def _no_targets():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape("target_modules: no nn.Linear named ['nope'] "
                                                   "in LlamaForCausalLM")):
        wrap(model, target_modules=["nope"])
    assert all(p.requires_grad for p in model.parameters())


error(INJECT, "`image_token_ids` on a backbone with no known grid", ValueError,
      "image_grid: the backbone has image tokens but no known grid",
      lambda: wrap(image_token_ids=[5]))
error(INJECT, "`image_token_ids` outside the model's vocabulary", ValueError,
      "image_token_ids: 500 is outside the model's vocabulary (its input embedding has 80 rows)",
      lambda: wrap(image_token_ids=[5, 500], image_grid=(2, 2)))

FORWARD = "MossModel.forward / generate"
EMBEDS = torch.zeros(2, 6, 32)

error(FORWARD, "neither `input_ids` nor `route`", ValueError,
      "input_ids or route: give the token ids, or the explicit layout (route and images)",
      lambda: wrap()(inputs_embeds=EMBEDS))
error(FORWARD, "`route` without `images`", ValueError,
      "images: required with route (use an empty [0, 3] tensor for none)",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R))
error(FORWARD, "`route` not a tensor", TypeError, "route: expected a torch.Tensor [B, T], got list",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R.tolist(), images=[]))
error(FORWARD, "`route` of another shape than the inputs", ValueError,
      "route: expected shape (2, 6) like the inputs, got (2, 5)",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R[:, :5], images=[]))
error(FORWARD, "an inconsistent `route` / `images` (checked as by `from_spans`)", ValueError,
      "images[0] = [20, 2, 3]: start is outside the 12 tokens",
      lambda: wrap()(inputs_embeds=EMBEDS, route=R, images=[[20, 2, 3]]))
error(FORWARD, "`inputs_embeds` with no tokens (T = 0)", ValueError,
      "inputs_embeds: expected at least one token, got shape (2, 0)",
      lambda: wrap()(inputs_embeds=EMBEDS[:, :0], route=R[:, :0], images=[]))
errors(FORWARD, "`input_ids` float or bool", TypeError,
       "input_ids: expected an integer tensor, got {dtype}",
       [(dict(dtype=dt), lambda dt=dt: wrap()(input_ids=torch.tensor([[1, 2]], dtype=dt)))
        for dt in (torch.float32, torch.bool)])
error(FORWARD, "`input_ids` empty", ValueError,
      "input_ids: expected at least one token, got shape (1, 0)",
      lambda: wrap()(input_ids=torch.zeros(1, 0, dtype=torch.long)))
errors(FORWARD, "a token id outside the vocabulary (negative or too large)", ValueError,
       "input_ids[0, 1] = {v}: outside the model's vocabulary of 80 ids",
       [(dict(v=v), lambda v=v: wrap()(input_ids=torch.tensor([[1, v]]))) for v in (80, -1)])
error(FORWARD, "`generate` with `causal=False` adapters", ValueError,
      "causal: adapters trained with causal=False see tokens to their right and cannot decode",
      lambda: wrap(causal=False, kernel_size=3).generate(input_ids=torch.tensor([[1, 2]])))

LOAD = "MossModel.from_pretrained"


def saved(tmp: Path) -> Path:
    """An adapter folder saved from a tiny Llama."""
    wrap().save_pretrained(tmp / "adapter")
    return tmp / "adapter"


def load(path, model=None):
    from moss import MossModel

    return MossModel.from_pretrained(tiny_llama() if model is None else model, path)


def _rewrite_config(folder: Path, drop: str | None = None, **fields) -> Path:
    meta = json.loads((folder / "moss_config.json").read_text())
    meta.update(fields)
    meta.pop(drop, None)
    (folder / "moss_config.json").write_text(json.dumps(meta))
    return folder


def _rewrite_weights(folder: Path, edit) -> Path:
    """Change the tensors and record their new hash: a consistent pair someone else wrote."""
    from safetensors.torch import load_file, save_file

    from moss.model import _sha256

    weights = folder / "moss_adapter.safetensors"
    tensors = load_file(weights)
    changed = edit(tensors)  # a new dict, or None after an edit in place
    save_file(tensors if changed is None else changed, weights)
    return _rewrite_config(folder, weights_sha256=_sha256(weights))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path.parent


def _damaged(tmp: Path, edit) -> Path:
    """A saved adapter whose weights file's bytes went through ``edit`` (the hash kept)."""
    weights = saved(tmp) / "moss_adapter.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    return weights.parent


def _poison(tensors: dict) -> None:
    tensors[sorted(tensors)[-1]][0] = INF  # model.layers.1.self_attn.v_proj.text_B


def _garbage_weights(folder: Path) -> Path:
    from moss.model import _sha256

    (folder / "moss_adapter.safetensors").write_bytes(b"not safetensors")
    return _rewrite_config(folder, weights_sha256=_sha256(folder / "moss_adapter.safetensors"))


error(LOAD, "`path` not a path (None)", TypeError,
      "path: expected a folder path (str or os.PathLike), got NoneType", lambda: load(None))
error(LOAD, "a folder that does not exist", FileNotFoundError,
      "path: ... nowhere/moss_config.json does not exist", lambda tmp: load(tmp / "nowhere"))
error(LOAD, "`path` a file, not the folder", FileNotFoundError,
      "path: ... is a file; expected the adapter folder",
      lambda tmp: load(saved(tmp) / "moss_config.json"))
error(LOAD, "the weights file missing", FileNotFoundError,
      "path: ... moss_adapter.safetensors does not exist",
      lambda tmp: load((saved(tmp) / "moss_adapter.safetensors").unlink() or tmp / "adapter"))
error(LOAD, "`moss_config.json` not JSON (or not UTF-8)", ValueError,
      "moss_config.json: not valid JSON",
      lambda tmp: load(_write(saved(tmp) / "moss_config.json", b"{not json")),
      lambda tmp: load(_write(saved(tmp) / "moss_config.json", b'{"a": "\xe9"}')))
error(LOAD, "`moss_config.json` not a JSON object", ValueError,
      "moss_config.json: expected a JSON object, got list",
      lambda tmp: load(_write(saved(tmp) / "moss_config.json", b"[1, 2]")))
error(LOAD, "`moss_config.json` without `weights_sha256`", ValueError,
      "moss_config.json: no weights_sha256 (not written by save_pretrained)",
      lambda tmp: load(_rewrite_config(saved(tmp), drop="weights_sha256")))
error(LOAD, "`moss_config.json` of another format_version", ValueError,
      "format_version: this moss reads adapter configs of version 1, the file says 99",
      lambda tmp: load(_rewrite_config(saved(tmp), format_version=99)))
error(LOAD, "`moss_config.json` with an invalid field", ValueError,
      "r_text: expected an int >= 1, got 0",
      lambda tmp: load(_rewrite_config(saved(tmp), r_text=0)))
error(LOAD, "a truncated or corrupted weights file", ValueError,
      "moss_adapter.safetensors: its SHA-256 does not match the one in moss_config.json",
      lambda tmp: load(_damaged(tmp, lambda data: data[:-100])),
      lambda tmp: load(_damaged(tmp, lambda data: data[:-1] + bytes([data[-1] ^ 1]))))
error(LOAD, "a weights file that is not safetensors (with a matching hash)", ValueError,
      "moss_adapter.safetensors: not a safetensors file",
      lambda tmp: load(_garbage_weights(saved(tmp))))
error(LOAD, "`model` not an `nn.Module`", TypeError, "model: expected a torch nn.Module, got str",
      lambda tmp: load(saved(tmp), "llama"))
error(LOAD, "`model` with other layers than the adapter's base", ValueError,
      "model: does not match the adapter's base model",
      lambda tmp: load(saved(tmp), tiny_llama(layers=3)))
error(LOAD, "`model` with other sizes than the adapter's base", ValueError,
      "expected shape ... the file has", lambda tmp: load(saved(tmp), tiny_llama(hidden=48)))


@behaviour(LOAD, "a weights file missing keys, or with unexpected ones",
           "`ValueError`: `moss_adapter.safetensors: missing keys [...], unexpected keys [...]` "
           "(up to 5 of each)")
def _keys(tmp):
    folder = saved(tmp)
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != sorted(t)[0]})
    with pytest.raises(ValueError, match=r"moss_adapter.safetensors: missing keys \['model\."):
        load(folder)
    _rewrite_weights(saved(tmp), lambda t: {**t, "extra.text_A": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra.text_A'\]"):
        load(folder)


error(LOAD, "NaN or Inf in the weights file", ValueError,
      "self_attn.v_proj.text_B: the file holds NaN, Inf or non-float values (a diverged run?)",
      lambda tmp: load(_rewrite_weights(saved(tmp), _poison)))


@behaviour(LOAD, "weights in another float dtype (float16)", "cast to the model's dtype")
def _half_weights(tmp):
    folder = _rewrite_weights(saved(tmp), lambda t: {k: v.half() for k, v in t.items()})
    assert {p.dtype for p in load(folder).parameters()} == {torch.float32}


DATA = "the data loader (moss.data)"


@lru_cache(maxsize=1)
def _vocab():
    from moss.train import backbone

    return backbone(None)[1]


def jsonl(tmp: Path, text: str, name="bad.jsonl", raw: bytes | None = None) -> Path:
    path = tmp / name
    path.write_bytes(raw if raw is not None else (text + "\n").encode())
    return path


def load_data(path, vocab=None):
    from moss.data import load_jsonl

    return load_jsonl(path, vocab or _vocab())


A = '{"role": "assistant", "type": "text", "text": "ok"}'


def records(input: str, fragment: str, *lines: str):
    """A row of JSONL lines that each fail with ``fragment``."""
    error(DATA, input, ValueError, fragment,
          *[lambda tmp, line=line: load_data(jsonl(tmp, line)) for line in lines])


error(DATA, "`path` not a path (None)", TypeError,
      "data: expected a file path (str or os.PathLike), got NoneType", lambda: load_data(None))
error(DATA, "a file that does not exist", FileNotFoundError,
      "data: ... missing.jsonl does not exist",
      lambda tmp: load_data(tmp / "missing.jsonl"))
error(DATA, "a folder instead of a file", FileNotFoundError, "data: ... is not a file",
      lambda tmp: load_data(tmp))
error(DATA, "an empty file (or only blank lines)", ValueError,
      "data: ... bad.jsonl holds no records",
      lambda tmp: load_data(jsonl(tmp, "", raw=b"")), lambda tmp: load_data(jsonl(tmp, "  \n")))
error(DATA, "a line that is not UTF-8", ValueError,
      "bad.jsonl:1: not UTF-8 (invalid continuation byte",
      lambda tmp: load_data(jsonl(tmp, "", raw=b'{"segments": "caf\xe9"}\n')))
records("a line that is not JSON", "bad.jsonl:1: not valid JSON", "{not json")
records("a record that is not an object", "bad.jsonl:1: record: expected a JSON object", "[1, 2]")
records("`segments` missing, empty or not a list",
        "bad.jsonl:1 (id 'a'): segments: expected a non-empty list",
        '{"id": "a"}', '{"id": "a", "segments": []}', '{"id": "a", "segments": {"type": "text"}}')
records("a segment that is not an object", "segments[0]: expected an object", '{"segments": [1]}')
records("a segment `type` other than text / image",
        "segments[0].type: expected 'text' or 'image', got",
        '{"segments": [{"type": "video"}]}', '{"segments": [{"text": "a"}]}')
records("a `role` other than user / assistant",
        "segments[0].role: expected 'user' or 'assistant', got 'bot'",
        '{"segments": [{"type": "text", "text": "a", "role": "bot"}]}')
records("`text` empty or not a str", "segments[0].text: expected a non-empty string",
        '{"segments": [{"type": "text", "text": ""}]}',
        '{"segments": [{"type": "text", "text": 5}]}')
records("`codes` of the wrong count, out of range (negative, >= codebook size) or not ints",
        "segments[0].codes: expected 16 ints (a 4 x 4 grid) in [0, 64)",
        *['{"segments": [{"type": "image", "codes": [%s]}]}' % ", ".join([first] + ["1"] * n)
          for first, n in [("1", 1), ("64", 15), ("-1", 15), ("1.0", 15), ("true", 15),
                           ("NaN", 15)]])
records("an image with neither `codes` nor `path`",
        "segments[0].codes: missing (give codes or a path)",
        '{"segments": [{"type": "image"}]}')
records("an image `path` that does not exist", "segments[0].path: ... cat.png does not exist",
        '{"segments": [{"type": "image", "path": "cat.png"}]}')
records("no assistant segment (nothing to learn)", "segments: no assistant segment to learn from",
        '{"segments": [{"type": "text", "text": "a"}]}')


@behaviour(DATA, "an image `path` that is a folder, or not an image",
           "`ValueError`: `segments[0].path: ... is not a file` / "
           "`... could not be read as an image`")
def _not_an_image(tmp):
    (tmp / "img").mkdir()
    (tmp / "fake.png").write_text("not a png")
    for path, what in [("img", "is not a file"), ("fake.png", "could not be read as an image")]:
        line = '{"segments": [{"type": "image", "path": "%s"}, %s]}' % (path, A)
        with pytest.raises(ValueError, match=f"segments\\[0\\].path: .*{what}"):
            load_data(jsonl(tmp, line))


error(DATA, "an image `path` on a backbone without a VQ tokenizer", ValueError,
      "segments[0].path: this backbone has no VQ tokenizer; give codes",
      lambda tmp: load_data(jsonl(tmp,
                                  '{"segments": [{"type": "image", "path": "a.png"}, %s]}' % A),
                            dataclasses.replace(_vocab(), encode_image_file=None)))


def _collate_nothing():
    from moss.data import collate

    collate([], 0)


error(DATA, "`collate` of no examples", ValueError,
      "examples: expected at least one Example to batch",
      _collate_nothing)


# ============================================================================ command line
CLI = "the `moss` command line"


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``(exit status, message)`` of a command that must exit (in this process)."""
    from moss.cli import main

    err = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    code = info.value.code
    return (1, code) if isinstance(code, str) else (code, err.getvalue())


def cli(input: str, status: int, fragment: str, *argvs, skip_if: bool = False, why: str = ""):
    """Commands that exit with ``status`` and ``fragment`` in their message, no traceback; an
    argv is a list, or ``f(tmp_path) -> list``."""
    def check(tmp):
        if skip_if:
            pytest.skip(why)
        for argv in argvs:
            got, message = run_cli(argv(tmp) if callable(argv) else argv)
            assert got == status and contains(message, fragment), (got, message)

    ROWS.append(Row(CLI, input, f"exits {status}: `{fragment}`", check))


GPU = torch.cuda.is_available()

cli("`moss` (no command)", 2, "moss: error: the following arguments are required: command", [])
cli("`moss nope`", 2, "moss: error: argument command: invalid choice: 'nope'", ["nope"])
cli("`moss info --x`", 2, "moss: error: unrecognized arguments: --x", ["info", "--x"])
cli("`moss bench --tokens abc`", 2,
    "moss bench: error: argument --tokens: invalid int value: 'abc'",
    ["bench", "--tokens", "abc"])
cli("`moss bench --case nope`", 2, "moss bench: error: argument --case: invalid choice: 'nope'",
    ["bench", "--case", "nope"])
cli("`moss bench --tokens 0`", 1, "moss bench: --tokens must be >= 1, got 0",
    ["bench", "--tokens=0"])
cli("`moss bench --grid 0 3`", 1, "moss bench: --grid must be >= 1, got (0, 3)",
    ["bench", "--grid", "0", "3"])
cli("`moss bench --image-fraction 2` (or nan)", 1,
    "moss bench: --image-fraction must be in [0, 1], got",
    ["bench", "--image-fraction=2"], ["bench", "--image-fraction=nan"])
cli("`moss bench --reps 0` (or `--warmup -1`)", 1,
    "moss bench: --reps must be >= 1 and --warmup >= 0",
    ["bench", "--reps=0"], ["bench", "--warmup=-1"])
cli("`moss bench --device gpu`", 1, "moss bench: --device must be cpu or cuda[:index], got 'gpu'",
    ["bench", "--device", "gpu"])
cli("`moss bench --device cuda` without a GPU", 1,
    "moss bench: --device cuda: no CUDA GPU is visible",
    ["bench", "--device", "cuda"], skip_if=GPU, why="a GPU is visible")


@behaviour(CLI, "`moss bench`, `train` or `experiment` with `--out` an existing file",
           "exits 1: `moss <command>: --out: ... is a file, not a folder`")
def _out_is_a_file(tmp):
    afile = jsonl(tmp, "x", "afile")
    for command in ("bench", "train", "experiment"):
        status, message = run_cli([command, "--out", str(afile)])
        assert status == 1 and contains(message, f"moss {command}: --out: ... afile is a file, "
                                                 f"not a folder"), message


cli("`moss train --steps abc`", 2, "moss train: error: argument --steps: invalid int value: 'abc'",
    ["train", "--steps", "abc"])
cli("`moss train --variant lora`", 2,
    "moss train: error: argument --variant: invalid choice: 'lora'",
    ["train", "--variant", "lora"])
cli("`moss train --backend fast`", 2,
    "moss train: error: argument --backend: invalid choice: 'fast'",
    ["train", "--backend", "fast"])
cli("`moss train --backend cuda` without a GPU", 1, "moss train: backend 'cuda' is not available",
    lambda tmp: ["train", "--backend", "cuda", "--out",
                 str(tmp)], skip_if=GPU, why="a GPU is visible")
cli("`moss train --steps 0`", 1, "moss train: --steps must be >= 1",
    lambda tmp: ["train", "--steps", "0", "--out", str(tmp)])
cli("`moss train --warmup -1`", 1, "moss train: --warmup must be >= 0, got -1",
    lambda tmp: ["train", "--warmup", "-1", "--out", str(tmp)])


@behaviour(CLI, "`moss train` with `--lr`, `--alpha` or `--max-grad-norm` 0, negative, NaN or Inf",
           "exits 1: `moss train: --<name> must be a finite number > 0, got <value>`")
def _train_floats(tmp):
    for name in ("lr", "alpha", "max-grad-norm"):
        for value in ("0", "-1", "nan", "inf"):
            status, message = run_cli(["train", f"--{name}", value, "--out", str(tmp)])
            assert status == 1 and f"moss train: --{name} must be a finite number > 0, got " \
                                   f"{float(value)}" in message, message


cli("`moss train --data bad.jsonl` (malformed)", 1, "moss train: ... bad.jsonl:1: not valid JSON",
    lambda tmp: ["train", "--data", str(jsonl(tmp, "{not json")), "--out", str(tmp)])
cli("`moss train --model nowhere/`", 1,
    "moss train: --model: ... nowhere is not a local checkpoint",
    lambda tmp: ["train", "--model", str(tmp / "nowhere"), "--out", str(tmp)])
cli("`moss train --resume` whose `latest` names a missing checkpoint", 1,
    "moss train --resume: path: ... checkpoint-9/moss_config.json does not exist", lambda tmp: [
        "train", "--resume", "--out", str(((tmp / "latest").write_text("checkpoint-9"), tmp)[1])])


@behaviour(CLI, "`moss train --data missing.jsonl`, run as a process",
           "exits 1: `moss train: data: ... missing.jsonl does not exist` on stderr, no traceback")
def _cli_process(tmp):
    done = subprocess.run([sys.executable, "-m", "moss", "train", "--data",
                           str(tmp / "missing.jsonl"),
                           "--out", str(tmp)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1, done.stderr
    assert contains(done.stderr, "moss train: data: ... missing.jsonl does not exist"), done.stderr
    assert "Traceback" not in done.stderr


cli("`moss generate` (no --adapter)", 2,
    "moss generate: error: the following arguments are required: "
    "--adapter", ["generate"])
cli("`moss generate --adapter nowhere/`", 1,
    "moss generate: path: ... nowhere/moss_config.json does not exist",
    lambda tmp: ["generate", "--adapter", str(tmp / "nowhere")])
cli("`moss generate --max-new-tokens 0`", 1, "moss generate: --max-new-tokens must be >= 1",
    lambda tmp: ["generate", "--adapter", str(tmp), "--max-new-tokens", "0"])
cli("`moss experiment --seeds 0`", 1, "moss experiment: --seeds must be >= 1",
    ["experiment", "--seeds", "0"])
cli("`moss experiment --seeds x`", 2,
    "moss experiment: error: argument --seeds: invalid int value: 'x'",
    ["experiment", "--seeds", "x"])


# ============================================================================ the tests
SHORT = {DATA: "data", CLI: "cli"}


def _id(row: Row) -> str:
    short = SHORT.get(row.entry, row.entry.split()[0])
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{short} {row.input}").strip("-")


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_row(row: Row, tmp_path):
    run(row.check, tmp_path)


def test_rows_are_distinct():
    ids = [_id(r) for r in ROWS]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def entries() -> list[str]:
    return list(dict.fromkeys(r.entry for r in ROWS))


def render(entry: str) -> str:
    lines = ["| input | what happens |", "|---|---|"]
    lines += [f"| {r.input} | {r.outcome} |" for r in ROWS if r.entry == entry]
    return "\n".join(lines)


BLOCK = re.compile(r"<!-- catalogue: (.+?) -->\n(.*?)\n<!-- /catalogue -->", re.S)


def test_the_doc_lists_exactly_these_rows():
    """docs/bad-inputs.md holds one table per entry point, equal to ROWS (regenerate with
    ``python tests/test_bad_inputs.py``)."""
    blocks = BLOCK.findall(DOC.read_text())
    assert [entry for entry, _ in blocks] == entries()
    for entry, table in blocks:
        assert table.splitlines() == render(entry).splitlines(), entry


def write_doc() -> None:
    text = DOC.read_text()
    missing = [e for e in entries() if f"<!-- catalogue: {e} -->" not in text]
    text += "".join(f"\n## {e}\n\n<!-- catalogue: {e} -->\n\n<!-- /catalogue -->\n"
                    for e in missing)
    text = BLOCK.sub(lambda m: f"<!-- catalogue: {m[1]} -->\n{render(m[1])}\n<!-- /catalogue -->"
                     if m[1] in entries() else "", text)
    DOC.write_text(text)


if __name__ == "__main__":
    write_doc()
