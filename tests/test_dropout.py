"""lora_dropout and the moss::dropout op: the C++ kernel against its torch specification bit for
bit, the mask's statistics, the backward, seeding, torch.compile, and the layer using it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels import _ext
from moss_kernels.dropout import _hash_dropout, dropout

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"no moss_kernels._C: {_ext.load_error()}")
SEED = torch.tensor(0x1234_5678_9ABC_DEF, dtype=torch.int64)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 5), (1,), (7, 13), (3, 1000, 33), (2048, 512)])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_kernel_is_the_specification_bit_for_bit(dtype, shape, p):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.ops.moss._ext_dropout(x, SEED, p)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    assert torch.equal(got, _hash_dropout(x, SEED, p))


@needs_ext
def test_a_strided_input_is_masked_by_its_contiguous_index():
    x = torch.randn(40, 30, dtype=torch.float64)
    assert torch.equal(torch.ops.moss._ext_dropout(x.t(), SEED, 0.3),
                       _hash_dropout(x.t().contiguous(), SEED, 0.3))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_the_mask_keeps_one_minus_p_independently(p):
    n = 1 << 20
    y = _hash_dropout(torch.ones(n, dtype=torch.float64), SEED, p)
    keep = y != 0
    # kept elements scaled by 1 / (1 - p) exactly as F.dropout scales them
    assert torch.equal(y[keep], torch.full_like(y[keep], 1 / (1 - p)))
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    # neighbours (consecutive indices, and rows 512 apart) and the next seed are uncorrelated
    k = keep.double() - (1 - p)
    for a, b in [(k[:-1], k[1:]), (k[:-512], k[512:]),
                 (k, (_hash_dropout(torch.ones(n, dtype=torch.float64), SEED + 1, p) != 0)
                  .double() - (1 - p))]:
        corr = (a * b).mean() / (p * (1 - p))
        assert abs(corr.item()) < 5 / math.sqrt(n)


def test_backward_is_the_same_mask_and_gradcheck_holds():
    x = torch.randn(9, 11, dtype=torch.float64, requires_grad=True)
    y = dropout(x, SEED, 0.4)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, (y != 0).double() / 0.6)
    torch.autograd.gradcheck(lambda t: dropout(t, SEED, 0.4), (x,))
    torch.autograd.gradgradcheck(lambda t: dropout(t, SEED, 0.4), (x,))


def test_opcheck():
    for x in (torch.randn(6, 5), torch.randn(5, 6).t(), torch.randn(4, 3, dtype=torch.float64)):
        torch.library.opcheck(dropout, (x.requires_grad_(), SEED, 0.25))


def test_lora_dropout_follows_torch_manual_seed_and_is_identity_when_off():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    a = mk.lora_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, mk.lora_dropout(x, 0.2))
    assert not torch.equal(a, mk.lora_dropout(x, 0.2))  # the next call draws a new seed
    assert mk.lora_dropout(x, 0.0) is x and mk.lora_dropout(x, 0.5, training=False) is x


def test_the_op_without_a_kernel_for_the_dtype_is_the_specification():
    x = torch.randn(40, 30, dtype=torch.float16)
    assert torch.equal(dropout(x, SEED, 0.3), _hash_dropout(x, SEED, 0.3))


def test_lora_dropout_falls_back_to_f_dropout_where_the_op_has_no_kernel():
    x = torch.randn(64, 32, dtype=torch.float16)  # not a dtype of the CPU kernel
    torch.manual_seed(5)
    got = mk.lora_dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(got, F.dropout(x, 0.3))


def test_lora_dropout_compiles_without_graph_breaks():
    def f(x):
        return mk.lora_dropout(x, 0.1).square().sum()

    x = torch.randn(33, 17, requires_grad=True)
    out = torch.compile(f, fullgraph=True)(x)
    out.backward()
    kept = x.grad != 0
    assert torch.allclose(x.grad[kept], 2 * x[kept].detach() / 0.9 ** 2)
    assert 0.8 < kept.double().mean().item() < 0.98
