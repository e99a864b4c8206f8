"""Property-based tests (hypothesis): random layouts, ranks, windows and sizes on every backend
this machine has, forward and backward against the float64 reference. (NaN propagation is a
row of the bad-input catalogue, tests/test_bad_inputs_*.py.)

Profiles (tests/conftest.py): ``ci`` (default, bounded) and ``long``
(``HYPOTHESIS_PROFILE=long`` for manual runs).
"""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moss_kernels as mk  # noqa: E402
from moss_kernels import backends  # noqa: E402

from helpers import ADAPTERS, CPU_BACKENDS, PARAMS, make_params, random_layout, within_tolerance  # noqa: E402


def _run(layout, k, causal, params, dtype, backend):
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     causal=causal, cu_seqlens=layout.cu_seqlens)
    leaves = {n: v.detach().to(dtype).requires_grad_() for n, v in params.items()}
    y = mk.moss_linear(*(leaves[n] for n in PARAMS[:3]), plan, *(leaves[n] for n in ADAPTERS),
                       1.5, 0.5, backend=backend)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
    return {"y": y.detach(), **{n: v.grad for n, v in leaves.items()}}


@given(seed=st.integers(0, 10_000), k=st.integers(1, 3), causal=st.booleans(),
       r_t=st.integers(0, 6), r_i=st.integers(0, 6), d_in=st.integers(1, 24),
       d_out=st.integers(1, 24), p_image=st.floats(0.0, 1.0), p_pad=st.floats(0.0, 0.4))
def test_every_backend_matches_float64(seed, k, causal, r_t, r_i, d_in, d_out, p_image, p_pad):
    layout = random_layout(seed, p_image=p_image * (1 - p_pad), p_pad=p_pad)
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen, layout.n, d_in, d_out, r_t, r_i, k)
    want = _run(layout, k, causal, params, torch.float64, "reference")
    ref32 = _run(layout, k, causal, params, torch.float32, "reference")
    for backend in CPU_BACKENDS:
        if not backends.backend(backend).supports(torch.float32):
            continue
        got = _run(layout, k, causal, params, torch.float32, backend)
        for name, value in got.items():
            assert within_tolerance(value, ref32[name], want[name], torch.float32), (backend, name)

