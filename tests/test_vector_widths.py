"""The ``cpu`` backend's kernels at both vector widths (csrc/cpu/simd.h): each ISA clone runs the
kernels compiled for its width (64 bytes with AVX-512, 32 with AVX2 and elsewhere), so a machine
runs only one of them unless the tests set the other. Both must match the float64 reference:
forward and backward through LoRA dropout, and the decode step, on sizes with partial vectors
and every tile shape. (Every sum runs in the same order at both widths, but the compiler may
fuse a multiply-add in one width's code and not the other's: they agree to rounding, not always
bit for bit.)"""

from __future__ import annotations

import pytest
import torch

from moss_kernels import _ext
from moss_kernels.decode import moss_decode, pack, reference_decode, ring_dtype, ring_size

from helpers import TOLERANCE, check_backend, make_params, random_layout, rel_err

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
@pytest.mark.parametrize("seed,d_in,d_out,r_t,r_i,k,separate", [
    (0, 37, 70, 5, 3, 3, False),  # partial vectors at both widths, few tiles
    # every tile shape (image route: 52 rank-space columns), tails; the adapters' own input
    # (the backward's dx_adapter: an expand that stores), without dropout
    (3, 150, 131, 17, 13, 2, True),
])
def test_both_widths_match_the_reference(dtype, seed, d_in, d_out, r_t, r_i, k, separate):
    layout = random_layout(seed, p_image=0.7)
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen, layout.n, d_in, d_out, r_t, r_i, k, x_adapter=separate)
    dropout = 0.0 if separate else 0.25  # (dropout is applied to x only)
    for width in WIDTHS:
        at_width(width, lambda: check_backend(layout, k, True, params, dtype, "cpu",
                                              dropout=dropout))


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
    for bytes_ in WIDTHS:
        y, r = at_width(bytes_, lambda: step(lambda *a: moss_decode(*a, backend="cpu"), dtype))
        assert rel_err(y.double(), want) <= TOLERANCE[dtype]
        assert rel_err(r.double(), want_ring) <= TOLERANCE[dtype]
