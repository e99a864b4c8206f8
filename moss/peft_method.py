"""MOSS as a PEFT method: ``get_peft_model(model, MossLoraConfig(...))``, ``PeftModel``'s
``from_pretrained`` / ``save_pretrained``, HF ``Trainer`` (docs/design.md section 9).

The second front door to one implementation. :class:`MossTuner` (PEFT's ``BaseTuner``: what a
``PeftModel`` keeps as ``base_model``) injects nothing itself: it builds a :class:`moss.MossModel`
on the backbone, the same MossLinear layers, Router and routing hooks as ``get_moss_model``, and
delegates forward, generate and unload to it. PEFT asks the tuner class which state-dict entries
are the adapter's and how to load them back (its ``_get_adapter_state_dict`` /
``_remap_adapter_state_dict_for_load`` hooks, PEFT >= 0.21): the MossModel's adapter tensors,
keyed by PEFT's ``base_model.model.`` prefix and MossModel's own names, and refused on load by
MossModel's own checks. So a PEFT folder is MossModel's adapter under another file layout:
``MossModel.from_pretrained`` reads it (moss/checkpoint.py); the other way, PEFT only ever opens
``adapter_config.json``, so a moss folder goes through :func:`convert_to_peft` first.

One adapter per model, always active: adding, deleting or disabling adapters and merging are
refused. Importing this module registers the method (``peft_type`` ``"MOSS"``) with PEFT, which
``PeftModel.from_pretrained`` of a MOSS folder needs; ``import moss`` never imports PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import peft
import torch
from packaging.version import Version
from peft import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import checkpoint
from .checkpoint import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_TYPE, PEFT_WEIGHTS_NAME
from .config import FORMAT_VERSION, MossConfig
from .layer import MossLinear
from .model import get_moss_model

if Version(peft.__version__) < Version("0.21"):
    # Older PEFT selects and renames the adapter's state-dict entries itself, LoRA-style, and
    # would save a MOSS adapter empty.
    raise ImportError(f"moss.peft_method needs peft >= 0.21, found {peft.__version__} "
                      f"(pip install 'moss-kernels[peft]')")

_DEFAULT = MossConfig()


@dataclass
class MossLoraConfig(PeftConfig):
    """MossConfig's fields (moss/config.py, which validates them), plus what PEFT's front door
    needs to know at injection: ``image_logits`` (``get_moss_model``'s option). ``format_version``
    is MossConfig's, so that a later moss can refuse an old file.

    ``task_type`` defaults to causal LM: its PeftModel calls the tuner, hence the MossModel.
    ``None`` gives PEFT's bare PeftModel, whose forward and generate call the backbone directly:
    routing from ``input_ids`` still works (the hooks are on the backbone, and so is the
    refusal to decode with ``causal=False`` adapters), but the explicit ``route`` / ``images``
    layout is MossModel.forward's and is not available."""

    task_type: str | None = "CAUSAL_LM"
    r_text: int = _DEFAULT.r_text
    r_image: int = _DEFAULT.r_image
    alpha_text: float = _DEFAULT.alpha_text
    alpha_image: float = _DEFAULT.alpha_image
    kernel_size: int = _DEFAULT.kernel_size
    causal: bool = _DEFAULT.causal
    dropout: float = _DEFAULT.dropout
    image_adapter: str = _DEFAULT.image_adapter
    target_modules: list[str] | None = None
    image_token_ids: list[int] | None = None
    image_grid: tuple[int, int] | None = None
    backend: str | None = None
    image_logits: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if not isinstance(self.image_logits, bool):
            raise TypeError(f"image_logits: expected a bool, got "
                            f"{type(self.image_logits).__name__}")
        # MossConfig validates and normalises; its values are kept in their JSON form, so that
        # a config read back from adapter_config.json equals the one saved.
        for name, value in self.to_moss_config().to_dict().items():
            setattr(self, name, value)

    def to_moss_config(self) -> MossConfig:
        """The MossConfig these fields describe (what ``get_moss_model`` takes)."""
        return MossConfig.from_dict({"format_version": self.format_version,
                                     **{f.name: getattr(self, f.name) for f in fields(MossConfig)}})

    @classmethod
    def from_moss_config(cls, cfg: MossConfig, **kwargs) -> MossLoraConfig:
        """The PEFT config of ``cfg`` (``kwargs``: PEFT's own fields, ``image_logits``)."""
        if not isinstance(cfg, MossConfig):
            raise TypeError(f"cfg: expected a moss.MossConfig, got {type(cfg).__name__}")
        return cls(**cfg.to_dict(), **kwargs)


class MossTuner(BaseTuner):
    """PEFT's view of a :class:`MossModel` (see the module docstring)."""

    prefix = "moss_"
    tuner_layer_cls = MossLinear
    target_module_mapping: dict = {}  # the backbone specs resolve targets (moss/backbones/)
    # The Router and the routing hooks belong to the MossModel this tuner keeps, so PEFT's
    # inject_adapter_in_model (which returns only the backbone) is refused.
    uses_shared_state = True

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype=True,
                       low_cpu_mem_usage=False, state_dict=None) -> None:
        if "moss_model" in self.__dict__:
            raise ValueError(f"adapter_name: a MOSS model holds one adapter "
                             f"({self.active_adapter!r}); adding {adapter_name!r} is not "
                             f"supported (unload() first)")
        config = self.peft_config[adapter_name]
        moss = get_moss_model(model, config.to_moss_config(), config.image_logits)
        # Kept out of the module tree: it holds the same backbone as self.model, whose tensors
        # the state dict would otherwise list twice.
        self.__dict__["moss_model"] = moss
        config.target_modules = list(moss.moss_config.target_modules)  # resolved, as MossModel's
        self.targeted_module_names = list(moss.wrapped)
        if config.inference_mode:
            self.set_requires_grad(adapter_name, False)

    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("MOSS injects through MossModel (inject_adapter), not per module")

    def forward(self, *args, **kwargs):
        return self.moss_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.moss_model.generate(*args, **kwargs)

    # -------------------------------------------------------------- the adapter's parameters
    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown}; this model has "
                             f"{list(self.peft_config)}")
        for _, layer, name in _adapters(self.model):
            getattr(layer, name).requires_grad_(requires_grad)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        # The one adapter is always the active one: what is left to set is whether it trains.
        self.set_requires_grad(adapter_name, not inference_mode)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's default for every method: half-precision adapters are kept in float32 (the
        layer casts them to the input's dtype per call, as for a MossModel trained under
        autocast)."""
        if not autocast_adapter_dtype:
            return
        for _, layer, name in _adapters(self.model):
            p = getattr(layer, name)
            if p.dtype in (torch.float16, torch.bfloat16):
                setattr(layer, name, nn.Parameter(p.detach().float(),
                                                  requires_grad=p.requires_grad))

    # -------------------------------------------------------------- what PEFT cannot do here
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            raise ValueError("disable_adapter: a MOSS adapter is always active; for the base "
                             "model's outputs, unload() it (or load the backbone again)")

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError(f"delete_adapter: a MOSS model holds one adapter; unload() removes "
                         f"{adapter_name!r} with its layers")

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError(_NO_MERGE)

    def unmerge_adapter(self) -> None:
        raise ValueError(_NO_MERGE)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False,
                                     adapter_names=None) -> nn.Module:
        if merge:
            raise ValueError(_NO_MERGE)
        model = self.moss_model.unload()
        del model.peft_config  # as PEFT's unload does: the backbone is a PEFT model no more
        return model

    # -------------------------------------------------------------- state dict (PEFT >= 0.21)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict,
                                unwanted_adapter_names) -> dict[str, torch.Tensor]:
        """The MossModel's adapter tensors, under PEFT's key prefix."""
        keys = [f"{path}.{name}" for path, _, name in _adapters(model)]
        return {key: state_dict[key] for key in keys}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # one adapter: its name is in no key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict
                                           ) -> dict[str, torch.Tensor]:
        """Refuse what ``MossModel.from_pretrained`` refuses (PEFT itself would load a partial
        or mis-shaped adapter with a warning at most); the keys need no remapping."""
        checkpoint.check_finite(state_dict)
        model.base_model.moss_model.check_adapter_state(
            {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}, PEFT_WEIGHTS_NAME)
        return state_dict


_NO_MERGE = ("merge: a MOSS adapter does not fold into the base weights: it is routed per token "
             "(the text LoRA on text tokens only, the ConvLoRA mixing each image token with its "
             "grid neighbours), not one linear map for every token; keep the adapter, or "
             "unload() for the base model")


def _adapters(model: nn.Module) -> list[tuple[str, MossLinear, str]]:
    """``(layer path, layer, parameter name)`` of every adapter tensor under ``model`` (for a
    PeftModel, ``path.name`` is its key in the state dict: ``base_model.model.<layer>.<param>``)."""
    return [(path, layer, name) for path, layer in model.named_modules()
            if isinstance(layer, MossLinear) for name in layer.adapter_names]


def convert_to_peft(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> Path:
    """Write the adapter folder ``src`` (``MossModel.save_pretrained``'s) as a PEFT folder ``dst``
    that ``PeftModel.from_pretrained`` loads (``kwargs``: :class:`MossLoraConfig`'s PEFT fields).
    ``dst`` must not exist, or be empty: the folder is written beside it and renamed into place,
    so it appears whole or not at all."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"dst: {dst} exists and is not an empty folder")
    meta, tensors, _ = checkpoint.load_adapter(src)
    meta.pop("wrapped", None)
    config = MossLoraConfig.from_moss_config(MossConfig.from_dict(meta), **kwargs)
    config.inference_mode = True  # what PeftModel.save_pretrained writes
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        weights = {PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}
        checkpoint.atomic_write(tmp / PEFT_WEIGHTS_NAME,
                                lambda f: save_file(weights, f, metadata={"format": "pt"}))
        checkpoint.atomic_write(tmp / PEFT_CONFIG_NAME, lambda f: Path(f).write_text(
            json.dumps(config.to_dict(), indent=2, sort_keys=True)))
        os.replace(tmp, dst)
        checkpoint.fsync_dir(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# PEFT's register_peft_method accepts only names of its own PeftType enum, which a third party
# cannot extend; a peft_type string keyed into the same three mappings is what it would write
# (and what PEFT reads back from adapter_config.json).
PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MossLoraConfig
PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MossTuner
PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = MossTuner.prefix
