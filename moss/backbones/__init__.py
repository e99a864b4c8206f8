"""Backbone specs: what MOSS needs to know about each model family, one module per family
(docs/design.md section 7), in one registry keyed by the HF config's ``model_type`` (the
pattern of PEFT's target-module mappings and Liger-Kernel's ``MODEL_TYPE_TO_APPLY_LIGER_FN``).

Every module of this package but ``base`` defines ``SPEC``, a :class:`~.base.BackboneSpec`,
and is registered under the ``model_types`` it names, so adding a backbone is adding one
module here (and its tests). A model whose type has no spec gets the generic one.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .base import GENERIC, BackboneSpec, TextCodec, Vocabulary


def _discover() -> dict[str, BackboneSpec]:
    specs = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            spec = importlib.import_module(f"{__name__}.{module.name}").SPEC
            specs.update(dict.fromkeys(spec.model_types, spec))
    return specs


#: model_type -> spec.
SPECS: dict[str, BackboneSpec] = _discover()


def spec_for(model: nn.Module) -> BackboneSpec:
    """The spec of ``model``'s family (by ``model.config.model_type``), else the generic one."""
    return SPECS.get(getattr(getattr(model, "config", None), "model_type", None), GENERIC)


def load(path: str | None) -> tuple[nn.Module, Vocabulary, Callable[[list[int]], str]]:
    """``(model, its Vocabulary, a token decoder)`` for the command line: the built-in tiny
    Chameleon (``path`` None, moss/tiny.py) or a local checkpoint folder with its tokenizer."""
    if path is None:
        from .. import tiny

        model, tok = tiny.build(), tiny.ByteTokenizer()
        text = TextCodec(tok.encode, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        return model, spec_for(model).vocabulary(model, text), tok.decode
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model: {folder} is not a local checkpoint folder")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"--model: {folder / 'config.json'} is not a transformers config "
                         f"({exc})") from None
    spec = SPECS.get(model_type, GENERIC)
    if not spec.has_vocabulary:
        readable = sorted({s.name for s in SPECS.values() if s.has_vocabulary})
        raise ValueError(f"--model: {folder} holds a {model_type} model, which has no image "
                         f"vocabulary moss can read (backbones with one: {', '.join(readable)}); "
                         f"adapt it from Python with an explicit layout "
                         f"(MossModel.forward(route=..., images=...))")
    from transformers import AutoTokenizer

    model = spec.load_model(folder)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = TextCodec(lambda s: tok.encode(s, add_special_tokens=False), tok.bos_token_id,
                     tok.eos_token_id, tok.pad_token_id or 0)
    return model, spec.vocabulary(model, text), tok.decode


__all__ = ["SPECS", "BackboneSpec", "TextCodec", "Vocabulary", "load", "spec_for"]
