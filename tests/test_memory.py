"""Memory: what the backward keeps, and the peak of a forward + backward, on every backend.

What the backward needs, and so all that it saves (linear.py's autograd, shared by every
backend): x (for dA and dW), the frozen weight (for dx) and the four adapter matrices (Bcat for
dz, A_all for dx), all without a copy; the plan's ``route`` and ``nbr_t`` (to mask and gather
dz into dP); and one new tensor, z ``[N, R_t + R_i]`` in the accumulation dtype (fp32 for half
inputs: dB = dy^T z), R / D_in the size of x. Not the tap products P ``[N, R_t + K^2 R_i]``
(the backward needs dP, which is gathered from dz, not P), not ``nbr``, the bias or y. With an
``x_adapter`` it keeps that instead of x, and x only if dW needs it; with LoRA dropout
(``adapter_dropout``) x and the mask, packed in bits (1/32 of an fp32 x).

The peak is measured with :func:`moss_kernels.memory.cpu_peak_bytes` (the profiler's allocator
events), the same function ``moss bench`` reports on CPUs.
"""

import gc

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.memory import cpu_peak_bytes
from moss_kernels.reference import accumulation_dtype

from helpers import ADAPTERS, CPU_BACKENDS, PARAMS, Layout, make_params

D_IN, D_OUT, R, K = 24, 96, 16, 2  # K^2 R + R = 80 tap-product columns, wider than x


def _layout() -> Layout:
    """Text runs, padding and 9 x 11 images, the last one partial: 250 tokens."""
    route, images = [], []
    while len(route) < 250:
        route += [0] * 37 + [-1] * 3
        present = min(99, 250 - len(route))
        images.append((len(route), 9, 11, present))
        route += [1] * present
    return Layout((len(route),), route, images)


LAYOUT = _layout()
PLAN = mk.RoutingPlan.from_spans(LAYOUT.route_tensor(), LAYOUT.spans(), kernel_size=K)


CASES = [(b, d) for b in CPU_BACKENDS for d in (torch.float32, torch.float16, torch.bfloat16)
         if backends.backend(b).supports(d)]


def _leaves(dtype):
    p = make_params(torch.Generator().manual_seed(0), LAYOUT.n, D_IN, D_OUT, R, R, K)
    return {n: v.to(dtype).requires_grad_(n != "weight") for n, v in p.items()}


def _forward(leaves, backend, dropout=0.0):
    return mk.moss_linear(*(leaves[n] for n in PARAMS[:3]), PLAN, *(leaves[n] for n in ADAPTERS),
                          1.5, 0.5, backend=backend, x_adapter=leaves.get("x_adapter"),
                          adapter_dropout=dropout)


def _saved(backend, dtype, leaves=None, dropout=0.0):
    """The tensors autograd keeps for the backward, and the leaves they came from."""
    leaves, saved = leaves or _leaves(dtype), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _forward(leaves, backend, dropout)
    return saved, leaves


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("backend,dtype", CASES)
def test_backward_saves_only_what_it_needs(backend, dtype):
    saved, leaves = _saved(backend, dtype)
    inputs = _storages([leaves[n] for n in PARAMS if n != "bias"] + [PLAN.route, PLAN.nbr_t])
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert len(new) == 1, [tuple(t.shape) for t in new]
    assert new[0].shape == (LAYOUT.n, 2 * R) and new[0].dtype == accumulation_dtype(dtype)
    assert set(_storages(saved)) == set(inputs) | set(_storages(new))
    ref_saved, _ = _saved("reference", dtype)
    assert sum(_storages(saved).values()) <= sum(_storages(ref_saved).values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", [True, False])
def test_with_an_adapter_input_x_is_kept_only_for_dw(backend, frozen):
    """LoRA dropout on a frozen layer keeps one N x D_in tensor, as without dropout: the
    adapters' input (their gradients read it), not x (only dW would)."""
    leaves = _leaves(torch.float32)
    leaves["weight"].requires_grad_(not frozen)
    leaves["x_adapter"] = torch.nn.functional.dropout(leaves["x"], 0.5)
    saved, _ = _saved(backend, torch.float32, leaves)
    kept = _storages(saved)
    assert leaves["x_adapter"].untyped_storage().data_ptr() in kept
    assert (leaves["x"].untyped_storage().data_ptr() in kept) == (not frozen)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_with_dropout_only_the_packed_mask_is_kept_beside_x(backend):
    """adapter_dropout keeps what the layer without it keeps, plus the mask in bits: nothing of
    x's size (no dropped-out copy of x)."""
    saved, leaves = _saved(backend, torch.float32, dropout=0.3)
    plain, _ = _saved(backend, torch.float32, leaves)
    extra = sum(_storages(saved).values()) - sum(_storages(plain).values())
    assert extra == LAYOUT.n * 8  # one 64-bit word a row for D_IN = 24
    assert leaves["x"].untyped_storage().data_ptr() in _storages(saved)


@pytest.fixture
def prompt_frees(monkeypatch):
    """The Triton interpreter leaves every launch's arguments in a reference cycle (a recursive
    closure over its storage table), so on CPU they would live until a cycle collection, and
    cpu_peak_bytes, which pauses the collector, would count them to the end of the call. A
    collection after each launch frees them where a GPU launch would."""
    from triton.runtime import interpreter

    launch = interpreter.GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect()

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch_then_collect)


def _peak(backend, dtype):
    leaves = _leaves(dtype)
    dy = torch.randn(LAYOUT.n, D_OUT, generator=torch.Generator().manual_seed(1)).to(dtype)

    def step():
        _forward(leaves, backend).backward(dy)

    step()  # warm-up: one-time setup is not the op's memory
    for v in leaves.values():
        v.grad = None
    return cpu_peak_bytes(step)


@pytest.mark.parametrize("backend,dtype", [c for c in CASES if c[0] != "reference"])
def test_peak_memory_of_forward_backward_is_at_most_the_reference(backend, dtype, request):
    """No tolerance needed: measured here, the fused backends peak at 0.84x the reference
    (fp32, cpu and triton), 0.74x (fp16, triton) and 0.67x (bf16, cpu; the reference computes
    half types on fp32 copies of x, dy and the weights)."""
    if backends.backend(backend).emulated:
        request.getfixturevalue("prompt_frees")
    assert _peak(backend, dtype) <= _peak("reference", dtype)


def test_cpu_peak_bytes_counts_what_is_held():
    mb = 2**20
    keep = torch.empty(5 * mb, dtype=torch.uint8)  # held before: neither counted nor freed

    def pattern():
        a = torch.empty(mb, dtype=torch.uint8)
        b = torch.ones(2 * mb, dtype=torch.uint8)  # 3 MB held: the peak
        del a
        c = torch.zeros(mb // 2, dtype=torch.uint8)  # 2.5 MB
        del b, c
        return torch.empty(mb, dtype=torch.uint8)  # 1 MB, still held at the end

    assert cpu_peak_bytes(pattern) == 3 * mb
    x = torch.randn(256, 256)
    assert cpu_peak_bytes(lambda: x @ x) == 256 * 256 * 4
    del keep
