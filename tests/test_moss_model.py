"""moss/: injection into real (tiny) transformers models, routing, unload, checkpoints (bad
inputs: tests/test_bad_inputs_*.py)."""

import copy
import json

import pytest
import torch

import moss_kernels as mk
from moss import MossConfig, MossModel, get_moss_model
from moss.layer import MossLinear
from moss.model import cache_kwarg
from moss.router import Router

from helpers import (
    CPU_BACKENDS,
    GRID,
    IMG,
    Interrupted,
    conv2d_formulation,
    interrupt_at,
    random_layout,
    randomize_B,
    tiny_chameleon,
    tiny_llama,
)

transformers = pytest.importorskip("transformers")

def interleaved_ids():
    """Two sequences: text, a 3 x 3 image, text, a partial image; left padding on the second."""
    a = [1, 7, 8] + IMG[:9] + [9, 10] + IMG[9:13]
    b = [0, 0, 0, 0, 11, 12] + IMG[13:22] + [13, 14, 15]
    ids = torch.tensor([a, b])
    mask = torch.tensor([[1] * len(a), [0] * 4 + [1] * (len(b) - 4)])
    return ids, mask


@pytest.mark.parametrize("variant", ["conv", "moe", "shared", "conv_rank"])
def test_zero_B_is_the_base_model_and_only_adapters_train(variant):
    base = tiny_chameleon()
    ids, mask = interleaved_ids()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    moss = get_moss_model(base, MossConfig(r_text=4, r_image=4, image_adapter=variant,
                                           image_grid=GRID))
    with torch.no_grad():
        got = moss(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in moss.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in (
        "text_A", "text_B", "image_A", "image_B", "image_down", "image_conv") for n in trainable)
    assert len(moss.wrapped) == 14 and not any("vqmodel" in n for n in moss.wrapped)
    # And the adapters do something once B is not zero, with gradients reaching them.
    randomize_B(moss)
    out = moss(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(out, want, atol=1e-3)
    out.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in moss.named_parameters() if p.requires_grad)


def test_image_tokens_route_through_the_conv_adapter():
    """Changing only the image adapter changes only image-token outputs at the first layer."""
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=4, image_grid=GRID))
    ids, mask = interleaved_ids()
    layer = moss.model.model.layers[0].self_attn.q_proj
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o.detach().clone()))
    moss(input_ids=ids, attention_mask=mask)
    before = seen["y"]
    with torch.no_grad():
        layer.image_B.normal_()
    moss(input_ids=ids, attention_mask=mask)
    changed = (seen["y"] - before).abs().amax(-1) > 0
    is_image = torch.isin(ids, torch.tensor(IMG)) & (mask == 1)
    assert torch.equal(changed, is_image)


def test_explicit_layout_with_inputs_embeds_matches_input_ids_routing():
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=4, image_grid=GRID))
    randomize_B(moss)
    ids, mask = interleaved_ids()
    plan = mk.RoutingPlan.from_input_ids(ids, IMG + [3], GRID, mask)
    route = plan.route.view(ids.shape).long()
    embeds = moss.model.get_input_embeddings()(ids)
    with torch.no_grad():
        a = moss(input_ids=ids, attention_mask=mask).logits
        b = moss(inputs_embeds=embeds, attention_mask=mask, route=route, images=plan.images).logits
    torch.testing.assert_close(a, b)


def test_llama_with_embeddings_and_route():
    """Emu2-style: a Llama decoder fed embeddings, the layout given explicitly."""
    moss = get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4, kernel_size=3))
    randomize_B(moss)
    embeds = torch.randn(2, 12, 32)
    route = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1] * 8 + [0, 0, -1, -1]])
    images = torch.tensor([[2, 2, 2], [12, 2, 4]])
    out = moss(inputs_embeds=embeds, route=route, images=images).logits
    assert out.shape == (2, 12, 80) and torch.isfinite(out).all()
    # A Llama given only token ids is text-only.
    ids = torch.randint(0, 80, (2, 7))
    assert moss(input_ids=ids).logits.shape == (2, 7, 80)


def test_plan_is_built_once_per_forward(monkeypatch):
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=4, image_grid=GRID))
    calls = []
    real = mk.RoutingPlan.from_input_ids.__func__
    monkeypatch.setattr(mk.RoutingPlan, "from_input_ids",
                        classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    moss(input_ids=interleaved_ids()[0])
    assert len(calls) == 1


def test_the_backbone_is_routed_however_it_is_called_but_a_lone_layer_says_so():
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=4, image_grid=GRID))
    randomize_B(moss)
    ids, mask = interleaved_ids()
    with torch.no_grad():
        torch.testing.assert_close(moss.model(input_ids=ids, attention_mask=mask).logits,
                                   moss(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(RuntimeError, match="outside MossModel.forward"):
        moss.model.model.layers[0].mlp.up_proj(torch.randn(1, 3, 32))


def test_unload_restores_the_base_exactly():
    base = tiny_llama()
    base.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user's own freeze
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    state = copy.deepcopy(base.state_dict())
    ids = torch.randint(0, 80, (2, 9))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    moss = get_moss_model(base, MossConfig(r_text=4, r_image=4))
    randomize_B(moss)
    restored = moss.unload()
    assert restored is base
    assert not any(type(m).__name__ == "MossLinear" for m in restored.modules())
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
    assert state.keys() == restored.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in restored.state_dict().items())
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, want)
    get_moss_model(restored, MossConfig(r_text=2, r_image=2))  # can be wrapped again


def test_training_lowers_the_loss():
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=4, image_grid=GRID))
    ids, mask = interleaved_ids()
    # Text-token targets: transformers' Chameleon gives image tokens no logits (a loss over
    # them is inf), lifting that is a separate option.
    labels = torch.where((mask == 1) & ~torch.isin(ids, torch.tensor(IMG)), ids, -100)
    opt = torch.optim.AdamW([p for p in moss.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    moss.train()
    for _ in range(25):
        loss = moss(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (A tiny random backbone plateaus early; PEFT's LoRA on it does the same.)
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]


def test_dropout_applies_to_the_adapters_only_and_only_in_training():
    moss = get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4, dropout=0.5))
    randomize_B(moss)
    ids = torch.randint(0, 80, (1, 8))
    plain = get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4))
    plain.load_state_dict(moss.state_dict())
    with torch.no_grad():
        moss.eval(), plain.eval()
        torch.testing.assert_close(moss(input_ids=ids).logits, plain(input_ids=ids).logits)
        moss.train()
        assert not torch.allclose(moss(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_is_the_adapters_reading_dropout_x_in_one_call(backend):
    """In training, y = base(x) + adapters(dropout(x)) with the mask a fixed seed draws, and so
    are the gradients (x gets the base's plus the adapters' through the mask), against the
    paper's eager formulation; in eval, dropout is ignored."""
    layout = random_layout(3, p_image=0.6)
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=2,
                                     cu_seqlens=layout.cu_seqlens)
    torch.manual_seed(0)
    router, p = Router(), 0.3
    layer = MossLinear(torch.nn.Linear(12, 10), MossConfig(r_text=3, r_image=4, dropout=p,
                                                           backend=backend), router)
    with torch.no_grad():
        layer.text_B.normal_(), layer.image_B.normal_()
    x = torch.randn(layout.n, 12)
    dy = torch.randn(layout.n, 10)

    def run(training):
        layer.train(training)
        leaf = x.clone().requires_grad_()
        router.begin_plan(lambda window, with_images: plan)
        try:
            torch.manual_seed(7)
            y = layer(leaf)
        finally:
            router.end()
        y.backward(dy)
        return y.detach(), leaf.grad, layer.text_A.grad, layer.image_B.grad

    def formulation(training):
        leaf = x.clone().requires_grad_()
        adapters = [t.detach().clone().requires_grad_() for t in (
            layer.text_A, layer.text_B, layer.image_A, layer.image_B)]
        torch.manual_seed(7)
        keep = mk.dropout.unpack(mk.dropout.dropout_mask(x, p), 12) if training else True
        x_adapter = leaf * keep / (1 - p if training else 1)  # the mask: tests/test_dropout.py
        base = layer.base(leaf)
        y = base + conv2d_formulation(x_adapter, torch.zeros_like(layer.base.weight), None,
                                      layout, *adapters, layer.text_scale, layer.image_scale,
                                      causal=True)
        y.backward(dy)
        return y.detach(), leaf.grad, adapters[0].grad, adapters[3].grad

    for training in (True, False):
        layer.zero_grad()
        for got, want in zip(run(training), formulation(training)):  # fp32, sums reordered
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    train, plain = run(True)[0], run(False)[0]
    assert not torch.allclose(train, plain)  # the mask did something


def test_save_and_load_round_trip(tmp_path):
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, image_grid=GRID,
                                                       alpha_image=5.0))
    randomize_B(moss)
    ids, mask = interleaved_ids()
    with torch.no_grad():
        want = moss(input_ids=ids, attention_mask=mask).logits
    moss.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moss_adapter.safetensors",
                                                          "moss_config.json"]
    loaded = MossModel.from_pretrained(tiny_chameleon(), tmp_path)
    assert loaded.moss_config == moss.moss_config
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want,
                                   rtol=0, atol=0)
    moss.save_pretrained(tmp_path)  # overwriting an existing checkpoint is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_save_interrupted_at_any_point_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Over an existing adapter, interrupt save_pretrained at each of its file-system steps in
    turn: the folder always loads, as the previous adapter or (once the config is committed)
    the new one, never a mixture and never an error."""
    moss = get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4))
    old = {k: v.clone() for k, v in moss.adapter_state_dict().items()}
    randomize_B(moss)
    new = {k: v.clone() for k, v in moss.adapter_state_dict().items()}
    outcomes = set()
    for k in range(1, 100):
        folder = tmp_path / f"k{k}"
        moss.save_pretrained(folder, old)
        with monkeypatch.context() as m:
            calls = interrupt_at(m, k)
            try:
                moss.save_pretrained(folder, new)
            except Interrupted:
                pass
        state = MossModel.from_pretrained(tiny_llama(), folder).adapter_state_dict()
        same = [all(torch.equal(state[n], v[n]) for n in v) for v in (old, new)]
        assert any(same), f"interrupted at step {k}: neither the old nor the new adapter"
        outcomes.add("new" if same[1] else "old")
        if calls[0] < k:  # the save finished before step k: every step has been interrupted
            break
    assert outcomes == {"old", "new"} and calls[0] >= 4


def test_config_round_trip():
    cfg = MossConfig(image_adapter="moe", image_grid=(4, 4), image_token_ids=[5, 6])
    assert MossConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.window == 1 and MossConfig().window == 2


def decode_sequence():
    """Row 0: text, a 3 x 3 image, a second image back to back (a run longer than H*W), text.
    Row 1, left-padded, is at other positions within its images."""
    a = [1, 7] + IMG[:9] + IMG[9:14] + [9, 10] + IMG[14:17]
    b = [0, 0, 11] + IMG[17:26] + [13] + IMG[26:31] + [14, 15, 16]
    ids = torch.tensor([a, b])
    mask = torch.tensor([[1] * len(a), [0] * 2 + [1] * (len(b) - 2)])
    return ids, mask


@pytest.mark.parametrize("variant,k,backend", [
    ("conv", 2, None), ("conv", 3, None), ("moe", 2, None), ("conv_rank", 2, None),
    ("shared", 2, None), *[("conv", 3, b) for b in CPU_BACKENDS]])
def test_prefill_then_token_by_token_decode_equals_the_full_forward(variant, k, backend):
    """Every variant on the default backend; the ConvLoRA on every backend (prefill and decode
    steps both run on it; Triton's interpreter, at ~1 s per step, from inside the first image
    to past the second's start only)."""
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, kernel_size=k,
                                                       image_adapter=variant, image_grid=GRID,
                                                       backend=backend))
    randomize_B(moss, scale=1.0)
    ids, mask = decode_sequence()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_kw = cache_kwarg(moss.model)
    slow = backend == "triton"  # (on CPU tensors: interpreted)
    with torch.no_grad():
        full = moss(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for prefix in (6,) if slow else (3, 6):  # the prompt ends in text / inside an image
            cache = transformers.DynamicCache()
            out = moss(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix],
                       position_ids=positions[:, :prefix], use_cache=True, **{cache_kw: cache})
            torch.testing.assert_close(out.logits, full[:, :prefix], rtol=1e-4, atol=1e-4)
            for t in range(prefix, 14 if slow else ids.shape[1]):
                out = moss(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                           position_ids=positions[:, t:t + 1], use_cache=True, **{cache_kw: cache})
                torch.testing.assert_close(out.logits[:, -1], full[:, t], rtol=1e-4, atol=1e-4,
                                           msg=f"prefix {prefix}, step {t}")


def test_generate_uses_the_decode_state():
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, image_grid=GRID))
    randomize_B(moss, scale=1.0)
    ids, mask = decode_sequence()
    prompt, pmask = ids[:, :8], mask[:, :8]  # ends inside an image
    with torch.no_grad():
        out = moss.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=4,
                            do_sample=False)
        # The same greedy tokens from full forwards over the growing sequence.
        seq, smask = prompt, pmask
        for _ in range(4):
            pos = (smask.cumsum(-1) - 1).clamp(min=0)
            logits = moss(input_ids=seq, attention_mask=smask, position_ids=pos).logits
            nxt = logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            smask = torch.cat([smask, torch.ones_like(nxt)[:, None]], 1)
    assert torch.equal(out[:, -4:], seq[:, -4:])


def test_beam_search_scores_are_the_full_forwards_scores():
    """Beam search reorders the KV cache's rows between steps; the decode state (image runs,
    rings) must move with them, or a beam reads another's past tap products (the scores then
    differed by ~0.1 nats). Three beams, three returned sequences each, a left-padded row."""
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, image_grid=GRID),
                          image_logits=True)  # image codes can be generated
    randomize_B(moss, scale=1.0)
    prompt = torch.tensor([[1, 7] + IMG[:5], [0, 0, 11] + IMG[17:21]])
    pmask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    eos = moss.model.generation_config.eos_token_id
    with torch.no_grad():
        out = moss.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=6,
                            num_beams=3, num_return_sequences=3, do_sample=False,
                            length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
        seqs = out.sequences
        mask = torch.cat([pmask.repeat_interleave(3, 0), torch.ones_like(seqs[:, 7:])], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = moss(input_ids=seqs, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
    for i, (seq, score) in enumerate(zip(seqs, out.sequences_scores)):
        total = 0.0
        for t in range(7, seq.shape[0]):  # up to and including an end of sequence
            total += logp[i, t - 1, seq[t]].item()
            if seq[t] == eos:
                break
        assert score.item() == pytest.approx(total, abs=1e-4), f"sequence {i}"


def _chunked(moss, ids, mask, positions, prefix, chunk, cache_kw):
    """Prefill ``prefix`` tokens, then feed the rest ``chunk`` at a time; the logits."""
    cache = transformers.DynamicCache()
    out = [moss(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix],
                position_ids=positions[:, :prefix], use_cache=True, **{cache_kw: cache}).logits]
    for t in range(prefix, ids.shape[1], chunk):
        u = min(t + chunk, ids.shape[1])
        out.append(moss(input_ids=ids[:, t:u], attention_mask=mask[:, :u],
                        position_ids=positions[:, t:u], use_cache=True,
                        **{cache_kw: cache}).logits)
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("variant", ["conv", "shared"])
def test_decode_calls_of_several_tokens_equal_the_full_forward(variant):
    """What assisted decoding's verification does: several new tokens in one cached call."""
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, image_adapter=variant,
                                                       image_grid=GRID))
    randomize_B(moss, scale=1.0)
    ids, mask = decode_sequence()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = moss(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for chunk in (2, 3, 5):
            got, _ = _chunked(moss, ids, mask, positions, 4, chunk, cache_kwarg(moss.model))
            torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4, msg=f"chunk {chunk}")


def test_a_crop_takes_back_the_last_calls_tokens():
    """Feed 4 tokens, crop 3 of them, feed others: as if the others had come first (the rings'
    overwritten slots restored); a crop reaching into an earlier call is refused."""
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, image_grid=GRID))
    randomize_B(moss, scale=1.0)
    kw = cache_kwarg(moss.model)
    prompt = [1, 7] + IMG[:6]
    tried, kept = IMG[6:10], IMG[20:23]
    with torch.no_grad():
        want = moss(input_ids=torch.tensor([prompt + tried[:1] + kept])).logits
        cache = transformers.DynamicCache()
        moss(input_ids=torch.tensor([prompt]), use_cache=True, **{kw: cache})
        moss(input_ids=torch.tensor([tried]), use_cache=True, **{kw: cache})
        cache.crop(-3)  # transformers 5: the number of tokens to remove, negated
        got = moss(input_ids=torch.tensor([kept]), use_cache=True, **{kw: cache}).logits
        torch.testing.assert_close(got, want[:, -len(kept):], rtol=1e-4, atol=1e-4)
        with pytest.raises(NotImplementedError, match="the tokens of the last call only"):
            cache.crop(-4)
        assert cache.get_seq_length() == len(prompt) + 1 + len(kept)  # refused before cropping
        moss(input_ids=torch.tensor([kept[:1]]), use_cache=True, **{kw: cache})
        with pytest.raises(NotImplementedError, match=r"last call only \(0\)"):
            cache.crop(-1)  # one token per call is plain decoding: nothing to take back
        # Assisted decoding's first verification is part of the prefill: crop that too.
        cache = transformers.DynamicCache()
        moss(input_ids=torch.tensor([prompt + tried]), use_cache=True, **{kw: cache})
        cache.crop(-3)
        got = moss(input_ids=torch.tensor([kept]), use_cache=True, **{kw: cache}).logits
        torch.testing.assert_close(got, want[:, -len(kept):], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", [dict(prompt_lookup_num_tokens=3), "assistant"])
def test_assisted_decoding_gives_plain_greedy_decoding(how):
    """Greedy assisted decoding (a draft model, or prompt lookup) proposes tokens, verifies
    them in one call and crops the rejected ones: its output is greedy decoding's."""
    moss = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=3, image_grid=GRID),
                          image_logits=True)
    randomize_B(moss, scale=1.0)
    prompt = torch.tensor([[1, 7] + IMG[:6] + [9, 7] + IMG[:5]])  # n-grams to look up
    kw = dict(assistant_model=tiny_chameleon()) if how == "assistant" else how
    with torch.no_grad():
        plain = moss.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
        assisted = moss.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, **kw)
    assert torch.equal(assisted, plain)


def test_image_logits_option_lifts_chameleons_mask_and_unload_restores_it():
    ids, mask = interleaved_ids()
    labels = torch.where(mask == 1, ids, -100)  # includes image tokens
    masked = get_moss_model(tiny_chameleon(), MossConfig(r_text=4, r_image=4, image_grid=GRID))
    assert torch.isinf(masked(input_ids=ids, attention_mask=mask, labels=labels).loss)
    base = tiny_chameleon()
    moss = get_moss_model(base, MossConfig(r_text=4, r_image=4, image_grid=GRID), image_logits=True)
    out = moss(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits[..., IMG]).all()
    moss.unload()
    assert (base(input_ids=ids).logits[..., IMG] == torch.finfo(torch.float32).min).all()
