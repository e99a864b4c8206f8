"""moss_decode, the incremental decode step (moss_kernels/decode.py): every backend against its
PyTorch specification (on this machine's device: without a GPU, ``cpu``, ``cuda-emulated`` and
``triton`` interpreted), token-by-token decoding against the full-sequence op, torch.compile,
CUDA graph capture (with a GPU). Decoding through transformers' generate:
tests/test_moss_model.py; every write of the CUDA kernel exactly once: tests/test_emulated.py."""

from __future__ import annotations

import pytest
import torch

import moss_kernels as mk
from moss_kernels import _ext, backends
from moss_kernels.decode import moss_decode, pack, reference_decode, ring_dtype, ring_size

from helpers import DEVICE, FUSED, GPU, NATIVE, TOLERANCE, rel_err

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"no moss_kernels._C: {_ext.load_error()}")
H, W = 4, 5


SCALES = (1.5, 0.5)


def _params(gen, d_in, d_out, r_t, r_i, k, dtype=torch.float64):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return dict(weight=rand(d_out, d_in, scale=d_in ** -0.5), bias=rand(d_out),
                text_A=rand(r_t, d_in, scale=d_in ** -0.5), text_B=rand(d_out, r_t),
                image_A=rand(r_i, d_in, k, k, scale=d_in ** -0.5), image_B=rand(d_out, r_i))


def _step(fn, p, x, ring, kind, pos, width=W):
    packed = pack(p["text_A"], p["text_B"], p["image_A"], p["image_B"], *SCALES)
    if isinstance(width, int):
        width = torch.full((x.shape[0],), width, device=x.device)
    return fn(x, p["weight"], p["bias"], *packed, ring, kind, pos, width, p["text_A"].shape[0],
              p["image_A"].shape[2])


CASES = [(b, d) for b in FUSED for d in (torch.float64, torch.float32, torch.float16,
                                          torch.bfloat16) if backends.backend(b).supports(d)]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("r_t,r_i", [(3, 4), (0, 4), (3, 0), (17, 33)])
@pytest.mark.parametrize("d_in,d_out", [(13, 11), (100, 300)])
def test_every_backend_is_the_specification(backend, dtype, k, r_t, r_i, d_in, d_out, gen):
    """y and the updated ring, for a batch of text, image (every grid position, the first row
    and column included) and padding tokens over a ring of random past tap products; ranks
    over a Triton rank block (16) included; sizes under one vector, and over several vectors
    with a partial one (the CPU kernels' whole-vector and tail paths, and their rows and
    outputs shared out over threads)."""
    b = 3 * H * W
    p = _params(gen, d_in, d_out, r_t, r_i, k)
    x = torch.randn(b, d_in, generator=gen, dtype=torch.float64)
    ring = torch.randn(b, ring_size(k, W), k * k * r_i, generator=gen, dtype=torch.float64)
    kind = torch.tensor([1, 0, -1], dtype=torch.int8).repeat_interleave(H * W)
    pos = torch.arange(H * W).repeat(3)
    want_ring = ring.to(ring_dtype(dtype)).double()  # what the backend starts from
    want = _step(reference_decode, p, x, want_ring, kind, pos)
    got_ring = ring.to(DEVICE, ring_dtype(dtype))
    on = {n: v.to(DEVICE, dtype) for n, v in p.items()}
    got = _step(lambda *a: moss_decode(*a, backend=backend), on, x.to(DEVICE, dtype), got_ring,
                kind.to(DEVICE), pos.to(DEVICE))
    assert got.dtype == dtype and got_ring.dtype == ring_dtype(dtype)
    assert rel_err(got.cpu(), want) <= TOLERANCE[dtype]  # (of the largest |value|)
    assert rel_err(got_ring.cpu(), want_ring) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_decoding_token_by_token_is_the_full_forward(backend, k, gen):
    """Two sequences (one left-padded by 3) with text, a whole H x W image and more text,
    decoded one token per step from an empty ring: each step's y is the full op's row (float32
    on backends without float64)."""
    d_in, d_out = 9, 7
    p = _params(gen, d_in, d_out, 3, 4, k)
    route = [0, 0] + [1] * (H * W) + [0, 0]
    routes = torch.tensor([route + [-1] * 3, [-1] * 3 + route])
    starts = [2, 5]
    n = routes.shape[1]  # image starts count in the flattened batch
    plan = mk.RoutingPlan.from_spans(routes, [(starts[0], H, W), (n + starts[1], H, W)],
                                     kernel_size=k)
    x = torch.randn(2, routes.shape[1], d_in, generator=gen, dtype=torch.float64)
    full = mk.moss_linear(x, p["weight"], p["bias"], plan, p["text_A"], p["text_B"],
                          p["image_A"], p["image_B"], *SCALES, backend="reference")
    dtype = torch.float64 if backends.backend(backend).supports(torch.float64) else torch.float32
    on = {n: v.to(DEVICE, dtype) for n, v in p.items()}
    ring = torch.zeros(2, ring_size(k, W), k * k * 4, dtype=dtype, device=DEVICE)
    for t in range(routes.shape[1]):
        kind = routes[:, t].to(DEVICE, torch.int8)
        pos = (t - torch.tensor(starts)).clamp(0, H * W - 1).to(DEVICE)
        y = _step(lambda *a: moss_decode(*a, backend=backend), on, x[:, t].to(DEVICE, dtype),
                  ring, kind, pos)
        real = (kind >= 0).cpu()
        assert rel_err(y.cpu()[real], full[real, t]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("k", [2, 3])
def test_separated_rows_and_per_sequence_widths_decode_as_the_full_forward(backend, k, gen):
    """Emu3's layout: each image row followed by separator tokens (text), images of different
    sizes in the batch (the decode op's width per sequence), the second one still being
    generated (its last row incomplete): token by token, each step's y is the row of the full
    op over a plan with row strides."""
    d_in, d_out = 9, 7
    p = _params(gen, d_in, d_out, 3, 4, k)
    # (text before, H, W, separators per row, rows present as grid positions, text after)
    shapes = [(2, 3, 4, 1, 12, 2), (1, 2, 5, 2, 8, 0)]
    rows, spans, grids = [], [], []
    for before, h, w, sep, present, after in shapes:
        route, grid = [0] * before, []
        for g in range(present):
            grid.append((g, len(route)))
            route += [1] + [0] * sep * ((g + 1) % w == 0)
        rows.append(route + [0] * after)
        spans.append((before, h, w, w + sep))
        grids.append(dict((t, g) for g, t in grid))
    n = max(map(len, rows))
    routes = torch.tensor([r + [-1] * (n - len(r)) for r in rows])
    plan = mk.RoutingPlan.from_spans(routes, [(b * n + s, h, w, st) for b, (s, h, w, st)
                                              in enumerate(spans)], kernel_size=k)
    x = torch.randn(2, n, d_in, generator=gen, dtype=torch.float64)
    full = mk.moss_linear(x, p["weight"], p["bias"], plan, p["text_A"], p["text_B"],
                          p["image_A"], p["image_B"], *SCALES, backend="reference")
    dtype = torch.float64 if backends.backend(backend).supports(torch.float64) else torch.float32
    on = {name: v.to(DEVICE, dtype) for name, v in p.items()}
    widths = torch.tensor([w for _, _, w, _ in spans], device=DEVICE)
    ring = torch.zeros(2, ring_size(k, int(widths.max())), k * k * 4, dtype=dtype, device=DEVICE)
    for t in range(n):
        kind = routes[:, t].to(DEVICE, torch.int8)
        pos = torch.tensor([g.get(t, 0) for g in grids], device=DEVICE)
        y = _step(lambda *a: moss_decode(*a, backend=backend), on, x[:, t].to(DEVICE, dtype),
                  ring, kind, pos, widths)
        real = (kind >= 0).cpu()
        assert rel_err(y.cpu()[real], full[real, t]) <= TOLERANCE[dtype], t


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_a_row_major_b_cat_gives_the_same_step(backend, gen):
    """pack() makes b_cat column-major (what the CPU step reads without a copy); a caller's
    row-major one is the same adapter."""
    p = {n: v.float() for n, v in _params(gen, 40, 70, 3, 4, 2).items()}
    x = torch.randn(3, 40, generator=gen)
    kind, pos = torch.tensor([1, 0, 1], dtype=torch.int8), torch.tensor([7, 0, 12])
    a_all, b_cat = pack(p["text_A"], p["text_B"], p["image_A"], p["image_B"], *SCALES)
    assert b_cat.t().is_contiguous()
    ring = torch.randn(3, ring_size(2, W), 16, generator=gen)
    on = [t.to(DEVICE) for t in (x, p["weight"], p["bias"], a_all)]
    got = []
    for b in (b_cat, b_cat.contiguous()):
        r = ring.to(DEVICE)
        got.append(moss_decode(*on, b.to(DEVICE), r, kind.to(DEVICE), pos.to(DEVICE), W, 3, 2,
                               backend=backend).cpu())
    torch.testing.assert_close(got[0], got[1])


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_a_layer_input_of_one_token_per_sequence_is_taken_as_it_comes(backend, gen):
    """x [B, 1, D_in] (a layer's input in plain decoding) gives y [B, 1, D_out], the step of
    its rows [B, D_in], and the same ring."""
    p = {n: v.float().to(DEVICE) for n, v in _params(gen, 40, 70, 3, 4, 2).items()}
    x = torch.randn(3, 40, generator=gen).to(DEVICE)
    kind = torch.tensor([1, 0, 1], dtype=torch.int8, device=DEVICE)
    pos = torch.tensor([7, 0, 12], device=DEVICE)
    ring = torch.randn(3, ring_size(2, W), 16, generator=gen).to(DEVICE)
    rings = [ring.clone(), ring.clone()]
    step = lambda *a: moss_decode(*a, backend=backend)  # noqa: E731
    rows = _step(step, p, x, rings[0], kind, pos)
    given = _step(step, p, x[:, None], rings[1], kind, pos)
    assert given.shape == (3, 1, 70)
    torch.testing.assert_close(given[:, 0], rows)
    torch.testing.assert_close(rings[1], rings[0])


def test_with_gradients_on_the_step_is_differentiable(gen):
    """The CPU kernel has no autograd: with gradients on, moss_decode runs the reference."""
    p = _params(gen, 8, 6, 2, 3, 2)
    a = p["image_A"].requires_grad_()
    ring = torch.randn(2, ring_size(2, W), 12, generator=gen, dtype=torch.float64)
    y = _step(moss_decode, p, torch.randn(2, 8, dtype=torch.float64), ring,
              torch.tensor([1, 1], dtype=torch.int8), torch.tensor([7, 12]))
    y.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


@needs_ext
def test_the_direct_cpu_binding_refuses_inputs_that_need_gradients(gen):
    """moss_kernels._C._decode_cpu (past the dispatcher, no autograd) refuses what would need a
    gradient instead of returning a y whose graph misses the adapters; without gradients on
    (generate) it runs."""
    import moss_kernels._C as C

    p = {n: v.float() for n, v in _params(gen, 8, 6, 2, 3, 2).items()}
    p["image_A"].requires_grad_()
    ring = torch.zeros(2, ring_size(2, W), 12)
    args = (torch.randn(2, 8), ring, torch.tensor([1, 1], dtype=torch.int8), torch.tensor([7, 3]))
    with pytest.raises(RuntimeError, match="has no autograd: with gradients, call .*moss_decode"):
        _step(C._decode_cpu, p, *args)
    with torch.no_grad():
        assert _step(C._decode_cpu, p, *args).shape == (2, 6)


@pytest.mark.parametrize("backend", FUSED)
def test_decode_compiles_once_for_every_step(backend, gen):
    """fullgraph through the op moss::decode, and the second step (other positions, other
    kinds) without a recompile."""
    torch._dynamo.reset()
    p = {n: v.to(DEVICE) for n, v in _params(gen, 8, 6, 2, 3, 2, torch.float32).items()}

    def step(*a):
        return _step(lambda *b: moss_decode(*b, backend=backend), p, *a)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    ring_e = torch.randn(2, ring_size(2, W), 12, generator=gen).to(DEVICE)
    ring_c = ring_e.clone()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kind, pos in [([1, 0], [6, 0]), ([0, 1], [0, 7])]:
            x = torch.randn(2, 8, generator=gen).to(DEVICE)
            kind = torch.tensor(kind, dtype=torch.int8, device=DEVICE)
            pos = torch.tensor(pos, device=DEVICE)
            want = step(x, ring_e, kind, pos)
            torch.testing.assert_close(compiled(x, ring_c, kind, pos), want)
            torch.testing.assert_close(ring_c, ring_e)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_opcheck(backend, gen):
    """The op torch.compile traces (moss::decode): schema (the ring mutated, nothing else),
    fake tensor, autograd registration, AOT dispatch."""
    from moss_kernels.decode import decode_op

    p = {n: v.to(DEVICE) for n, v in _params(gen, 8, 6, 2, 3, 2, torch.float32).items()}
    packed = pack(p["text_A"], p["text_B"], p["image_A"], p["image_B"], *SCALES)
    ring = torch.randn(2, ring_size(2, W), 12, generator=gen).to(DEVICE)
    kind = torch.tensor([1, 0], dtype=torch.int8, device=DEVICE)
    pos = torch.tensor([6, 0], device=DEVICE)
    x = torch.randn(2, 8, generator=gen).to(DEVICE)
    for given in (x, x[:, None]):  # [B, D_in], and a layer's [B, 1, D_in]
        torch.library.opcheck(decode_op, (given, p["weight"], p["bias"], *packed, ring, kind,
                                          pos, torch.full_like(pos, W), 2, 2, backend))


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", NATIVE)
def test_a_decode_step_is_captured_in_a_cuda_graph(backend, gen):
    """Captured once, replayed for steps at other positions and kinds (new values copied into
    the static inputs): the same y and ring as the eager reference, i.e. nothing in the step
    reads the data on the host or allocates differently per step."""
    p = {n: v.cuda() for n, v in _params(gen, 64, 48, 4, 8, 2, torch.float32).items()}
    b = 3
    x = torch.zeros(b, 64, device="cuda")
    kind = torch.zeros(b, dtype=torch.int8, device="cuda")
    pos = torch.zeros(b, dtype=torch.int64, device="cuda")
    width = torch.full((b,), W, device="cuda")
    ring = torch.zeros(b, ring_size(2, W), 4 * 8, device="cuda")
    want_ring = ring.clone()

    def step():
        return _step(lambda *a: moss_decode(*a, backend=backend), p, x, ring, kind, pos, width)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (Triton compiles, cuBLAS picks its kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    ring.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for t in range(H * W):
        x.copy_(torch.randn(b, 64, generator=gen))
        kind.copy_(torch.tensor([1, 0 if t % 3 else -1, 1], dtype=torch.int8))
        pos.copy_(torch.tensor([t, 0, (t * 7) % (H * W)]))
        graph.replay()
        want = _step(reference_decode, p, x, want_ring, kind, pos)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ring, want_ring, rtol=1e-4, atol=1e-4)


@needs_ext
def test_kernels_name_bad_arguments(gen):
    """The C++ op (cpu) and the CPU step's direct binding (what decode_step calls) raise
    RuntimeErrors (the message alone, no C++ stack), moss_decode on the Python backends
    ValueErrors and TypeErrors, each naming the argument."""
    import moss_kernels._C as C

    p = _params(gen, 8, 6, 2, 3, 2, torch.float32)
    x, ring = torch.randn(2, 8), torch.zeros(2, ring_size(2, W), 12)
    kind, pos = torch.tensor([1, 0], dtype=torch.int8), torch.tensor([3, 0])
    for bad, match, error in [
        (dict(kind=kind.long()), "kind: expected a contiguous int8|kind: expected an int8",
         TypeError),
        (dict(pos=pos.int()), "pos: expected a contiguous int64|pos: expected an int64",
         TypeError),
        (dict(ring=ring[:, :, :5]), r"ring: expected a contiguous \[2, S, 12\]", ValueError),
        (dict(ring=ring[:, :W].contiguous()),
         r"ring: expected at least 7 slots \(ring_size for .*5\), got 5", ValueError),
        (dict(width=torch.tensor([W, W], dtype=torch.int32)),
         "width: expected (a contiguous )?(an )?int64 \\[2\\]", TypeError),
        (dict(width=torch.tensor([W, 0])), r"width(\[1\])?: expected (values )?>= 1",
         ValueError),
        (dict(ring=ring.double()), "ring: expected (Float|torch.float32) on cpu",
         TypeError),
        (dict(pos=pos[:1]), r"pos: expected a contiguous int64 \[2\]|pos: expected an int64 "
                            r"\[2\]", TypeError),
        (dict(x=x.double()), "x's dtype", TypeError),
    ]:
        args = dict(x=x, ring=ring, kind=kind, pos=pos, width=W) | bad
        call = (args["x"], args["ring"], args["kind"], args["pos"], args["width"])
        with pytest.raises(RuntimeError, match=match):
            _step(torch.ops.moss._ext_decode, p, *call)
        with pytest.raises(RuntimeError, match=match) as raised:
            _step(C._decode_cpu, p, *call)
        assert "Exception raised from" not in str(raised.value)
        with pytest.raises(error, match=match):
            _step(lambda *a: moss_decode(*a, backend="reference"), p, *call)
