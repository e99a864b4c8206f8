"""Injection and routing per forward: ``get_moss_model`` / ``MossModel``.

``get_moss_model(hf_model, cfg)`` wraps the target ``nn.Linear`` layers of that one model
instance (never a global patch) with :class:`moss.layer.MossLinear`, freezes everything else,
and returns a :class:`MossModel`. What it knows of the model's family (targets, image tokens,
logit masking) comes from its backbone spec (moss/backbones/). Each call of the backbone is
routed by a forward pre-hook on it: from an explicit ``route`` / ``images`` layout given to
``MossModel.forward``, else from ``input_ids`` (a full forward builds one RoutingPlan; a call
with a non-empty KV cache is a decode step, served from the layers' rings of past tap products,
see moss/router.py), so ``MossModel.generate`` is transformers' own ``generate`` and KV cache.
``unload()`` removes the hooks and puts the original layers back. The adapter files are
moss/checkpoint.py's.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import torch
from torch import nn

import moss_kernels as mk

from . import checkpoint
from .backbones import spec_for
from .config import MossConfig
from .layer import MossLinear
from .router import KWARG, Router


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
        spec = spec_for(model)
        ids, grid = spec.image_tokens(model, cfg.image_token_ids, cfg.image_grid)
        vocab = _vocabulary_size(model)
        if ids is not None and vocab is not None and max(ids) >= vocab:
            raise ValueError(f"image_token_ids: {max(ids)} is outside the model's vocabulary "
                             f"(its input embedding has {vocab} rows)")
        names = cfg.target_modules or spec.targets
        targets = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in names
                   and not set(spec.never_wrap) & set(name.split("."))]
        if not targets:
            raise ValueError(f"target_modules: no nn.Linear named {list(names)} in "
                             f"{type(model).__name__}")
        self.model = model
        self.backbone = spec
        self._restore_mask = spec.unmask_image_logits(model) if image_logits else None
        # The targets resolved, so that a checkpoint names them whatever the defaults become.
        self.moss_config = dataclasses.replace(cfg, target_modules=list(names))
        self.router = Router()
        self._decode_by = "ids"  # how the last prefill was routed: "ids" or an explicit "route"
        self._vocab = vocab  # the input embedding's rows, read again by every call but decode's
        self.image_token_ids, self.image_grid = ids, grid
        self.row_end_ids = spec.row_end_ids(model) if ids is not None else None
        self._unroutable = spec.unroutable_ids(model)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.wrapped = [name for name, _ in targets]
        blocks = _decoder_layers(spec, model)
        block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
        for name, linear in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    MossLinear(linear, cfg, self.router, block_of.get(id(linear))))
        # The call's routing rides in the backbone's keyword arguments to its decoder layers,
        # where gradient checkpointing's recomputation finds it (moss/router.py).
        self._passes_routing = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in
                                   inspect.signature(model.forward).parameters.values())
        self._hooks = [model.register_forward_pre_hook(self._route_call, with_kwargs=True),
                       model.register_forward_hook(lambda *_: self.router.end(), always_call=True)]
        self._hooks += [child.register_forward_pre_hook(self.router.replay_hook(i),
                                                        with_kwargs=True)
                        for i, b in enumerate(blocks) for child in b.children()]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, route=None,
                images=None, cu_seqlens=None, **kwargs):
        """Run the backbone on a routed batch.

        ``route`` [B, T] (-1 padding, 0 text, 1 image) with ``images`` [n, 3] rows
        ``(flat start, H, W)``, or [n, 4] rows with a row stride (rows separated by other
        tokens), give the layout explicitly (embedding-fed backbones, Emu2); otherwise it
        follows from ``input_ids`` (image token ids and grid, or row ends, of the backbone or
        the MossConfig) and ``attention_mask``.

        Explicit layouts decode incrementally too (embedding-fed generators, Janus:
        moss/embedding_fed.py): a call with an empty KV cache (``past_key_values`` / ``cache``)
        is the prefill, whose images must be runs of image tokens on one grid (the MossConfig's
        ``image_grid``, else the images'), as token-based images are; each later call gives only
        ``route`` [B, T] for its new tokens (``images`` not needed): an image run is cut into
        consecutive grid-sized images, as in the prefill.
        """
        if route is not None:
            shape = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
            if 0 in shape:
                raise ValueError(f"inputs_embeds: expected at least one token, got shape "
                                 f"{tuple(shape)}")
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if _past_length(cache):
                self._decode_explicit(route, shape)
            else:
                build = self._layout_builder(route, images, shape, cu_seqlens)
                if cache is None:
                    self.router.begin_plan(build)
                else:
                    self._prefill_explicit(build, route, images, shape, cu_seqlens)
                    self.router.follow(cache)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds, **kwargs)
        finally:
            self.router.end()

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` with the incremental ConvLoRA decode state."""
        return self.model.generate(*args, **kwargs)

    def _route_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        decoding = _past_length(cache) > 0
        if not decoding:  # a decode step checks its ids against the vocabulary of its prefill
            self._vocab = _vocabulary_size(self.model)  # (read through transformers: ~30 us)
        if input_ids is not None:
            _check_input_ids(input_ids, self._vocab, reads_values(input_ids))
        if self.router.active:  # the layout came from MossModel.forward
            return self._pass_routing(args, kwargs) if self.router.current else None
        if input_ids is None:
            raise ValueError("input_ids or route: give the token ids, or the explicit layout "
                             "(route and images) when feeding inputs_embeds")
        mask = kwargs.get("attention_mask")
        if decoding:  # checked here, so that every door to generate (PEFT's too) is
            self._check_decode("ids")  # covered
            self.router.begin_decode(input_ids, mask, reads_values(input_ids))
            return
        self._decode_by = "ids"
        ids, grid, causal = self.image_token_ids, self.image_grid, self.moss_config.causal

        validate = reads_values(input_ids)
        if validate and self._unroutable and bool(
                torch.isin(input_ids, torch.tensor(self._unroutable)).any()):
            raise ValueError(
                f"input_ids: hold the {self.backbone.name} image placeholder "
                f"{self._unroutable}, which the model replaces by embeddings whose rows MOSS "
                f"cannot see; put the image's own tokens in its place (docs: "
                f"moss/backbones/{self.backbone.name}.py)")
        rows = self.row_end_ids

        def build(window, with_images):
            if ids is None or not with_images:  # every (unpadded) token text
                return mk.RoutingPlan.from_input_ids(torch.zeros_like(input_ids), [1], (1, 1),
                                                     mask, kernel_size=window, causal=causal,
                                                     validate=validate)
            return mk.RoutingPlan.from_input_ids(input_ids, ids, grid, mask, kernel_size=window,
                                                 causal=causal, validate=validate,
                                                 row_end_ids=rows)
        self.router.begin_plan(build, prefill_ids=input_ids if cache is not None else None,
                               image_ids=ids, grid=grid, mask=mask, row_ends=rows,
                               max_width=self.backbone.max_image_width, validate=validate)
        if cache is not None:
            self.router.follow(cache)
        return self._pass_routing(args, kwargs)

    def _pass_routing(self, args, kwargs):
        if not self._passes_routing:
            return None
        return args, {**kwargs, KWARG: self.router.current}

    def _check_decode(self, by: str) -> None:
        if not self.moss_config.causal:
            raise ValueError("causal: adapters trained with causal=False see tokens to "
                             "their right and cannot decode incrementally")
        if self._decode_by != by:
            raise ValueError(
                "route: the prefill gave an explicit layout, so every decode call must give its "
                "new tokens' route" if by == "ids" else
                "route: the prefill was routed from input_ids, so decode calls must be too")

    def _prefill_explicit(self, build, route, images, shape, cu_seqlens) -> None:
        """Start an explicit-layout generation: the decode state of the run-length kind, fed
        with the route's image tokens as if they were image ids (``images`` checked to be those
        runs cut into grid-sized images)."""
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: packed sequences cannot be decoded incrementally "
                             "(give a [B, T] batch with padding)")
        kinds = route.reshape(shape)
        mask, pseudo_ids = (kinds >= 0).long(), (kinds == 1).long()
        images = _images_tensor(images, kinds.device)
        grid = self.image_grid
        if grid is None and len(images):
            grid = tuple(images[0, 1:3].tolist())
        if grid is None:
            raise ValueError("image_grid: decoding with an explicit layout needs the grid of the "
                             "images to come; set MossConfig(image_grid=(H, W))")
        if reads_values(kinds):
            want = mk.RoutingPlan.from_input_ids(pseudo_ids, [1], grid, mask, validate=False).images
            given = images[images[:, 0].argsort()][:, :3]
            strided = images.shape[1] == 4 and bool((images[:, 3] != images[:, 2]).any())
            if strided or not torch.equal(given, want.to(given.device)):
                raise ValueError(f"images: decoding an explicit layout needs each image to be a "
                                 f"run of image tokens on one {grid[0]} x {grid[1]} grid (a "
                                 f"run longer than H*W is consecutive images), without row "
                                 f"strides; got {images.tolist()[:4]}")
        self.router.begin_plan(build, prefill_ids=pseudo_ids, image_ids=[1], grid=grid, mask=mask)
        self._decode_by = "route"

    def _decode_explicit(self, route, shape) -> None:
        if not isinstance(route, torch.Tensor):
            raise TypeError(f"route: expected a torch.Tensor [B, T], got {type(route).__name__}")
        if route.numel() != shape.numel():
            raise ValueError(f"route: expected shape {tuple(shape)} like the inputs, got "
                             f"{tuple(route.shape)}")
        self._check_decode("route")
        kinds = route.reshape(shape)
        self.router.begin_decode((kinds == 1).long(), (kinds >= 0).long(), reads_values(kinds))

    def _layout_builder(self, route, images, shape, cu_seqlens):
        if not isinstance(route, torch.Tensor):
            raise TypeError(f"route: expected a torch.Tensor [B, T], got {type(route).__name__}")
        if images is None:
            raise ValueError("images: required with route (use an empty [0, 3] tensor for none)")
        if route.numel() != shape.numel():
            raise ValueError(f"route: expected shape {tuple(shape)} like the inputs, got "
                             f"{tuple(route.shape)}")
        route = route.reshape(shape) if cu_seqlens is None else route.reshape(-1)
        images = _images_tensor(images, route.device)
        causal, validate = self.moss_config.causal, reads_values(route)

        def build(window, with_images):
            r = route if with_images else torch.where(route == 1, 0, route)
            return mk.RoutingPlan.from_spans(r, images if with_images else images[:0],
                                             kernel_size=window, causal=causal,
                                             cu_seqlens=cu_seqlens, validate=validate)
        return build

    # ------------------------------------------------------------------ adapters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors by name, whole (a collective under FSDP2: call on every rank)."""
        return {f"{name}.{param}": _whole(getattr(layer, param).detach())
                for name, layer in self.model.named_modules() if isinstance(layer, MossLinear)
                for param in layer.adapter_names}

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
        """Write the adapter folder (``state``: an :meth:`adapter_state_dict` gathered
        beforehand, as the distributed trainer does on every rank before rank 0 writes)."""
        checkpoint.save_adapter(path, {**self.moss_config.to_dict(), "wrapped": self.wrapped},
                                self.adapter_state_dict() if state is None else state)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike,
                        image_logits: bool = False) -> MossModel:
        # Every file-level fault is refused before the model is touched (load_adapter).
        meta, loaded, weights = checkpoint.load_adapter(path)
        wrapped = meta.pop("wrapped", None)
        moss = get_moss_model(model, MossConfig.from_dict(meta), image_logits)
        if wrapped is not None and wrapped != moss.wrapped:
            missing = sorted(set(wrapped) - set(moss.wrapped))
            extra = sorted(set(moss.wrapped) - set(wrapped))
            raise ValueError(f"model: does not match the adapter's base model (layers the "
                             f"adapter has but the model lacks: {missing[:5]}; the model's "
                             f"extra layers: {extra[:5]})")
        moss.check_adapter_state(loaded, weights)
        own = dict(moss.model.named_parameters())
        with torch.no_grad():
            for key, value in loaded.items():
                own[key].copy_(value)  # cast to the model's dtype, whatever the file's
        return moss

    def check_adapter_state(self, loaded: dict[str, torch.Tensor], source) -> None:
        """Refuse adapter tensors (keyed as :meth:`adapter_state_dict`; read from ``source``)
        that do not fit this model, before any is copied: missing or unexpected keys, other
        shapes. Both front doors load through it (moss/peft_method.py)."""
        own = dict(self.model.named_parameters())
        expected = set(self.adapter_state_dict())
        missing, unexpected = sorted(expected - set(loaded)), sorted(set(loaded) - expected)
        if missing or unexpected:
            raise ValueError(f"{source}: missing keys {missing[:5]}, unexpected keys "
                             f"{unexpected[:5]}")
        for key, value in loaded.items():
            if value.shape != own[key].shape:
                raise ValueError(f"{key}: expected shape {tuple(own[key].shape)}, the file "
                                 f"has {tuple(value.shape)}")


def _images_tensor(images, device) -> torch.Tensor:
    """An explicit layout's ``images`` as an int64 [n, 3] or [n, 4] (row strides) tensor."""
    images = torch.as_tensor(images, dtype=torch.int64, device=device)
    return images if images.dim() == 2 else images.reshape(-1, 3)  # (an empty list)


def cache_kwarg(model: nn.Module) -> str:
    """The KV-cache keyword of ``model.forward``: transformers 5 renames ``past_key_values`` to
    ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def _past_length(cache) -> int:
    """Tokens already in a KV cache (0: none, or no cache)."""
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0


def _decoder_layers(spec, model: nn.Module) -> list[nn.Module]:
    """The backbone's decoder layers, or none if its layout is not the spec's (such a model
    trains, but not under gradient checkpointing: moss/router.py says so when it happens)."""
    try:
        return spec.decoder_layers(model)
    except (AttributeError, TypeError):
        return []


def _vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the backbone's input embedding (the ids it can read), when it says."""
    try:
        return getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):
        return None


#: Set to 1 to check the values of inputs on a GPU too (see :func:`reads_values`).
CHECK_ENV = "MOSS_CHECK_INPUTS"


def reads_values(t: torch.Tensor) -> bool:
    """Whether this call runs the checks that read input values (ids inside the vocabulary,
    attention mask of 0/1, an explicit layout's consistency).

    Reading a value is free for a CPU tensor in eager mode, where ids usually come from the
    tokenizer; on a GPU it is a host synchronisation per call, so there the checks run only
    with ``MOSS_CHECK_INPUTS=1``; under torch.compile never (a branch on a value is a graph
    break). Shapes and types are always checked.
    """
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get(CHECK_ENV) == "1"


def _check_input_ids(ids, vocab: int | None, values: bool) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {ids.dtype}")
    if ids.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few kernels take them
        raise TypeError(f"input_ids: {ids.dtype} is not supported, give int64 (or int32) ids")
    if ids.numel() == 0:
        raise ValueError(f"input_ids: expected at least one token, got shape {tuple(ids.shape)}")
    if vocab is not None and values:
        low, high = torch.aminmax(ids)  # one op: this runs on every decode step
        if int(low) < 0 or int(high) >= vocab:
            bad = (ids < 0) | (ids >= vocab)
            at = bad.nonzero()[0].tolist()
            raise ValueError(f"input_ids{at} = {ids[tuple(at)].item()}: outside the model's "
                             f"vocabulary of {vocab} ids")


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
