"""moss_decode, the incremental decode step (moss_kernels/decode.py): the CPU kernel against its
PyTorch specification, token-by-token decoding against the full-sequence op, torch.compile.
(Decoding through transformers' generate: tests/test_moss_model.py.)"""

from __future__ import annotations

import pytest
import torch

import moss_kernels as mk
from moss_kernels import _ext
from moss_kernels.decode import moss_decode, pack, reference_decode, ring_size

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"no moss_kernels._C: {_ext.load_error()}")
H, W = 4, 5


SCALES = (1.5, 0.5)


def _params(gen, d_in, d_out, r_t, r_i, k, dtype=torch.float64):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return dict(weight=rand(d_out, d_in, scale=d_in ** -0.5), bias=rand(d_out),
                text_A=rand(r_t, d_in, scale=d_in ** -0.5), text_B=rand(d_out, r_t),
                image_A=rand(r_i, d_in, k, k, scale=d_in ** -0.5), image_B=rand(d_out, r_i))


def _step(fn, p, x, ring, kind, pos):
    packed = pack(p["text_A"], p["text_B"], p["image_A"], p["image_B"], *SCALES)
    return fn(x, p["weight"], p["bias"], *packed, ring, kind, pos, W, p["text_A"].shape[0],
              p["image_A"].shape[2])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("r_t,r_i", [(3, 4), (0, 4), (3, 0)])
def test_cpu_kernel_is_the_specification(dtype, k, r_t, r_i, gen):
    """y and the updated ring, for a batch of text, image (every grid position, the first row
    and column included) and padding tokens over a ring of random past tap products."""
    b, d_in, d_out = 3 * H * W, 13, 11
    p = _params(gen, d_in, d_out, r_t, r_i, k)
    x = torch.randn(b, d_in, generator=gen, dtype=torch.float64)
    ring = torch.randn(b, ring_size(k, W), k * k * r_i, generator=gen, dtype=torch.float64)
    kind = torch.tensor([1, 0, -1], dtype=torch.int8).repeat_interleave(H * W)
    pos = torch.arange(H * W).repeat(3)
    want_ring = ring.clone()
    want = _step(reference_decode, p, x, want_ring, kind, pos)
    got_ring = ring.to(dtype)
    got = _step(torch.ops.moss._ext_decode, {n: v.to(dtype) for n, v in p.items()}, x.to(dtype),
                got_ring, kind, pos)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-2}[dtype]  # y ~ O(3)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_ring.double(), want_ring, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_decoding_token_by_token_is_the_full_forward(k, gen):
    """Two sequences (one left-padded by 3) with text, a whole H x W image and more text,
    decoded one token per step from an empty ring: each step's y is the full op's row."""
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
                          p["image_A"], p["image_B"], *SCALES)
    ring = torch.zeros(2, ring_size(k, W), k * k * 4, dtype=torch.float64)
    for t in range(routes.shape[1]):
        kind = routes[:, t].to(torch.int8)
        pos = (t - torch.tensor(starts)).clamp(0, H * W - 1)
        y = _step(moss_decode, p, x[:, t], ring, kind, pos)
        real = kind >= 0
        torch.testing.assert_close(y[real], full[real, t], rtol=1e-12, atol=1e-12)


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
def test_decode_compiles_once_for_every_step(gen):
    """fullgraph, and the second step (other positions, other kinds) without a recompile."""
    torch._dynamo.reset()
    p = _params(gen, 8, 6, 2, 3, 2, torch.float32)
    compiled = torch.compile(lambda *a: _step(moss_decode, p, *a), fullgraph=True, dynamic=False)
    ring_e = torch.randn(2, ring_size(2, W), 12, generator=gen)
    ring_c = ring_e.clone()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kind, pos in [([1, 0], [6, 0]), ([0, 1], [0, 7])]:
            x = torch.randn(2, 8, generator=gen)
            kind, pos = torch.tensor(kind, dtype=torch.int8), torch.tensor(pos)
            want = _step(moss_decode, p, x, ring_e, kind, pos)
            torch.testing.assert_close(compiled(x, ring_c, kind, pos), want)
            torch.testing.assert_close(ring_c, ring_e)


@needs_ext
def test_cpu_kernel_names_bad_arguments(gen):
    p = _params(gen, 8, 6, 2, 3, 2, torch.float32)
    x, ring = torch.randn(2, 8), torch.zeros(2, ring_size(2, W), 12)
    kind, pos = torch.tensor([1, 0], dtype=torch.int8), torch.tensor([3, 0])
    for bad, match in [
        (dict(kind=kind.long()), "kind: expected a contiguous int8"),
        (dict(pos=pos.int()), "pos: expected a contiguous int64"),
        (dict(ring=ring[:, :, :5]), r"ring: expected a contiguous \[2, S, 12\]"),
        (dict(pos=pos[:1]), r"pos: expected a contiguous int64 \[2\]"),
        (dict(x=x.double()), "x's dtype"),
    ]:
        args = dict(x=x, ring=ring, kind=kind, pos=pos) | bad
        with pytest.raises(RuntimeError, match=match):
            _step(torch.ops.moss._ext_decode, p, args["x"], args["ring"], args["kind"],
                  args["pos"])
