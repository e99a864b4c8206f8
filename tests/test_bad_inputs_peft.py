"""Bad input to MOSS as a PEFT method (MossLoraConfig, get_peft_model and the PeftModel it gives,
PeftModel.from_pretrained, convert_to_peft) and PEFT folders given to MossModel.from_pretrained:
rows of docs/bad-inputs.md (tests/catalogue.py)."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from moss import MossConfig, MossModel, get_moss_model
from moss.peft_method import MossLoraConfig, convert_to_peft

from catalogue import INF, Catalogue
from helpers import tiny_llama

catalogue = Catalogue()
error, errors, behaviour = catalogue.error, catalogue.errors, catalogue.behaviour


CONFIG = "MossLoraConfig / get_peft_model"


def wrap(**kw):
    return get_peft_model(tiny_llama(), MossLoraConfig(r_text=4, r_image=4, **kw))


error(CONFIG, "a MossConfig field with a bad value (each row of `MossConfig` above)", ValueError,
      "r_text: expected an int >= 1, got 0", lambda: MossLoraConfig(r_text=0))
error(CONFIG, "`image_logits` not a bool", TypeError, "image_logits: expected a bool, got str",
      lambda: MossLoraConfig(image_logits="yes"))
error(CONFIG, "`format_version` other than this moss's", ValueError,
      "format_version: this moss reads adapter configs of version 1, the file says 99",
      lambda: MossLoraConfig(format_version=99))
error(CONFIG, "`MossLoraConfig.from_moss_config` of a non-`MossConfig`", TypeError,
      "cfg: expected a moss.MossConfig, got dict",
      lambda: MossLoraConfig.from_moss_config({"r_text": 4}))
error(CONFIG, "a model that fails `get_moss_model`'s checks (each row of `get_moss_model` above)",
      ValueError, "target_modules: no nn.Linear named ['nope'] in LlamaForCausalLM",
      lambda: wrap(target_modules=["nope"]))
error(CONFIG, "a second adapter (`add_adapter`, `load_adapter` under another name)", ValueError,
      "adapter_name: a MOSS model holds one adapter ('default'); adding 'other' is not supported",
      lambda: wrap().add_adapter("other", MossLoraConfig()))
error(CONFIG, "`merge_and_unload`, `merge_adapter`, `unmerge_adapter`", ValueError,
      "merge: a MOSS adapter does not fold into the base weights: it is routed per token",
      lambda: wrap().merge_and_unload(), lambda: wrap().merge_adapter(),
      lambda: wrap().unmerge_adapter())
error(CONFIG, "`delete_adapter`", ValueError,
      "delete_adapter: a MOSS model holds one adapter; unload() removes 'default'",
      lambda: wrap().delete_adapter("default"))
error(CONFIG, "`set_requires_grad` of an adapter it does not hold", ValueError,
      "adapter_names: no adapter named ['other']; this model has ['default']",
      lambda: wrap().set_requires_grad("other"))
error(CONFIG, "`inject_adapter_in_model` (PEFT's injection without a PeftModel)", ValueError,
      "does not support MOSS because it uses shared state stored on the tuner",
      lambda: inject_adapter_in_model(MossLoraConfig(), tiny_llama()))
error(CONFIG, "`generate` with `causal=False` adapters", ValueError,
      "causal: adapters trained with causal=False see tokens to their right and cannot decode",
      lambda: wrap(causal=False).generate(input_ids=torch.tensor([[1, 2]])))


@behaviour(CONFIG, "`disable_adapter()` (the context manager)",
           "`ValueError` from PEFT: `No adapter layers found in the model` (its layer-status check "
           "knows only its own layer classes); `base_model.disable_adapter_layers()`: "
           "`ValueError`: `disable_adapter: a MOSS adapter is always active`")
def _disable():
    pm = wrap()
    with pytest.raises(ValueError, match="No adapter layers found in the model"):
        with pm.disable_adapter():
            pass
    with pytest.raises(ValueError, match="disable_adapter: a MOSS adapter is always active"):
        pm.base_model.disable_adapter_layers()


LOAD = "PeftModel.from_pretrained (a MOSS adapter)"


def peft_saved(tmp: Path) -> Path:
    wrap().save_pretrained(tmp / "peft")
    return tmp / "peft"


def _rewrite_weights(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(edit(tensors) or tensors, folder / "adapter_model.safetensors")
    return folder


def _poison(tensors: dict) -> None:
    tensors[sorted(tensors)[-1]][0] = INF


def peft_load(path, model=None):
    return PeftModel.from_pretrained(tiny_llama() if model is None else model, path)


@behaviour(LOAD, "a moss folder (`MossModel.save_pretrained`'s)",
           "`ValueError` from PEFT: `Can't find 'adapter_config.json'`; "
           "`convert_to_peft(src, dst)` writes the PEFT folder (docs/design.md section 9)")
def _moss_folder(tmp):
    get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4)).save_pretrained(tmp / "moss")
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        peft_load(tmp / "moss")
    peft_load(convert_to_peft(tmp / "moss", tmp / "converted"))


@behaviour(LOAD, "before `moss.peft_method` is imported (the method not registered)",
           "`KeyError: 'MOSS'` from PEFT")
def _unregistered(tmp):
    folder = peft_saved(tmp)
    with pytest.MonkeyPatch.context() as m:
        m.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, "MOSS")
        with pytest.raises(KeyError, match="MOSS"):
            peft_load(folder)


error(LOAD, "weights missing keys, or with unexpected ones", ValueError,
      "adapter_model.safetensors: missing keys ['model.layers.0.mlp.down_proj.image_A'], "
      "unexpected keys []",
      lambda tmp: peft_load(_rewrite_weights(peft_saved(tmp), lambda t: {
          k: v for k, v in t.items() if k != sorted(t)[0]})))
error(LOAD, "`model` with other sizes than the adapter's base", ValueError,
      "expected shape ... the file has",
      lambda tmp: peft_load(peft_saved(tmp), tiny_llama(hidden=48)))
error(LOAD, "NaN or Inf in the weights file", ValueError,
      "self_attn.v_proj.text_B: the file holds NaN, Inf or non-float values (a diverged run?)",
      lambda tmp: peft_load(_rewrite_weights(peft_saved(tmp), _poison)))

CONVERT = "convert_to_peft"


def moss_saved(tmp: Path) -> Path:
    get_moss_model(tiny_llama(), MossConfig(r_text=4, r_image=4)).save_pretrained(tmp / "moss")
    return tmp / "moss"


error(CONVERT, "`dst` a file, or a folder with files in it", FileExistsError,
      "dst: ... exists and is not an empty folder",
      lambda tmp: convert_to_peft(moss_saved(tmp), moss_saved(tmp)),
      lambda tmp: convert_to_peft(moss_saved(tmp), moss_saved(tmp) / "moss_config.json"))
error(CONVERT, "`src` not a moss (or PEFT) adapter folder (each row of "
      "`MossModel.from_pretrained`)", FileNotFoundError,
      "path: ... nowhere/moss_config.json does not exist",
      lambda tmp: convert_to_peft(tmp / "nowhere", tmp / "out"))

MOSS_LOAD = "MossModel.from_pretrained"


def _rewrite_config(folder: Path, drop: str | None = None, **fields) -> Path:
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta.update(fields)
    meta.pop(drop, None)
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    return folder


def moss_load(path):
    return MossModel.from_pretrained(tiny_llama(), path)


error(MOSS_LOAD, "a PEFT folder of another method (`peft_type` not `MOSS`)", ValueError,
      "adapter_config.json: a PEFT adapter of type 'LORA', not a MOSS adapter ('MOSS')",
      lambda tmp: moss_load(_rewrite_config(peft_saved(tmp), peft_type="LORA")))
error(MOSS_LOAD, "a PEFT folder without `adapter_model.safetensors` (`safe_serialization=False`)",
      FileNotFoundError, "path: ... adapter_model.safetensors does not exist (PEFT writes it when "
      "saving with safe_serialization=True",
      lambda tmp: moss_load((peft_saved(tmp) / "adapter_model.safetensors").unlink()
                            or tmp / "peft"))
error(MOSS_LOAD, "a PEFT folder whose keys lack PEFT's `base_model.model.` prefix", ValueError,
      "adapter_model.safetensors: keys ['model.layers.0.mlp.down_proj.image_A' ... lack PEFT's "
      "prefix 'base_model.model.'",
      lambda tmp: moss_load(_rewrite_weights(peft_saved(tmp), lambda t: {
          k.removeprefix("base_model.model."): v for k, v in t.items()})))
error(MOSS_LOAD, "a PEFT folder whose config has no `format_version`", ValueError,
      "format_version: this moss reads adapter configs of version 1, the file says None",
      lambda tmp: moss_load(_rewrite_config(peft_saved(tmp), drop="format_version")))


test_row = catalogue.test()
