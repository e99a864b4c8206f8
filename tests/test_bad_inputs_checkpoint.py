"""Bad input to MossModel.from_pretrained (damaged, foreign or mismatched adapter folders):
rows of docs/bad-inputs.md (tests/catalogue.py)."""

import json
from pathlib import Path

import pytest
import torch

from moss import MossConfig, MossModel, get_moss_model
from moss.checkpoint import sha256

from catalogue import INF, Catalogue
from helpers import tiny_llama

catalogue = Catalogue()
error, errors, behaviour = catalogue.error, catalogue.errors, catalogue.behaviour


LOAD = "MossModel.from_pretrained"


def saved(tmp: Path) -> Path:
    """An adapter folder saved from a tiny Llama."""
    get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4)).save_pretrained(tmp / "adapter")
    return tmp / "adapter"


def load(path, model=None):
    return MossModel.from_pretrained(tiny_llama() if model is None else model, path)


def _rewrite_config(folder: Path, drop: str | None = None, **fields) -> Path:
    meta = json.loads((folder / "moss_config.json").read_text())
    meta.update(fields)
    meta.pop(drop, None)
    (folder / "moss_config.json").write_text(json.dumps(meta))
    return folder


def _rewrite_weights(folder: Path, edit) -> Path:
    """Change the tensors and record their new hash: a consistent pair someone else wrote."""
    from safetensors.torch import load_file, save_file

    weights = folder / "moss_adapter.safetensors"
    tensors = load_file(weights)
    changed = edit(tensors)  # a new dict, or None after an edit in place
    save_file(tensors if changed is None else changed, weights)
    return _rewrite_config(folder, weights_sha256=sha256(weights))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path.parent


def _damaged(tmp: Path, edit) -> Path:
    """A saved adapter whose weights file's bytes went through ``edit`` (the hash kept)."""
    weights = saved(tmp) / "moss_adapter.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    return weights.parent


def _poison(tensors: dict) -> None:
    tensors[sorted(tensors)[-1]][0] = INF  # model.layers.1.self_attn.v_proj.text_B


def _garbage_weights(folder: Path) -> Path:
    (folder / "moss_adapter.safetensors").write_bytes(b"not safetensors")
    return _rewrite_config(folder, weights_sha256=sha256(folder / "moss_adapter.safetensors"))


error(LOAD, "`path` not a path (None)", TypeError,
      "path: expected a folder path (str or os.PathLike), got NoneType", lambda: load(None))
error(LOAD, "a folder that does not exist", FileNotFoundError,
      "path: ... nowhere/moss_config.json does not exist", lambda tmp: load(tmp / "nowhere"))
error(LOAD, "`path` a file, not the folder", FileNotFoundError,
      "path: ... is a file; expected the adapter folder",
      lambda tmp: load(saved(tmp) / "moss_config.json"))
error(LOAD, "the weights file missing", FileNotFoundError,
      "path: ... moss_adapter.safetensors does not exist",
      lambda tmp: load((saved(tmp) / "moss_adapter.safetensors").unlink() or tmp / "adapter"))
error(LOAD, "`moss_config.json` not JSON (or not UTF-8)", ValueError,
      "moss_config.json: not valid JSON",
      lambda tmp: load(_write(saved(tmp) / "moss_config.json", b"{not json")),
      lambda tmp: load(_write(saved(tmp) / "moss_config.json", b'{"a": "\xe9"}')))
error(LOAD, "`moss_config.json` not a JSON object", ValueError,
      "moss_config.json: expected a JSON object, got list",
      lambda tmp: load(_write(saved(tmp) / "moss_config.json", b"[1, 2]")))
error(LOAD, "`moss_config.json` without `weights_sha256`", ValueError,
      "moss_config.json: no weights_sha256 (not written by save_pretrained)",
      lambda tmp: load(_rewrite_config(saved(tmp), drop="weights_sha256")))
error(LOAD, "`moss_config.json` of another format_version", ValueError,
      "format_version: this moss reads adapter configs of version 1, the file says 99",
      lambda tmp: load(_rewrite_config(saved(tmp), format_version=99)))
error(LOAD, "`moss_config.json` with an invalid field", ValueError,
      "r_text: expected an int >= 1, got 0",
      lambda tmp: load(_rewrite_config(saved(tmp), r_text=0)))
error(LOAD, "a truncated or corrupted weights file", ValueError,
      "moss_adapter.safetensors: its SHA-256 does not match the one in moss_config.json",
      lambda tmp: load(_damaged(tmp, lambda data: data[:-100])),
      lambda tmp: load(_damaged(tmp, lambda data: data[:-1] + bytes([data[-1] ^ 1]))))
error(LOAD, "a weights file that is not safetensors (with a matching hash)", ValueError,
      "moss_adapter.safetensors: not a safetensors file",
      lambda tmp: load(_garbage_weights(saved(tmp))))
error(LOAD, "`model` not an `nn.Module`", TypeError, "model: expected a torch nn.Module, got str",
      lambda tmp: load(saved(tmp), "llama"))
error(LOAD, "`model` with other layers than the adapter's base", ValueError,
      "model: does not match the adapter's base model",
      lambda tmp: load(saved(tmp), tiny_llama(layers=3)))
error(LOAD, "`model` with other sizes than the adapter's base", ValueError,
      "expected shape ... the file has", lambda tmp: load(saved(tmp), tiny_llama(hidden=48)))


@behaviour(LOAD, "a weights file missing keys, or with unexpected ones",
           "`ValueError`: `moss_adapter.safetensors: missing keys [...], unexpected keys [...]` "
           "(up to 5 of each)")
def _keys(tmp):
    folder = saved(tmp)
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != sorted(t)[0]})
    with pytest.raises(ValueError, match=r"moss_adapter.safetensors: missing keys \['model\."):
        load(folder)
    _rewrite_weights(saved(tmp), lambda t: {**t, "extra.text_A": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra.text_A'\]"):
        load(folder)


error(LOAD, "NaN or Inf in the weights file", ValueError,
      "self_attn.v_proj.text_B: the file holds NaN, Inf or non-float values (a diverged run?)",
      lambda tmp: load(_rewrite_weights(saved(tmp), _poison)))


@behaviour(LOAD, "any fault in the folder's files (the rows above, but for the model rows)",
           "refused before the model is touched: it comes back unwrapped, as it was given")
def _model_untouched(tmp):
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="not valid JSON"):
        load(_write(saved(tmp) / "moss_config.json", b"{not json"), model)
    with pytest.raises(ValueError, match="non-float values"):
        load(_rewrite_weights(saved(tmp), _poison), model)
    assert not any(type(m).__name__ == "MossLinear" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@behaviour(LOAD, "weights in another float dtype (float16)", "cast to the model's dtype")
def _half_weights(tmp):
    folder = _rewrite_weights(saved(tmp), lambda t: {k: v.half() for k, v in t.items()})
    assert {p.dtype for p in load(folder).parameters()} == {torch.float32}


test_row = catalogue.test()
