"""Injection, routing per forward, and adapter checkpoints.

``get_moss_model(hf_model, cfg)`` wraps the target ``nn.Linear`` layers of that one model
instance (never a global patch) with :class:`moss.layer.MossLinear`, freezes everything else,
and returns a :class:`MossModel`. Each call of the backbone is routed by a forward pre-hook on
it: from an explicit ``route`` / ``images`` layout given to ``MossModel.forward``, else from
``input_ids`` (a full forward builds one RoutingPlan; a call with a non-empty KV cache is a
decode step, served from the layers' rings of past tap products, see moss/router.py), so
``MossModel.generate`` is transformers' own ``generate`` and KV cache. ``unload()`` removes the
hooks and puts the original layers back.

Checkpoints are two files: ``moss_adapter.safetensors`` (adapter tensors only) and
``moss_config.json`` (the MossConfig with a format version, the wrapped layers' names, and the
weights file's SHA-256). Each is written to a temporary file in the same folder, flushed and
renamed into place; the config is renamed last and names the weights it belongs to, so an
interrupted save never yields a pair that loads as something it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import moss_kernels as mk

from .backbones import image_vocabulary, unmask_image_logits
from .config import MossConfig
from .layer import MossLinear
from .router import Router

WEIGHTS_NAME = "moss_adapter.safetensors"
CONFIG_NAME = "moss_config.json"
#: New weights wait under this name until the config naming them is committed (save_pretrained).
PENDING_NAME = ".moss_adapter.safetensors.pending"


def get_moss_model(model: nn.Module, cfg: MossConfig, image_logits: bool = False) -> MossModel:
    """Wrap ``model``'s target linear layers with MOSS adapters and freeze the rest.

    ``image_logits=True`` lifts transformers' Chameleon mask on image-token logits for this
    model (needed to train on image tokens and to generate images); ``unload()`` restores it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, MossConfig):
        raise TypeError(f"cfg: expected a moss.MossConfig, got {type(cfg).__name__}")
    if not isinstance(image_logits, bool):
        raise TypeError(f"image_logits: expected a bool, got {type(image_logits).__name__}")
    if any(isinstance(m, MossLinear) for m in model.modules()):
        raise ValueError("model: already holds MOSS layers (call unload() first)")
    return MossModel(model, cfg, image_logits)


class MossModel(nn.Module):
    def __init__(self, model: nn.Module, cfg: MossConfig, image_logits: bool = False):
        super().__init__()
        # Everything that can refuse the arguments runs before the model is touched.
        ids, grid = image_vocabulary(model, cfg)
        vocab = _vocabulary_size(model)
        if ids is not None and vocab is not None and max(ids) >= vocab:
            raise ValueError(f"image_token_ids: {max(ids)} is outside the model's vocabulary "
                             f"(its input embedding has {vocab} rows)")
        targets = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.target_modules
                   and "vqmodel" not in name.split(".")]
        if not targets:
            raise ValueError(f"target_modules: no nn.Linear named {cfg.target_modules} in "
                             f"{type(model).__name__}")
        self.model = model
        self._restore_mask = unmask_image_logits(model) if image_logits else None
        self.moss_config = cfg
        self.router = Router()
        self.image_token_ids, self.image_grid = ids, grid
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.wrapped = [name for name, _ in targets]
        for name, linear in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    MossLinear(linear, cfg, self.router))
        self._hooks = [model.register_forward_pre_hook(self._route_call, with_kwargs=True),
                       model.register_forward_hook(lambda *_: self.router.end(), always_call=True)]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, route=None,
                images=None, cu_seqlens=None, **kwargs):
        """Run the backbone on a routed batch.

        ``route`` [B, T] (-1 padding, 0 text, 1 image) with ``images`` [n, 3] rows
        ``(flat start, H, W)`` give the layout explicitly (embedding-fed backbones, Emu2);
        otherwise it follows from ``input_ids`` (image token ids and grid of the backbone or
        the MossConfig) and ``attention_mask``.
        """
        if route is not None:
            shape = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
            if 0 in shape:
                raise ValueError(f"inputs_embeds: expected at least one token, got shape "
                                 f"{tuple(shape)}")
            self.router.begin_plan(self._layout_builder(route, images, shape, cu_seqlens))
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds, **kwargs)
        finally:
            self.router.end()

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` with the incremental ConvLoRA decode state."""
        if not self.moss_config.causal:
            raise ValueError("causal: adapters trained with causal=False see tokens to their "
                             "right and cannot decode incrementally")
        return self.model.generate(*args, **kwargs)

    def _route_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            _check_input_ids(input_ids, _vocabulary_size(self.model))
        if self.router.active:  # the layout came from MossModel.forward
            return
        if input_ids is None:
            raise ValueError("input_ids or route: give the token ids, or the explicit layout "
                             "(route and images) when feeding inputs_embeds")
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if past:
            self.router.begin_decode(input_ids, self.image_token_ids, mask)
            return
        ids, grid, causal = self.image_token_ids, self.image_grid, self.moss_config.causal

        def build(window, shared):
            if ids is None or shared:  # every (unpadded) token text
                return mk.RoutingPlan.from_input_ids(torch.zeros_like(input_ids), [1], (1, 1),
                                                     mask, kernel_size=window, causal=causal)
            return mk.RoutingPlan.from_input_ids(input_ids, ids, grid, mask, kernel_size=window,
                                                 causal=causal)
        self.router.begin_plan(build, prefill_ids=input_ids if cache is not None else None,
                               image_ids=ids, grid=grid, mask=mask)

    def _layout_builder(self, route, images, shape, cu_seqlens):
        if not isinstance(route, torch.Tensor):
            raise TypeError(f"route: expected a torch.Tensor [B, T], got {type(route).__name__}")
        if images is None:
            raise ValueError("images: required with route (use an empty [0, 3] tensor for none)")
        if route.numel() != shape.numel():
            raise ValueError(f"route: expected shape {tuple(shape)} like the inputs, got "
                             f"{tuple(route.shape)}")
        route = route.reshape(shape) if cu_seqlens is None else route.reshape(-1)
        images = torch.as_tensor(images, dtype=torch.int64, device=route.device).reshape(-1, 3)
        causal = self.moss_config.causal

        def build(window, shared):
            r = torch.where(route == 1, 0, route) if shared else route
            return mk.RoutingPlan.from_spans(r, images[:0] if shared else images,
                                             kernel_size=window, causal=causal,
                                             cu_seqlens=cu_seqlens)
        return build

    # ------------------------------------------------------------------ adapters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors by name, whole (a collective under FSDP2: call on every rank)."""
        return {name: _whole(p.detach()) for name, p in self.model.named_parameters()
                if p.requires_grad and _is_adapter(name)}

    def unload(self) -> nn.Module:
        """Put the original linear layers back and return the backbone, unchanged."""
        for hook in self._hooks:
            hook.remove()
        if self._restore_mask is not None:
            self._restore_mask()
        for name in self.wrapped:
            parent, _, child = name.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            setattr(owner, child, getattr(owner, child).base)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad[name])
        return self.model

    def save_pretrained(self, path: str | os.PathLike,
                        state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter (``state``: an :meth:`adapter_state_dict` gathered beforehand,
        as the distributed trainer does on every rank before rank 0 writes)."""
        from safetensors.torch import save_file

        # Two files cannot be replaced at once, so one rename commits: the config's, which names
        # the weights by SHA-256. The new weights are written first under PENDING_NAME, the
        # config is replaced (the commit), then the weights are renamed into place. Interrupted
        # before the commit, the folder still holds the previous pair; after it, the loader
        # finds the weights the config names in the pending file (_committed_weights).
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.adapter_state_dict() if state is None else state
        tensors = {k: v.contiguous().cpu() for k, v in state.items()}
        pending = _atomic_write(folder / PENDING_NAME, lambda f: save_file(tensors, f))
        meta = {**self.moss_config.to_dict(), "wrapped": self.wrapped,
                "weights_sha256": _sha256(pending)}
        _atomic_write(folder / CONFIG_NAME,
                      lambda f: Path(f).write_text(json.dumps(meta, indent=2) + "\n"))
        os.replace(pending, folder / WEIGHTS_NAME)
        _fsync_dir(folder)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike,
                        image_logits: bool = False) -> MossModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a folder path (str or os.PathLike), got "
                            f"{type(path).__name__}")
        folder = Path(path)
        if folder.is_file():
            raise FileNotFoundError(f"path: {folder} is a file; expected the adapter folder "
                                    f"(holding {CONFIG_NAME} and {WEIGHTS_NAME})")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file() and not (
                    name == WEIGHTS_NAME and (folder / PENDING_NAME).is_file()):
                raise FileNotFoundError(f"path: {folder / name} does not exist (a MOSS adapter "
                                        f"folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            meta = json.loads((folder / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{folder / CONFIG_NAME}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{folder / CONFIG_NAME}: expected a JSON object, got "
                             f"{type(meta).__name__}")
        wrapped, digest = meta.pop("wrapped", None), meta.pop("weights_sha256", None)
        if digest is None:
            raise ValueError(f"{folder / CONFIG_NAME}: no weights_sha256 (not written by "
                             f"save_pretrained)")
        weights = _committed_weights(folder, digest)
        moss = get_moss_model(model, MossConfig.from_dict(meta), image_logits)
        if wrapped is not None and wrapped != moss.wrapped:
            missing = sorted(set(wrapped) - set(moss.wrapped))
            extra = sorted(set(moss.wrapped) - set(wrapped))
            raise ValueError(f"model: does not match the adapter's base model (layers the "
                             f"adapter has but the model lacks: {missing[:5]}; the model's "
                             f"extra layers: {extra[:5]})")
        try:
            loaded = load_file(weights)
        except SafetensorError as exc:
            raise ValueError(f"{weights}: not a safetensors file ({exc})") from None
        own = dict(moss.model.named_parameters())
        expected = set(moss.adapter_state_dict())
        missing, unexpected = sorted(expected - set(loaded)), sorted(set(loaded) - expected)
        if missing or unexpected:
            raise ValueError(f"{weights}: missing keys {missing[:5]}, unexpected "
                             f"keys {unexpected[:5]}")
        with torch.no_grad():
            for key, value in loaded.items():
                if value.shape != own[key].shape:
                    raise ValueError(f"{key}: expected shape {tuple(own[key].shape)}, the file "
                                     f"has {tuple(value.shape)}")
                if not value.is_floating_point() or not bool(value.isfinite().all()):
                    raise ValueError(f"{key}: the file holds NaN, Inf or non-float values (a "
                                     f"diverged run?)")
                own[key].copy_(value)  # cast to the model's dtype, whatever the file's
        return moss


def _vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the backbone's input embedding (the ids it can read), when it says."""
    try:
        return getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):
        return None


def _check_input_ids(ids, vocab: int | None) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"input_ids: expected at least one token, got shape {tuple(ids.shape)}")
    if vocab is not None:
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            at = bad.nonzero()[0].tolist()
            raise ValueError(f"input_ids{at} = {ids[tuple(at)].item()}: outside the model's "
                             f"vocabulary of {vocab} ids")


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("text_A", "text_B", "image_A", "image_B", "image_down",
                                       "image_conv")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(target: Path, write) -> Path:
    """``write(tmp_path)`` into a temporary file beside ``target``, fsync, rename over it (and
    fsync the folder, so that the rename itself survives a power cut)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _fsync_dir(folder: Path) -> None:
    if os.name == "posix":  # Windows cannot open a folder for fsync; its renames are journaled
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _committed_weights(folder: Path, digest: str) -> Path:
    """The weights file whose SHA-256 the config names: WEIGHTS_NAME, or PENDING_NAME when a
    save was interrupted after committing the config but before renaming the weights."""
    for name in (WEIGHTS_NAME, PENDING_NAME):
        if (folder / name).is_file() and _sha256(folder / name) == digest:
            return folder / name
    raise ValueError(f"{folder / WEIGHTS_NAME}: its SHA-256 does not match the one in "
                     f"{CONFIG_NAME} (a truncated, corrupted or mismatched file)")
