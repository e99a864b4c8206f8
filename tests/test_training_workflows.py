"""Training the way users train: gradient checkpointing, whole-model torch.compile, autocast.

Every check compares against the same model trained the plain way (eager, fp32, no
checkpointing), on the tiny Chameleon (image tokens found by id) and a tiny Llama given image
ids through MossConfig, with non-zero adapters so that every route contributes.
"""

from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moss_kernels as mk
from moss import MossConfig, get_moss_model
from moss_kernels import backends

from helpers import (
    ADAPTERS,
    BACKENDS,
    DEVICE,
    GRID,
    IMG,
    make_params,
    random_layout,
    run_layer,
    tiny_chameleon,
    tiny_llama,
    within_tolerance,
)

pytest.importorskip("transformers")


def batch():
    """Two sequences: text, a 3 x 3 image, text, a partial image; left padding on the second."""
    a = [1, 7, 8] + IMG[:9] + [9, 10] + IMG[9:13]
    b = [0, 0, 0, 0, 11, 12] + IMG[13:22] + [13, 14, 15]
    ids = torch.tensor([a, b])
    mask = torch.tensor([[1] * len(a), [0] * 4 + [1] * (len(b) - 4)])
    return ids, mask


def adapted(backbone, seed=0, scale=0.3, **cfg):
    """A MOSS model in training mode with random (non-zero) adapters."""
    base = {"chameleon": tiny_chameleon, "llama": tiny_llama}[backbone](seed=seed)
    cfg = MossConfig(r_text=4, r_image=4, image_grid=GRID, **(
        {} if backbone == "chameleon" else {"image_token_ids": IMG}), **cfg)
    moss = get_moss_model(base, cfg, image_logits=True).train()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in moss.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return moss


def loss_and_grads(moss, ids, mask, step=None):
    """One training step's loss and adapter gradients (``step`` runs forward + backward)."""
    moss.zero_grad(set_to_none=True)
    if step is None:  # no KV cache: a layer re-run by checkpoint_wrapper would append twice
        loss = moss(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
    else:
        loss = step(ids, mask)
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()  # checkpoint_wrapper's
             for n, p in moss.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def assert_same(got, want, tol=1e-6):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    torch.testing.assert_close(loss_g, loss_w, rtol=tol, atol=tol)
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        torch.testing.assert_close(grads_g[name], grads_w[name], rtol=tol, atol=tol, msg=name)


# ---------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("backbone", ["chameleon", "llama"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing_gives_the_same_gradients(backbone, reentrant):
    ids, mask = batch()
    moss = adapted(backbone, dropout=0.1)  # dropout: the recomputation replays its RNG too
    torch.manual_seed(0)
    want = loss_and_grads(moss, ids, mask)
    moss.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(0)
    assert_same(loss_and_grads(moss, ids, mask), want)


def test_checkpointing_with_an_explicit_layout():
    """Emu2-style: embeddings in, the layout given as route / images."""
    moss = adapted("llama")
    embeds = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))
    route = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1] * 8 + [0, 0, -1, -1]])
    images = torch.tensor([[2, 2, 2], [12, 2, 4]])

    def step(_ids, _mask):
        out = moss(inputs_embeds=embeds, route=route, images=images, use_cache=False)
        loss = out.logits.logsumexp(-1).mean()
        loss.backward()
        return loss
    want = loss_and_grads(moss, None, None, step)
    moss.model.activation_checkpointing_enable()
    assert_same(loss_and_grads(moss, None, None, step), want)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_around_each_decoder_layer(reentrant):
    """torch.utils.checkpoint applied directly, as FSDP users do (checkpoint_wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    ids, mask = batch()
    moss = adapted("llama")
    want = loss_and_grads(moss, ids, mask)
    layers = set(moss.model.model.layers)
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(moss.model, partial(checkpoint_wrapper, checkpoint_impl=impl),
                                   check_fn=lambda m: m in layers)
    moss.model.enable_input_require_grads()  # the reentrant implementation needs it
    assert_same(loss_and_grads(moss, ids, mask), want)


def test_checkpointing_the_whole_model_call():
    ids, mask = batch()
    moss = adapted("chameleon")
    want = loss_and_grads(moss, ids, mask)

    def step(ids, mask):
        loss = checkpoint(lambda i, m: moss(input_ids=i, attention_mask=m, labels=i).loss,
                          ids, mask, use_reentrant=False)
        loss.backward()
        return loss
    assert_same(loss_and_grads(moss, ids, mask, step), want)


def test_two_forwards_then_one_backward_recompute_each_with_its_own_routing():
    """DPO-style: two differently laid-out batches of the same shape, one backward. A
    recomputation that read the latest routing would get the first batch wrong."""
    ids, mask = batch()
    other = ids.flip(1)  # same shape, images elsewhere
    moss = adapted("chameleon")

    def step(ids, mask):
        first = moss(input_ids=ids, attention_mask=mask, labels=ids).loss
        second = moss(input_ids=other, labels=other).loss
        (first + 2 * second).backward()
        return first + 2 * second
    want = loss_and_grads(moss, ids, mask, step)
    moss.model.activation_checkpointing_enable()
    assert_same(loss_and_grads(moss, ids, mask, step), want)


def test_checkpointing_part_of_a_layer_says_what_to_checkpoint_instead():
    ids, mask = batch()
    moss = adapted("llama")
    mlp = moss.model.model.layers[0].mlp
    mlp.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(mlp.forward)
    loss = moss(input_ids=ids, attention_mask=mask, labels=ids).loss
    with pytest.raises(RuntimeError, match="checkpoint whole decoder layers"):
        loss.backward()


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backbone", ["chameleon", "llama"])
def test_whole_model_compiles_without_graph_breaks_and_trains_as_eager(backbone):
    """fullgraph=True: any graph break (a host sync such as .item(), a check branching on a
    value) fails. A second batch with another layout reuses the graph (no recompilation)."""
    ids, mask = batch()
    moss = adapted(backbone)
    compiled = torch.compile(moss, fullgraph=True)

    def step(ids, mask):
        loss = compiled(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        return loss
    torch._dynamo.reset()
    assert_same(loss_and_grads(moss, ids, mask, step), loss_and_grads(moss, ids, mask), 1e-5)
    other, other_mask = ids.flip(1), mask.flip(1)
    want = loss_and_grads(moss, other, other_mask)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_same(loss_and_grads(moss, other, other_mask, step), want, 1e-5)


# ---------------------------------------------------------------------- autocast
#: (backend, autocast dtype) pairs that run on DEVICE: bf16 on a CPU, fp16 and bf16 on a GPU.
AUTOCAST = [(b, d) for d in ((torch.bfloat16,) if DEVICE == "cpu" else
                             (torch.float16, torch.bfloat16))
            for b in BACKENDS if backends.backend(b).supports(d)]


@pytest.mark.parametrize("backend, dtype", AUTOCAST)
@pytest.mark.parametrize("seed, x_adapter", [(0, False), (1, True)])
def test_autocast_runs_the_op_in_its_dtype_and_returns_fp32_gradients(backend, dtype, seed,
                                                                      x_adapter, gen):
    """fp32 inputs under autocast: the op computes in ``dtype`` (as F.linear would), and the
    gradients come back in fp32; checked against float64 on the dtype-rounded values, with
    the same rule as every backend test (tests/helpers.py within_tolerance)."""
    layout, k = random_layout(seed, max_hw=4), 2
    params = {n: v if v is None else v.to(dtype).double()  # values exact in every dtype
              for n, v in make_params(gen, layout.n, 24, 20, 3, 2, k,
                                      x_adapter=x_adapter).items()}
    want = run_layer(layout, k, True, params, torch.float64, "reference")
    ref = run_layer(layout, k, True, params, dtype, "reference")
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     cu_seqlens=layout.cu_seqlens).to(DEVICE)
    leaves = {n: v.to(DEVICE, torch.float32).requires_grad_() for n, v in params.items()}
    with torch.autocast(DEVICE, dtype=dtype):
        y = mk.moss_linear(leaves["x"], leaves["weight"], leaves["bias"], plan,
                           *(leaves[n] for n in ADAPTERS), 1.5, 0.5, backend=backend,
                           x_adapter=leaves.get("x_adapter"))
    assert y.dtype == dtype
    y.backward(torch.linspace(-1.0, 1.0, y.numel(), dtype=torch.float64).to(
        DEVICE, dtype).view_as(y))
    got = {"y": y.detach(), **{n: v.grad for n, v in leaves.items()}}
    for name, value in got.items():
        assert value.dtype == (dtype if name == "y" else torch.float32), name
        assert within_tolerance(value, ref[name], want[name], dtype), name


@pytest.mark.parametrize("backend, dtype", AUTOCAST)
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_autocast_training_step_on_a_model(backend, dtype, base_dtype):
    """A frozen fp32 or bf16 base with fp32 adapters, a training step under autocast: adapter
    gradients in fp32, each within the rule against the float64 model, the reference backend
    under the same autocast setting the dtype's error (adapters of realistic size: with large
    random ones the tiny model's bf16 gradients are noise, whatever computes them)."""
    ids, mask = batch()

    def step(kernel_backend, model_dtype, cast):
        moss = adapted("llama", scale=0.05, backend=kernel_backend)  # well-conditioned
        moss.model.to(model_dtype)
        for p in moss.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.float64 if model_dtype == torch.float64 else
                                   torch.float32)
        with torch.autocast(DEVICE, dtype=dtype, enabled=cast):
            loss = moss.to(DEVICE)(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE),
                                   labels=ids.to(DEVICE), use_cache=False).loss
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad for n, p in moss.named_parameters()
                                          if p.requires_grad}}

    want = step("reference", torch.float64, False)
    ref = step("reference", base_dtype, True)
    got = step(backend, base_dtype, True)
    for name, value in got.items():
        if name != "loss":
            assert value.dtype == torch.float32, name
        assert within_tolerance(value, ref[name], want[name], dtype), name


def test_value_checks_run_where_reading_values_is_free(monkeypatch):
    """CPU ids: checked. Device ids (a meta tensor stands in for a GPU's): only with
    MOSS_CHECK_INPUTS=1, since each read is a host synchronisation. Compiled: never."""
    from moss.model import CHECK_ENV, reads_values

    cpu, device = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long,
                                                                 device="meta")
    monkeypatch.delenv(CHECK_ENV, raising=False)
    assert reads_values(cpu) and not reads_values(device)
    monkeypatch.setenv(CHECK_ENV, "1")
    assert reads_values(device)
    assert not torch.compile(lambda t: reads_values(t), fullgraph=True)(cpu)
