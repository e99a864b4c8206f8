"""The ``cpu`` backend's kernels at both vector widths (csrc/cpu/simd.h): each ISA clone runs the
kernels compiled for its width (64 bytes with AVX-512, 32 with AVX2 and elsewhere), so a machine
runs only one of them unless the tests set the other. Both must match the float64 reference,
and each other bit for bit (the tiles change, the order of every sum does not): forward and
backward through LoRA dropout, and the decode step (float32 and bfloat16 bit for bit), on sizes
with partial vectors and several tiles."""

from __future__ import annotations

import pytest
import torch

from moss_kernels import _ext
from moss_kernels.decode import moss_decode, pack, reference_decode, ring_dtype, ring_size

from helpers import TOLERANCE, check_backend, make_params, random_layout, rel_err, run_layer

pytestmark = pytest.mark.skipif(not _ext.loaded(),
                                reason=f"no moss_kernels._C: {_ext.load_error()}")
WIDTHS = (32, 64)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def at_width(bytes_, fn):
    """``fn()`` with the cpu kernels of ``bytes_``-byte vectors."""
    from moss_kernels import _C

    previous = _C._set_vector_bytes(bytes_)
    try:
        return fn()
    finally:
        _C._set_vector_bytes(previous)


def test_the_width_setting_is_checked_and_restored():
    from moss_kernels import _C

    with pytest.raises(ValueError, match="bytes: expected 32 or 64"):
        _C._set_vector_bytes(16)
    own = _C._set_vector_bytes(0)
    assert own in WIDTHS and _C._set_vector_bytes(0) == own


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,d_in,d_out,r_t,r_i,k", [
    (0, 37, 70, 5, 3, 3),  # partial vectors at both widths, one tile
    (3, 150, 131, 17, 9, 2),  # several tiles of every kernel (81 rank-space columns), tails
])
def test_both_widths_match_the_reference_and_each_other(dtype, seed, d_in, d_out, r_t, r_i, k):
    layout = random_layout(seed, p_image=0.7)
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen, layout.n, d_in, d_out, r_t, r_i, k)
    got = {}
    for width in WIDTHS:
        at_width(width, lambda: check_backend(layout, k, True, params, dtype, "cpu",
                                              dropout=0.25))
        got[width] = at_width(width, lambda: run_layer(layout, k, True, params, dtype, "cpu",
                                                       dropout=0.25))
    for name, value in got[32].items():
        assert torch.equal(value, got[64][name]), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_out,r_t,r_i,k", [(37, 70, 5, 3, 3), (150, 300, 17, 33, 2)])
def test_the_decode_step_at_both_widths(dtype, d_in, d_out, r_t, r_i, k):
    gen = torch.Generator().manual_seed(7)
    h, w = 4, 5
    b = 3 * h * w
    p = make_params(gen, b, d_in, d_out, r_t, r_i, k)
    x = p["x"]
    ring = torch.randn(b, ring_size(k, w), k * k * r_i, generator=gen, dtype=torch.float64)
    kind = torch.tensor([1, 0, -1], dtype=torch.int8).repeat_interleave(h * w)
    pos = torch.arange(h * w).repeat(3)
    width = torch.full((b,), w)

    def step(fn, dt):
        packed = pack(*(p[n].to(dt) for n in ("text_A", "text_B", "image_A", "image_B")),
                      1.5, 0.5)
        r = ring.to(ring_dtype(dt))
        y = fn(x.to(dt), p["weight"].to(dt), p["bias"].to(dt), *packed, r, kind, pos, width,
               r_t, k)
        return y, r

    want, want_ring = step(reference_decode, torch.float64)
    got = {}
    for bytes_ in WIDTHS:
        got[bytes_] = at_width(bytes_, lambda: step(
            lambda *a: moss_decode(*a, backend="cpu"), dtype))
        y, r = got[bytes_]
        assert rel_err(y.double(), want) <= TOLERANCE[dtype]
        assert rel_err(r.double(), want_ring) <= TOLERANCE[dtype]
    # The dot products are split over 64 bytes of lanes at both widths (csrc/cpu/decode_cpu.cpp:
    # dots), so float32 and bfloat16 come out the same. float64 rows with a partial vector
    # differed in the last bit on the AVX2 dev machine, where the 64-byte path is GCC's lowering
    # of a vector wider than the registers: equal within the tolerance above, not bit for bit.
    if dtype != torch.float64:
        assert all(torch.equal(a, b) for a, b in zip(got[32], got[64]))
