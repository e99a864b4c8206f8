"""MOSS as a PEFT method (moss/peft_method.py): PEFT's front door against get_moss_model's on real
tiny models (same outputs and gradients), training, save / load and cross-loading, HF Trainer,
generate with a KV cache, and moss without PEFT (bad inputs: tests/test_bad_inputs_peft.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from moss import MossConfig, MossModel, get_moss_model
from moss.checkpoint import PEFT_PREFIX
from moss.peft_method import MossLoraConfig, convert_to_peft

from helpers import GRID, IMG, tiny_chameleon, tiny_llama

transformers = pytest.importorskip("transformers")

#: Each backbone with a config that routes image tokens by id: Chameleon knows its own; the
#: Llama is told which ids are image tokens.
BACKBONES = {
    "llama": (tiny_llama, dict(image_token_ids=IMG, image_grid=GRID)),
    "chameleon": (tiny_chameleon, dict(image_grid=GRID)),
}


def batch():
    """Two rows: text, a 3 x 3 image, text, a partial image; the second right-padded."""
    a = [1, 5, 6] + IMG[:9] + [7, 8] + IMG[9:14]
    b = [9, 10] + IMG[14:23] + [11, 12] + [0] * 6
    mask = torch.tensor([[1] * len(a), [1] * 13 + [0] * 6])
    ids = torch.tensor([a, b])
    labels = torch.where((mask == 1) & ~torch.isin(ids, torch.tensor(IMG)), ids, -100)
    return dict(input_ids=ids, attention_mask=mask), labels


def random_adapters(moss: MossModel, seed=0) -> dict[str, torch.Tensor]:
    """Seeded random values for every adapter tensor (B not zero, so the adapter acts)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.3
            for k, v in moss.adapter_state_dict().items()}


def both_doors(backbone, variant="conv", image_logits=False, **extra):
    """The same adapter values through get_moss_model and through get_peft_model."""
    make, fields = BACKBONES[backbone]
    cfg = MossConfig(r_text=4, r_image=3, image_adapter=variant, **fields, **extra)
    moss = get_moss_model(make(), cfg, image_logits)
    values = random_adapters(moss)
    assert not moss.load_state_dict({f"model.{k}": v for k, v in values.items()},
                                    strict=False).unexpected_keys
    pm = get_peft_model(make(), MossLoraConfig.from_moss_config(cfg, image_logits=image_logits))
    set_peft_model_state_dict(pm, {PEFT_PREFIX + k: v for k, v in values.items()})
    return moss, pm


def adapter_grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("variant", ["conv", "conv_rank"])
def test_the_peft_door_runs_the_moss_model_outputs_and_gradients_alike(backbone, variant):
    moss, pm = both_doors(backbone, variant)
    tuner = pm.base_model
    assert tuner.moss_model.model is tuner.model  # one backbone, one set of MossLinear layers
    assert tuner.moss_model.wrapped == moss.wrapped == tuner.targeted_module_names
    assert pm.peft_config["default"].target_modules == moss.moss_config.target_modules
    inputs, labels = batch()
    a = moss(**inputs, labels=labels)
    b = pm(**inputs, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    a.loss.backward()
    b.loss.backward()
    want, got = adapter_grads(moss, "model."), adapter_grads(pm, PEFT_PREFIX)
    assert got.keys() == want.keys() == moss.adapter_state_dict().keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_through_the_peft_door():
    """What Trainer(gradient_checkpointing=True) calls on a PeftModel: same gradients."""
    _, pm = both_doors("chameleon", dropout=0.1)
    pm.train()
    inputs, labels = batch()

    def grads():
        pm.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        pm(**inputs, labels=labels, use_cache=False).loss.backward()
        return adapter_grads(pm)
    want = grads()
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = grads()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_training_through_peft_updates_only_the_adapters():
    _, pm = both_doors("chameleon")
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)  # every parameter: the frozen ones stay
    inputs, labels = batch()
    losses = []
    for _ in range(5):
        loss = pm(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert changed == adapters and all(n.rsplit(".", 1)[-1] in ("text_A", "text_B", "image_A",
                                                                 "image_B") for n in adapters)
    assert losses[-1] < losses[0]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_save_and_peft_from_pretrained_round_trip(tmp_path):
    _, pm = both_doors("chameleon", "moe", alpha_image=5.0)
    inputs, _ = batch()
    want = _logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in
                                                                    tmp_path.iterdir()}
    loaded = PeftModel.from_pretrained(tiny_chameleon(), tmp_path)
    assert isinstance(loaded.base_model.moss_model, MossModel)
    saved_cfg = pm.peft_config["default"]
    assert loaded.peft_config["default"].to_moss_config() == saved_cfg.to_moss_config()
    torch.testing.assert_close(_logits(loaded, inputs), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's is_trainable=False
    trainable = PeftModel.from_pretrained(tiny_chameleon(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in pm.named_parameters() if p.requires_grad}
    lazy = PeftModel.from_pretrained(tiny_chameleon(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(_logits(lazy, inputs), want, rtol=0, atol=0)


def test_a_peft_folder_loads_through_moss_and_a_moss_folder_through_peft_once_converted(tmp_path):
    moss, pm = both_doors("llama")
    inputs, _ = batch()
    want = _logits(moss, inputs)
    pm.save_pretrained(tmp_path / "peft")
    from_peft = MossModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert from_peft.moss_config == moss.moss_config
    torch.testing.assert_close(_logits(from_peft, inputs), want, rtol=0, atol=0)
    # PEFT opens adapter_config.json before any MOSS code runs: a moss folder is not one.
    moss.save_pretrained(tmp_path / "moss")
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "moss")
    convert_to_peft(tmp_path / "moss", tmp_path / "converted")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    from_moss = PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted")
    torch.testing.assert_close(_logits(from_moss, inputs), want, rtol=0, atol=0)
    # The PEFT door's atomic save is its MossModel's.
    pm.moss_model.save_pretrained(tmp_path / "atomic")
    torch.testing.assert_close(_logits(MossModel.from_pretrained(tiny_llama(), tmp_path / "atomic"),
                                       inputs), want, rtol=0, atol=0)


def test_hf_trainer_trains_resumes_and_its_checkpoints_load_through_both_doors(tmp_path):
    inputs, labels = batch()
    rows = [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
             "labels": labels[i]} for i in range(2)] * 4

    def trainer(max_steps):
        _, pm = both_doors("llama")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
            learning_rate=1e-2, logging_steps=1, save_steps=4, report_to=[], use_cpu=True,
            disable_tqdm=True)
        return transformers.Trainer(model=pm, args=args, train_dataset=rows)

    first = trainer(4)
    pm = first.model
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    first.train()
    assert all(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    losses = [h["loss"] for h in first.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    want = _logits(pm, inputs)
    for door in (PeftModel.from_pretrained, MossModel.from_pretrained):
        torch.testing.assert_close(_logits(door(tiny_llama(), tmp_path / "checkpoint-4"), inputs),
                                   want, rtol=0, atol=0)
    # Resuming loads the checkpoint's adapter into a fresh one (PeftModel.load_adapter); at
    # max_steps already, nothing trains after that.
    second = trainer(4)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    torch.testing.assert_close(_logits(second.model, inputs), want, rtol=0, atol=0)


def test_generate_through_peft_decodes_incrementally_like_the_moss_door():
    moss, pm = both_doors("chameleon", image_logits=True)
    ids = torch.tensor([[1, 5] + IMG[:4], [0, 0, 9] + IMG[4:7]])  # both end inside an image
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
              do_sample=False)
    with torch.no_grad():
        out = pm.generate(**kw, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, moss.generate(**kw))
        # Each step's logits are the full (uncached) forward's over the sequence generated.
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = pm(input_ids=seq, attention_mask=full_mask, position_ids=positions).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 5 + step], rtol=1e-4, atol=1e-4)
    assert torch.isin(seq[:, 6:], torch.tensor(IMG)).any()  # ConvLoRA decode steps ran


def test_one_adapter_a_second_is_refused_and_set_adapter_sets_whether_it_trains():
    """(The refusals' messages are rows of tests/test_bad_inputs_peft.py.)"""
    _, pm = both_doors("llama")
    inputs, _ = batch()
    want = _logits(pm, inputs)
    with pytest.raises(ValueError, match="holds one adapter"):
        pm.add_adapter("other", MossLoraConfig(image_grid=GRID))
    assert list(pm.peft_config) == ["default"]
    torch.testing.assert_close(_logits(pm, inputs), want, rtol=0, atol=0)
    def trainable():
        return {n for n, p in pm.named_parameters() if p.requires_grad}

    adapters = trainable()
    pm.set_adapter("default", inference_mode=True)
    assert not trainable()
    pm.set_adapter("default")
    assert trainable() == adapters


def test_unload_gives_back_the_backbone_unchanged():
    base = tiny_llama()
    inputs, _ = batch()
    want = _logits(base, inputs)
    pm = get_peft_model(base, MossLoraConfig(image_token_ids=IMG, image_grid=GRID))
    restored = pm.unload()
    assert restored is base and not hasattr(base, "peft_config")
    assert not any(type(m).__name__ == "MossLinear" for m in base.modules())
    torch.testing.assert_close(_logits(base, inputs), want, rtol=0, atol=0)


def test_half_precision_adapters_are_kept_in_float32_unless_asked_otherwise():
    cfg = dict(r_text=4, r_image=3, image_token_ids=IMG, image_grid=GRID)
    pm = get_peft_model(tiny_llama().to(torch.bfloat16), MossLoraConfig(**cfg))
    assert {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.float32}
    inputs, _ = batch()
    assert _logits(pm, inputs).dtype == torch.bfloat16
    pm = get_peft_model(tiny_llama().to(torch.bfloat16), MossLoraConfig(**cfg),
                        autocast_adapter_dtype=False)
    assert {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.bfloat16}


def test_config_carries_moss_configs_fields_and_defaults():
    assert MossLoraConfig().to_moss_config() == MossConfig()
    cfg = MossConfig(r_text=3, image_adapter="moe", image_grid=(4, 4), image_token_ids=[5, 6],
                     kernel_size=3, causal=False, dropout=0.1, backend="reference")
    assert MossLoraConfig.from_moss_config(cfg).to_moss_config() == cfg


def test_moss_works_without_peft(tmp_path):
    """A process in which ``import peft`` fails: moss wraps, runs, and reads a PEFT folder."""
    moss, pm = both_doors("llama")
    inputs, _ = batch()
    pm.save_pretrained(tmp_path / "peft")
    torch.save((inputs, _logits(moss, inputs)), tmp_path / "want.pt")
    script = f"""
import sys
sys.modules["peft"] = None  # what an absent package does: ImportError on import
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
import moss
from moss import MossConfig, MossModel, get_moss_model
from helpers import IMG, GRID, tiny_llama
inputs, want = torch.load({str(tmp_path / "want.pt")!r})
m = get_moss_model(tiny_llama(), MossConfig(image_token_ids=IMG, image_grid=GRID))
m(**inputs)
loaded = MossModel.from_pretrained(tiny_llama(), {str(tmp_path / "peft")!r})
with torch.no_grad():
    assert torch.equal(loaded(**inputs).logits, want)
try:
    import moss.peft_method
except ImportError:
    print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-2000:]
