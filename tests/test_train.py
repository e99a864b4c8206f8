"""moss train / moss generate, the data format, and the transformers Trainer (bad inputs:
tests/test_bad_inputs_*.py)."""

import json

import pytest
import torch

from moss.backbones import load as backbone
from moss.cli import main
from moss.data import IGNORE, collate, encode_record, load_jsonl
from moss.train import SAMPLE

pytest.importorskip("transformers")

FAST = ["train", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--warmup", "2"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train.log").read_text().splitlines()]


def test_train_lowers_the_loss_checkpoints_and_generates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--steps", "40", "--save-every", "15", "--out", str(out)]) == 0
    losses = _losses(out)
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])
    assert (out / "latest").read_text() == "checkpoint-40"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-40", "latest", "train.log"]
    assert sorted(p.name for p in (out / "checkpoint-40").iterdir()) == [
        "moss_adapter.safetensors", "moss_config.json", "trainer_state.pt"]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out / "checkpoint-40"), "--max-new-tokens", "24",
                 "--prompt", "Draw a blue bar."]) == 0
    assert capsys.readouterr().out.strip()


def test_gradient_checkpointing_trains_exactly_as_without(tmp_path):
    """Dropout included: the recomputation replays its random mask."""
    from safetensors.torch import load_file

    args = FAST + ["--steps", "6", "--save-every", "6", "--dropout", "0.1"]
    finals = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        assert main(args + ["--out", str(tmp_path / name), *extra]) == 0
        finals.append(load_file(tmp_path / name / "checkpoint-6" / "moss_adapter.safetensors"))
    torch.testing.assert_close(_losses(tmp_path / "checkpointed"), _losses(tmp_path / "plain"),
                               rtol=1e-6, atol=1e-6)
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_ends(tmp_path, monkeypatch):
    args = FAST + ["--steps", "12", "--save-every", "4"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0

    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def crash_at_step_10(*a, **k):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    assert (tmp_path / "killed" / "latest").read_text() == "checkpoint-8"
    assert main(args + ["--out", str(tmp_path / "killed"), "--resume"]) == 0

    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "checkpoint-12" / "moss_adapter.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint-12" / "moss_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight")[8:] == _losses(tmp_path / "killed")[-4:]


def test_runs_under_the_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from moss import MossConfig, get_moss_model

    model, vocab, _ = backbone(None)
    moss = get_moss_model(model, MossConfig(r_text=4, r_image=4, image_grid=vocab.grid),
                          image_logits=True)
    examples = load_jsonl(SAMPLE, vocab)
    before = {n: p.detach().clone() for n, p in moss.named_parameters() if p.requires_grad}
    trainer = Trainer(
        model=moss, train_dataset=examples, data_collator=lambda ex: collate(ex, vocab.pad),
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                               learning_rate=1e-2, report_to=[], use_cpu=True,
                               remove_unused_columns=False, save_strategy="no"))
    trainer.train()
    after = dict(moss.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_records_become_ids_labels_and_batches():
    _, vocab, decode = backbone(None)
    record = {"id": "r", "segments": [
        {"role": "user", "type": "text", "text": "hi"},
        {"role": "assistant", "type": "image", "codes": list(range(16))},
        {"role": "assistant", "type": "text", "text": "ok"}]}
    ex = encode_record(record, vocab, include_image_loss=True, where="x")
    assert decode(ex.input_ids) == "hiok"
    image = vocab.image(list(range(16)))
    text = vocab.encode_text
    assert ex.input_ids == [vocab.bos] + text("hi") + image + text("ok") + [vocab.eos]
    assert ex.labels[:3] == [IGNORE] * 3 and ex.labels[3:] == ex.input_ids[3:]
    text_only = encode_record(record, vocab, include_image_loss=False, where="x")
    assert text_only.labels[3:3 + len(image)] == [IGNORE] * len(image)
    batch = collate([ex, text_only], vocab.pad)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert len(load_jsonl(SAMPLE, vocab)) == 32


def test_an_image_file_goes_through_the_vq_tokenizer(tmp_path):
    from PIL import Image

    _, vocab, _ = backbone(None)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"segments": [
        {"role": "user", "type": "image", "path": "red.png"},
        {"role": "assistant", "type": "text", "text": "red"}]}) + "\n")
    (ex,) = load_jsonl(tmp_path / "d.jsonl", vocab)
    image = ex.input_ids[1:19]
    assert image[0] == vocab.begin_image and image[-1] == vocab.end_image
    assert all(t in vocab.code_to_token for t in image[1:-1])


def test_a_local_checkpoint_with_its_tokenizer(tmp_path, capsys):
    """--model PATH: a Chameleon saved with save_pretrained, with a tokenizer of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moss import tiny

    words = sorted({w for line in SAMPLE.read_text().splitlines()
                    for seg in json.loads(line)["segments"] if seg["type"] == "text"
                    for w in seg["text"].replace(".", " .").replace("?", " ?").split()})
    vocab = {**tiny.SPECIALS, "<unk>": 6, **{w: 7 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    path = tmp_path / "tiny-chameleon"
    tiny.build().save_pretrained(path)
    fast.save_pretrained(path)
    out = tmp_path / "run"
    assert main(FAST + ["--steps", "6", "--model", str(path), "--out", str(out)]) == 0
    assert len(_losses(out)) == 6
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out / "checkpoint-6"), "--model", str(path),
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_checkpoint_interrupted_at_any_point_leaves_latest_loadable(tmp_path, monkeypatch):
    """Interrupt the step-8 checkpoint at each of its file-system steps in turn (checkpoint-4
    committed before): `latest` always names a whole checkpoint, step 4's or step 8's, whose
    adapter and trainer state belong together."""
    from moss import MossConfig, MossModel, get_moss_model, tiny
    from moss.train import save_checkpoint

    from helpers import Interrupted, interrupt_at

    moss = get_moss_model(tiny.build(), MossConfig(r_text=2, r_image=2))
    params = [p for p in moss.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step():
        sum((p * p).sum() for p in params).backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    step()
    saved = {4: {k: v.clone() for k, v in moss.adapter_state_dict().items()}}
    step()
    saved[8] = {k: v.clone() for k, v in moss.adapter_state_dict().items()}
    steps_seen = set()
    for k in range(1, 200):
        out = tmp_path / f"k{k}"
        out.mkdir()
        own = dict(moss.model.named_parameters())  # adapter_state_dict's names
        with torch.no_grad():  # checkpoint-4 from step 4's weights, then back to step 8's
            for name, value in saved[4].items():
                own[name].copy_(value)
            save_checkpoint(moss, opt, sched, 4, out)
            for name, value in saved[8].items():
                own[name].copy_(value)
        with monkeypatch.context() as m:
            calls = interrupt_at(m, k)
            try:
                save_checkpoint(moss, opt, sched, 8, out)
            except Interrupted:
                pass
        ckpt = out / (out / "latest").read_text().strip()
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        loaded = MossModel.from_pretrained(tiny.build(), ckpt).adapter_state_dict()
        want = saved[state["step"]]
        assert all(torch.equal(loaded[n], want[n]) for n in want), f"step {k}: {ckpt.name}"
        steps_seen.add(state["step"])
        if calls[0] < k:
            break
    assert steps_seen == {4, 8} and calls[0] >= 8


def test_a_foreign_latest_file_never_costs_the_run_folder(tmp_path):
    """A `latest` that names no checkpoint of the run (empty, ``..``) is replaced by the next
    save, and nothing outside the run's own checkpoints is removed."""
    from moss.checkpoint import latest_checkpoint, save_run_checkpoint

    for i, foreign in enumerate(("\n", "..", ".")):
        out = tmp_path / f"run{i}"
        out.mkdir()
        (out / "train.log").write_text("kept\n")
        (out / "latest").write_text(foreign)
        target = save_run_checkpoint(out, 5, lambda folder: folder.mkdir(), {"step": 5})
        assert (out / "train.log").read_text() == "kept\n" and target.is_dir()
        assert latest_checkpoint(out) == target
