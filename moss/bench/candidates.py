"""What ``moss bench --model`` times, each a copy of one decoder, and the checks made before:

* ``frozen``   the decoder alone. Its training step is the floor every adapter method pays:
               forward, loss, and a backward that carries the gradient down to the input
               embeddings (every activation gradient; no weight gradient, no optimiser step).
               An adapter method stops one layer earlier (its first layer's input needs no
               gradient), so the floor is a little high: about one layer's dx GEMMs.
* ``peft``     ``peft.get_peft_model`` with ``LoraConfig(r, lora_alpha, lora_dropout)`` on MOSS's
               default targets (every attention and MLP projection): one linear LoRA that
               every token takes. What a user has today.
* ``moss:<backend>``
               ``get_moss_model`` with ``MossConfig(r_text=r_image=r, kernel_size=K, dropout)``,
               the same targets and alpha: text tokens a linear LoRA, image tokens a causal
               K x K ConvLoRA, on one backend.

A training step is: gradients to None, forward with the next-token loss over every position,
backward, AdamW step over the trainable parameters; train mode (dropout on). Decoding is greedy
inside an image (argmax over the image ids, as an image generator constrains its logits there):
a prompt ending where the last image starts is prefilled through the KV cache, untimed, then
``decode_tokens`` steps of one token per sequence are timed. Eval mode: dropout is off, so each
candidate's decoding is timed once, whatever the dropout.

The checks (:func:`check`), each against the same dtype's result, within ``TOLERANCE``: fresh
adapters (B = 0) leave the frozen decoder's logits unchanged; with random adapters, every MOSS
backend gives ``moss:reference``'s logits and adapter gradients, and PEFT gives the logits of
MOSS's ``shared`` variant (one LoRA for every token) holding the same weights; and decoding
through the KV cache gives each candidate's own full-forward logits.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import spec_for
from ..config import MossConfig
from ..model import get_moss_model
from .decoder import ModelCase
from .runner import TOLERANCE, _rel_err

#: LoRA's usual alpha = 2 r, for PEFT and both MOSS adapters alike.
ALPHA_PER_RANK = 2.0
#: Small, so that a run's few dozen steps on random data keep every value finite.
LEARNING_RATE = 1e-5
#: Decoding steps compared with the full forward (:func:`check`).
CHECKED_STEPS = 3


@dataclass
class Candidate:
    name: str
    dropout: float | None  # None: the frozen decoder
    model: nn.Module
    optimizer: torch.optim.Optimizer | None

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_step(self, ids: torch.Tensor) -> Callable[[], Callable[[], None]]:
        """``make_call`` for :func:`moss.bench.runner.time_once`: one training step on ``ids``."""
        def step():
            self.model.train()
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self.model(input_ids=ids, labels=ids).loss.backward()
            if self.optimizer is not None:
                self.optimizer.step()

        return lambda: step

    def decoding(self, prompt: torch.Tensor, steps: int, image_ids: range
                 ) -> Callable[[], Callable[[], None]]:
        """``make_call``: prefills ``prompt`` (untimed) and returns the ``steps`` greedy
        decoding steps that follow it."""
        def make():
            self.model.eval()
            cache, logits = self.prefill(prompt)
            token = _greedy(logits, image_ids)

            def run():
                nonlocal token
                with torch.no_grad():
                    for _ in range(steps):
                        logits = self.model(input_ids=token, cache=cache,
                                            use_cache=True).logits
                        token = _greedy(logits, image_ids)

            return run

        return make

    def prefill(self, prompt: torch.Tensor):
        """The KV cache after ``prompt``, and the logits at its last position."""
        from transformers import DynamicCache

        # An empty cache, as generate passes one: MOSS seeds its decode state from a prefill
        # only when it sees a cache.
        cache = DynamicCache()
        with torch.no_grad():
            logits = self.model(input_ids=prompt, cache=cache, use_cache=True,
                                logits_to_keep=1).logits
        return cache, logits


def _greedy(logits: torch.Tensor, image_ids: range) -> torch.Tensor:
    """``[B, 1]``: each sequence's most likely image token."""
    return logits[:, -1, image_ids.start:image_ids.stop].argmax(-1, keepdim=True) + image_ids.start


def build(case: ModelCase, base: nn.Module, name: str, dropout: float | None) -> Candidate:
    """Candidate ``name`` (``frozen``, ``peft`` or ``moss:<backend>``) on a copy of ``base``."""
    model = copy.deepcopy(base)
    alpha = ALPHA_PER_RANK * case.rank
    if name == "frozen":
        model.enable_input_require_grads()  # the backward reaches the embeddings' output
        return Candidate(name, None, model, None)
    if name == "peft":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # PEFT's own use of an alias transformers deprecated
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            model = get_peft_model(model, LoraConfig(
                r=case.rank, lora_alpha=alpha, lora_dropout=dropout,
                target_modules=list(spec_for(model).targets)))
    else:
        model = get_moss_model(model, moss_config(case, dropout, name.removeprefix("moss:")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=LEARNING_RATE)
    return Candidate(name, dropout, model, optimizer)


def moss_config(case: ModelCase, dropout: float, backend: str | None,
                image_adapter: str = "conv") -> MossConfig:
    alpha = ALPHA_PER_RANK * case.rank
    return MossConfig(r_text=case.rank, r_image=case.rank, alpha_text=alpha, alpha_image=alpha,
                      kernel_size=case.kernel_size, dropout=dropout, image_adapter=image_adapter,
                      image_token_ids=list(case.image_ids), image_grid=case.grid,
                      backend=backend)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Random trainable parameters, the same for models whose parameters have the same shapes
    in the same order: LoRA's B starts at zero, which would leave every check blind to the
    adapters. Scaled by fan-in, so that the adapters move the logits without swamping them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 * fan_in ** -0.5))


def check(case: ModelCase, base: nn.Module, candidates: list[Candidate],
          decoders: list[Candidate], ids: torch.Tensor, log=print) -> dict[str, str]:
    """{candidate name: what is wrong} (see the module docstring; the decoding check for
    ``decoders``); every candidate is left with random adapters and no gradients."""
    tol = TOLERANCE[base.dtype]
    wrong: dict[str, str] = {}

    def compare(who: str, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = _rel_err(got, want.double())
        if not err <= tol and who not in wrong:
            wrong[who] = f"{what} off by {err:.1e} (tolerance {tol:.0e} for {base.dtype})"
            log(f"  {who}: WRONG, not timed: {wrong[who]}")

    frozen = _logits(base, ids)
    for c in candidates:
        if c.optimizer is not None:
            compare(c.name, "logits with fresh adapters (vs the frozen decoder)",
                    _logits(c.model, ids), frozen)
            randomize(c.model)
    del frozen

    moss = [c for c in candidates if c.name.startswith("moss:") and c.name != "moss:reference"]
    if moss:
        reference = build(case, base, "moss:reference", 0.0).model
        randomize(reference)
        want, want_grads = _logits_and_grads(reference, ids)
        del reference
        for c in moss:
            got, grads = _logits_and_grads(c.model, ids)
            compare(c.name, "logits (vs moss:reference, random adapters)", got, want)
            for name, g in grads.items():
                compare(c.name, f"d{name} (vs moss:reference)", g, want_grads[name])
        del want, want_grads
    for c in candidates:
        if c.name == "peft":
            compare(c.name, "logits (vs MOSS's shared variant, same weights)",
                    _logits(c.model, ids), _logits(_shared_twin(case, base, c.model), ids))
    prompt = ids[:, :case.image_starts()[-1]]
    for c in decoders:
        got, want = _decoded_and_full(c, prompt, case.image_ids)
        compare(c.name, "logits decoding through the KV cache (vs a full forward)", got, want)
    for c in candidates:
        c.model.zero_grad(set_to_none=True)
    return wrong


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logits_and_grads(model: nn.Module, ids: torch.Tensor):
    """Eval mode (no dropout): logits, and the adapters' gradients of the loss by name."""
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _shared_twin(case: ModelCase, base: nn.Module, peft_model: nn.Module) -> nn.Module:
    """MOSS's ``shared`` variant on a copy of ``base``, holding ``peft_model``'s LoRA weights."""
    twin = get_moss_model(copy.deepcopy(base), moss_config(case, 0.0, "reference", "shared"))
    lora = peft_model.get_base_model()
    with torch.no_grad():
        for name in twin.wrapped:
            ours, theirs = twin.model.get_submodule(name), lora.get_submodule(name)
            ours.text_A.copy_(theirs.lora_A["default"].weight)
            ours.text_B.copy_(theirs.lora_B["default"].weight)
    return twin


def _decoded_and_full(c: Candidate, prompt: torch.Tensor, image_ids: range):
    """The logits of :data:`CHECKED_STEPS` greedy steps through the KV cache, and a full
    forward's at the same positions."""
    c.model.eval()
    cache, logits = c.prefill(prompt)
    fed, steps = [], []
    with torch.no_grad():
        for _ in range(CHECKED_STEPS):
            fed.append(_greedy(logits, image_ids))
            logits = c.model(input_ids=fed[-1], cache=cache, use_cache=True).logits
            steps.append(logits[:, -1])
    full = _logits(c.model, torch.cat([prompt, *fed], dim=1))[:, -CHECKED_STEPS:]
    return torch.stack(steps, dim=1), full
