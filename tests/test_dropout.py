"""LoRA dropout's mask (moss_kernels/dropout.py): the C++ kernel against its torch specification
bit for bit, the packed format, the mask's statistics, seeding, torch.compile, and what
``moss_linear(adapter_dropout=p)`` does with it (tests/test_backends.py checks every backend
against the reference with it)."""

from __future__ import annotations

import math

import pytest
import torch

import moss_kernels as mk
from moss_kernels import _ext
from moss_kernels.dropout import _hash_keep, dropout_mask, hashed_mask, pack, packed_width, unpack

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"no moss_kernels._C: {_ext.load_error()}")
SEED = torch.tensor(0x1234_5678_9ABC_DEF, dtype=torch.int64)


@needs_ext
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1), (7, 13), (5, 64), (4, 65), (300, 130),
                                   (2048, 512)])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_kernel_is_the_specification_bit_for_bit(shape, p):
    x = torch.empty(shape)
    got = torch.ops.moss._ext_dropout_mask(x, SEED, p)
    assert got.dtype == torch.uint8 and got.shape == (shape[0], packed_width(shape[1]))
    assert torch.equal(got, pack(_hash_keep(x, SEED, p)))


def test_pack_and_unpack_are_inverse_and_pad_with_zero_bits():
    keep = torch.rand(9, 70, generator=torch.Generator().manual_seed(0)) < 0.5
    bits = pack(keep)
    assert bits.shape == (9, 16) and bits.dtype == torch.uint8
    assert torch.equal(unpack(bits, 70), keep)
    assert torch.equal(unpack(bits, 128)[:, 70:], torch.zeros(9, 58, dtype=torch.bool))
    # bit c % 8 of byte c // 8: column 10 is bit 2 of byte 1
    one = torch.zeros(1, 70, dtype=torch.bool)
    one[0, 10] = True
    assert pack(one)[0, 1].item() == 4 and pack(one).sum().item() == 4


def test_without_the_extension_the_op_is_the_specification(monkeypatch):
    monkeypatch.setattr(_ext, "loaded", lambda: False)
    x = torch.empty(40, 30)
    assert torch.equal(hashed_mask(x, SEED, 0.3), pack(_hash_keep(x, SEED, 0.3)))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_the_mask_keeps_one_minus_p_independently(p):
    n = 1 << 20
    keep = _hash_keep(torch.empty(1, n), SEED, p)[0]
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    # neighbours (consecutive indices, and rows 512 apart) and the next seed are uncorrelated
    k = keep.double() - (1 - p)
    other = _hash_keep(torch.empty(1, n), SEED + 1, p)[0].double() - (1 - p)
    for a, b in [(k[:-1], k[1:]), (k[:-512], k[512:]), (k, other)]:
        corr = (a * b).mean() / (p * (1 - p))
        assert abs(corr.item()) < 5 / math.sqrt(n)


def test_dropout_mask_follows_torch_manual_seed():
    x = torch.empty(64, 32)
    torch.manual_seed(3)
    a = dropout_mask(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, dropout_mask(x, 0.2))
    assert not torch.equal(a, dropout_mask(x, 0.2))  # the next call draws a new seed


def test_off_the_cpu_the_mask_is_bernoullis_packed():
    """The non-CPU branch (bernoulli_ then pack), on the meta device: shape and dtype."""
    bits = dropout_mask(torch.empty(5, 70, device="meta"), 0.3)
    assert bits.device.type == "meta" and bits.dtype == torch.uint8
    assert bits.shape == (5, packed_width(70))


def test_dropout_mask_refuses_bad_arguments():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        dropout_mask([[1.0]], 0.1)
    with pytest.raises(ValueError, match=r"x: expected \[N, D\]"):
        dropout_mask(torch.ones(3), 0.1)
    for p in (1.0, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="p: expected a probability in"):
            dropout_mask(torch.ones(2, 3), p)


def test_opcheck():
    for x in (torch.randn(6, 5), torch.randn(5, 70).t(), torch.randn(4, 3, dtype=torch.float64)):
        torch.library.opcheck(hashed_mask, (x, SEED, 0.25))


def test_moss_linear_with_dropout_compiles_without_graph_breaks():
    """The mask's seed is drawn inside the compiled graph; with Inductor's ``fallback_random``
    (its own random stream otherwise, as for F.dropout) from the same generator as eager."""
    plan = mk.RoutingPlan.from_spans(torch.tensor([0] * 5 + [1] * 12), [(5, 3, 4)])
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(17, 8, generator=g), torch.randn(6, 8, generator=g)
    adapters = (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g),
                torch.randn(3, 8, 2, 2, generator=g), torch.randn(6, 3, generator=g))

    def f(x):
        return mk.moss_linear(x, w, None, plan, *adapters, adapter_dropout=0.4).square().sum()

    grads = []
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (f, torch.compile(f, fullgraph=True)):
            leaf = x.clone().requires_grad_()
            torch.manual_seed(11)
            out = fn(leaf)
            out.backward()
            grads.append((out.detach(), leaf.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_zero_is_no_dropout_and_a_new_mask_is_drawn_per_call():
    plan = mk.RoutingPlan.from_spans(torch.tensor([0] * 4 + [1] * 6), [(4, 2, 3)])
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 8, generator=g), torch.randn(6, 8, generator=g)
    adapters = (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g),
                torch.randn(3, 8, 2, 2, generator=g), torch.randn(6, 3, generator=g))
    plain = mk.moss_linear(x, w, None, plan, *adapters)
    assert torch.equal(mk.moss_linear(x, w, None, plan, *adapters, adapter_dropout=0.0), plain)
    a, b = (mk.moss_linear(x, w, None, plan, *adapters, adapter_dropout=0.5) for _ in range(2))
    assert not torch.equal(a, b) and not torch.equal(a, plain)
