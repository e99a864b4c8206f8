"""moss/backbones/: the registry, the Chameleon spec and the generic one (bad inputs:
tests/test_bad_inputs_model.py, tests/test_bad_inputs_cli.py)."""

import importlib
import pkgutil

import pytest
import torch

import moss.backbones as backbones
from moss import MossConfig, get_moss_model, tiny
from moss.backbones.base import GENERIC, BackboneSpec

from helpers import GRID, IMG, tiny_chameleon, tiny_llama

pytest.importorskip("transformers")


def test_every_spec_module_is_registered_under_its_model_types():
    modules = [m.name for m in pkgutil.iter_modules(backbones.__path__) if m.name != "base"]
    assert modules, "no backbone spec module"
    for name in modules:
        spec = importlib.import_module(f"moss.backbones.{name}").SPEC
        assert isinstance(spec, BackboneSpec) and spec.model_types
        assert all(backbones.SPECS[t] is spec for t in spec.model_types)
    assert backbones.spec_for(tiny_chameleon()).name == "chameleon"
    assert backbones.spec_for(tiny_llama()) is GENERIC
    assert backbones.spec_for(object()) is GENERIC  # not even a transformers model


def test_chameleon_spec_reads_image_tokens_grid_and_vocabulary_from_the_config():
    spec, model = backbones.SPECS["chameleon"], tiny_chameleon()
    ids, grid = spec.image_tokens(model, None, None)
    assert ids == IMG + [3] and grid == (16, 16)  # VQ resolution 32, one downsampling
    assert spec.image_tokens(model, [7, 8], GRID) == ([7, 8], GRID)  # MossConfig's values win
    built, tok = tiny.build(), tiny.ByteTokenizer()
    vocab = spec.vocabulary(built, backbones.TextCodec(tok.encode, 1, 2, 0))
    assert vocab.code_to_token == [tiny.FIRST_CODE + i for i in range(tiny.CODES)]
    assert (vocab.begin_image, vocab.end_image) == (tiny.SPECIALS["<racm3:break>"],
                                                   tiny.SPECIALS["<eoss>"])
    assert vocab.grid == tiny.GRID and vocab.encode_image_file is not None
    moss = get_moss_model(model, MossConfig(r_text=2, r_image=2, image_grid=GRID))
    assert moss.wrapped and not any("vqmodel" in n for n in moss.wrapped)
    assert moss.moss_config.target_modules == list(spec.targets)  # None resolved


def test_the_generic_spec_takes_image_tokens_from_the_config_only():
    model = tiny_llama()
    assert GENERIC.image_tokens(model, None, None) == (None, None)
    assert GENERIC.image_tokens(model, [5], (2, 2)) == ([5], (2, 2))
    assert GENERIC.unmask_image_logits(model) is None
    assert not GENERIC.has_vocabulary
    with pytest.raises(NotImplementedError, match="no image vocabulary"):
        GENERIC.vocabulary(model, backbones.TextCodec(str.split, None, None, 0))
    moss = get_moss_model(model, MossConfig(r_text=2, r_image=2, target_modules=["q_proj"]))
    assert len(moss.wrapped) == 2 and moss.moss_config.target_modules == ["q_proj"]


def test_load_reads_the_builtin_tiny_model():
    model, vocab, decode = backbones.load(None)
    assert backbones.spec_for(model).name == "chameleon"
    assert decode(vocab.encode_text("hi")) == "hi" and vocab.grid == tiny.GRID


def test_an_image_tokenizer_is_never_wrapped_whatever_the_backbone():
    """The generic spec skips a ``vqmodel`` too (Emu3 and Janus name their VQ-VAE so)."""
    model = tiny_llama()
    model.vqmodel = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)})
    moss = get_moss_model(model, MossConfig(r_text=2, r_image=2))
    assert moss.backbone is GENERIC and len(moss.wrapped) == 14
    assert not any("vqmodel" in name for name in moss.wrapped)
