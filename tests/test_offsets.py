"""Index arithmetic past 2^31 elements, tested without allocating them.

``x`` and ``dy`` are 17-row views with a row stride S, so their last row starts 16S elements
after their first: past 2^31 with S below it (an int32 kernel argument whose product with a
row index overflows int32), and past 2^32 with S above it (Triton passes an int in
[2^31, 2^32) as uint32, whose products wrap at 2^32). 17 rows, so that a GEMM reducing over the
tokens (dA = dP^T x, dB = dy^T z) takes a second K step in the interpreter's BLOCK_K = 16: the
step is BLOCK_K row strides, past 2^31 too (it was an int32 product once). The views lie over a
sparse file mapped with ``torch.from_file``: only the pages touched become resident or reach the
disk, so a 137 GB view costs a few KB.

Every backend this machine has runs the ops directly, forward and backward, so that the
strided ``dy`` reaches the backward as given (through autograd it is made contiguous first),
and must match float64 on contiguous copies. What this reaches: the Triton kernels read x and
dy through their strides, so their own offset arithmetic is what is checked (it found the GEMM's
K offsets in int32, overflowing for dy^T), and so do the C++ CPU kernels for x (the tap
products and dA read x's rows through its row stride, csrc/cpu/rank_kernels.h; dy is made
contiguous first). The reference hands x and dy to ATen GEMMs: for it this checks that such
views are accepted and read correctly, the offsets being ATen's. Each case runs twice: the
adapters reading x, and reading the same view passed as their own input (``x_adapter``).
"""

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.linear import linear_bwd, linear_fwd

from helpers import ADAPTERS, CPU_BACKENDS, Layout, make_params, within_tolerance

D_IN, D_OUT = 7, 5
# Text, a 3 x 4 image (each token reads its upper and left neighbours), text.
LAYOUT = Layout((17,), [0] * 4 + [1] * 12 + [0], [(4, 3, 4, 12)])
SCALES = (0.5, 2.0)
CASES = [(b, d) for b in CPU_BACKENDS for d in (torch.float32, torch.float16)
         if backends.backend(b).supports(d)]


def _ops(x, dy, p, plan, backend, separate):
    """(y, dx, dW, db, dx_adapter, dA_t, dB_t, dA_i, dB_i) from the ops, as given (no copies);
    ``separate``: x is also passed as x_adapter, so the adapters read it as their own input."""
    adapters = [p[n] for n in ADAPTERS]
    x_adapter = x if separate else None
    y, z = linear_fwd(x, p["weight"], p["bias"], x_adapter, *adapters, plan.route, plan.nbr,
                      plan.nbr_t, *SCALES, backend)
    grads = linear_bwd(dy, x, p["weight"], x_adapter, *adapters, z, plan.route, plan.nbr_t,
                       *SCALES, True, True, True, separate, backend)
    return (y, *grads)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("stride", [2**30 + 7, 2**31 + 13])
@pytest.mark.parametrize("separate", [False, True])
def test_strided_views_past_2_to_the_31_elements(stride, separate, backend, dtype, gen,
                                                 tmp_path):
    n = LAYOUT.n
    plan = mk.RoutingPlan.from_spans(LAYOUT.route_tensor(), LAYOUT.spans(), kernel_size=2)
    p = make_params(gen, n, D_IN, D_OUT, 2, 3, 2)
    dy64 = torch.randn(n, D_OUT, generator=gen, dtype=torch.float64)
    path = tmp_path / "sparse.bin"
    numel = (n - 1) * stride + D_IN + D_OUT  # row i: x at i * stride, dy right after it
    with open(path, "wb") as f:
        f.truncate(numel * dtype.itemsize)
    try:
        storage = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        x = storage.as_strided((n, D_IN), (stride, 1))
        dy = storage.as_strided((n, D_OUT), (stride, 1), D_IN)
        x.copy_(p["x"])
        dy.copy_(dy64)
        assert x.stride(0) * (n - 1) >= 2**31 and x.storage_offset() == 0
        params = {k: v.to(dtype) for k, v in p.items()}
        got = _ops(x, dy, params, plan, backend, separate)
        want = _ops(p["x"], dy64, p, plan, "reference", separate)
        ref = _ops(x.contiguous(), dy.contiguous(), params, plan, "reference", separate)
        for i, value in enumerate(got):
            assert value.dtype == dtype and value.shape == want[i].shape, i
            assert within_tolerance(value, ref[i], want[i], dtype), i
    finally:
        del storage, x, dy
        path.unlink()
