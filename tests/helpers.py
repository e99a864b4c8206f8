"""What the tests share: the backends they enumerate, the tolerance rule, random layouts, an
independent formulation of the layer, random parameters, tiny transformers models, and a crash
injector for checkpoint writes. Fixtures live in conftest.py; everything else is here.

The independent formulation (:func:`conv2d_formulation`) is what the paper's eager code does:
boolean-mask the text tokens through a linear LoRA and run one ``F.conv2d`` per image over its
zero-filled token grid. It shares no code with the library, so agreement with it checks the
routing tables and the rank-space decomposition at once.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels import backends

#: The layer's tensors, in moss_linear's order.
PARAMS = ("x", "weight", "bias", "text_A", "text_B", "image_A", "image_B")
ADAPTERS = PARAMS[3:]

GPU = torch.cuda.is_available()
#: Where the backend tests run: the GPU when there is one, else the CPU (Triton interpreted, the
#: CUDA source emulated).
DEVICE = "cuda" if GPU else "cpu"
#: The backends the tests enumerate: every one that runs on DEVICE ...
BACKENDS = mk.available_backends(DEVICE)
#: ... and every one that runs on CPU tensors (the same list on a machine without a GPU).
CPU_BACKENDS = mk.available_backends("cpu")
#: The backends with kernels of their own (all but the reference), on DEVICE.
FUSED = [b for b in BACKENDS if b != "reference"]
#: Those not running in an interpreter (the large-shape tests).
NATIVE = [b for b in FUSED if not backends.backend(b).emulated]


#: Max |error| / max |float64 value| for each dtype: about twice what PyTorch's own GEMMs make
#: in that dtype on these sizes (the reference accumulates half types in float32).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def within_tolerance(got, same_dtype_reference, float64_reference, dtype) -> bool:
    """A backend's rule, flash-attention style: its error against float64 is at most twice the
    reference backend's error in the same dtype, plus half the TOLERANCE entry (about two
    roundings in that dtype). The reference rounds only its outputs; a fused kernel also keeps
    rank-space intermediates (P, dz, dP) in the input dtype, as a half-precision LoRA does."""
    limit = 2 * rel_err(same_dtype_reference, float64_reference) + TOLERANCE[dtype] / 2
    return rel_err(got, float64_reference) <= limit


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() if want.numel() else 1.0
    if not got.numel():
        return 0.0
    return (got.double() - want.double()).abs().max().item() / max(scale, 1e-30)


@dataclass
class Layout:
    """A batch layout and the truth about it, written down independently of the library."""

    shape: tuple[int, ...]
    route: list[int]  # flat
    images: list[tuple[int, int, int, int]] = field(default_factory=list)  # start, H, W, present
    cu_seqlens: list[int] | None = None
    # Per image, the tokens from one row's start to the next's (rows separated by text tokens);
    # None: every image's width (no separators)
    strides: list[int] | None = None

    @property
    def n(self) -> int:
        return len(self.route)

    def route_tensor(self) -> torch.Tensor:
        return torch.tensor(self.route, dtype=torch.int64).reshape(self.shape)

    def spans(self) -> torch.Tensor:
        if self.strides is None:
            return torch.tensor([im[:3] for im in self.images], dtype=torch.int64).reshape(-1, 3)
        rows = [(*im[:3], s) for im, s in zip(self.images, self.strides)]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)

    def grid_tokens(self, i: int) -> list[int]:
        """Image ``i``'s present tokens, row-major: position p of its grid is token
        ``start + (p // W) * stride + p % W``."""
        start, _, w, present = self.images[i]
        stride = w if self.strides is None else self.strides[i]
        return [start + p // w * stride + p % w for p in range(present)]


def _sequence(rng: random.Random, max_hw: int, p_image: float, p_pad: float,
              separators: bool) -> tuple[list, list]:
    """One sequence: (route list, images as (offset, H, W, present, stride)); with
    ``separators``, each image's complete rows are followed by 1 or 2 text tokens (Emu3's
    end-of-line), and its stride counts them."""
    route, images = [], []
    segments = rng.randint(1, 5)
    for seg in range(segments):
        u = rng.random()
        if u < p_pad:
            route += [-1] * rng.randint(1, 3)
        elif u < p_pad + p_image:
            # A run of back-to-back images; only the run's last image may be partial, and a
            # partial image must be followed by a non-image token or the sequence end.
            count = rng.choice([1, 1, 2])
            for j in range(count):
                h, w = rng.randint(1, max_hw), rng.randint(1, max_hw)
                sep = rng.randint(1, 2) if separators else 0
                partial = j == count - 1 and rng.random() < 0.5
                present = rng.randint(1, h * w) if partial else h * w
                images.append((len(route), h, w, present, w + sep))
                for p in range(present):
                    route += [1] + [0] * sep * ((p + 1) % w == 0)
            if seg < segments - 1 and (present < h * w or rng.random() < 0.7):
                route += [0] * rng.randint(1, 3)
        else:
            route += [0] * rng.randint(1, 4)
    return route, images


def random_layout(
    seed: int, batched: bool | None = None, p_image: float = 0.5, p_pad: float = 0.15,
    max_hw: int = 5, separators: bool = False,
) -> Layout:
    """A random layout: several sequences, batched ``[B, T]`` (right-padded) or packed flat with
    ``cu_seqlens``; text runs, padding, back-to-back and partial images of odd shapes; with
    ``separators``, text tokens between image rows (the spans then carry row strides)."""
    rng = random.Random(seed)
    batched = rng.random() < 0.5 if batched is None else batched
    seqs = [_sequence(rng, max_hw, p_image, p_pad, separators) for _ in range(rng.randint(1, 3))]
    route, images, strides, cu = [], [], [], [0]
    t = max(len(r) for r, _ in seqs) + rng.randint(0, 2) if batched else 0
    for b, (r, ims) in enumerate(seqs):
        offset = b * t if batched else len(route)
        images += [(offset + s, h, w, p) for s, h, w, p, _ in ims]
        strides += [stride for *_, stride in ims]
        route += r + [-1] * (t - len(r)) * batched
        cu.append(len(route))
    strides = strides if separators else None
    if batched:
        return Layout((len(seqs), t), route, images, strides=strides)
    return Layout((len(route),), route, images, cu, strides)


def special_layouts() -> list[Layout]:
    """Edge cases written out by hand."""
    return [
        Layout((7,), [0] * 7),  # all text
        Layout((2, 6), [1] * 12, [(0, 2, 3, 6), (6, 3, 2, 6)]),  # all image, one per row
        Layout((9,), [1] * 9, [(0, 3, 3, 9)]),  # one full image
        Layout((10,), [1] * 10, [(0, 2, 2, 4), (4, 2, 2, 4), (8, 3, 3, 2)]),  # back to back
        Layout((8,), [1] * 5 + [1] * 3, [(0, 3, 3, 5), (5, 2, 2, 3)], [0, 5, 8]),  # packed partial
        Layout((6,), [-1, -1, 0, 1, 1, -1], [(3, 1, 5, 2)]),  # padding around a 1-row image
        Layout((5,), [-1] * 5),  # all padding
    ]


def run_layer(layout, k, causal, params, dtype, backend, device=DEVICE, scales=(1.5, 0.5),
              grad=(-1.0, 1.0), frozen=(), dropout=0.0):
    """``moss_linear`` on ``backend``: its output and the gradient of every parameter not in
    ``frozen``, for ``dy = linspace(*grad)`` (made in float64, then rounded). A ``x_adapter``
    in ``params`` is passed as the adapters' own input; ``dropout``, as ``adapter_dropout``,
    with the mask of :func:`seeded_mask` (the same for every backend and dtype)."""
    plan = mk.RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                     causal=causal, cu_seqlens=layout.cu_seqlens).to(device)
    leaves = {n: v.detach().to(device, dtype).requires_grad_(n not in frozen)
              for n, v in params.items() if v is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DROPOUT_SEED)
        y = mk.moss_linear(leaves["x"], leaves["weight"], leaves.get("bias"), plan,
                           *(leaves[n] for n in ADAPTERS), *scales, backend=backend,
                           x_adapter=leaves.get("x_adapter"), adapter_dropout=dropout)
    y.backward(torch.linspace(*grad, y.numel(), dtype=torch.float64).to(device, dtype).view_as(y))
    return {"y": y.detach(), **{n: v.grad for n, v in leaves.items() if n not in frozen}}


DROPOUT_SEED = 2024


def seeded_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask :func:`run_layer` draws for an input like ``x`` (``[N, D_in]``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DROPOUT_SEED)
        return mk.dropout.dropout_mask(x, p)


def check_backend(layout, k, causal, params, dtype, backend, device=DEVICE, frozen=(),
                  dropout=0.0):
    """``backend``'s output and gradients against float64, by :func:`within_tolerance`."""
    kw = dict(frozen=frozen, dropout=dropout)
    want = run_layer(layout, k, causal, params, torch.float64, "reference", device, **kw)
    ref = run_layer(layout, k, causal, params, dtype, "reference", device, **kw)
    got = run_layer(layout, k, causal, params, dtype, backend, device, **kw)
    for name, value in got.items():
        assert value.dtype == dtype and value.shape == want[name].shape, name
        assert within_tolerance(value, ref[name], want[name], dtype), name


def conv2d_formulation(x, weight, bias, layout: Layout, text_A, text_B, image_A, image_B,
                       text_scale, image_scale, causal):
    """MOSS linear as the paper's eager code writes it (differentiable through autograd)."""
    y = F.linear(x, weight, bias)
    is_text = torch.tensor([r == 0 for r in layout.route])
    y = y + is_text[:, None] * (text_scale * F.linear(F.linear(x, text_A), text_B))
    k = image_A.shape[-1]
    for i, (_, h, w, present) in enumerate(layout.images):
        tokens = layout.grid_tokens(i)
        grid = x.new_zeros(x.shape[1], h * w)
        grid = torch.cat([x[tokens].t(), grid[:, present:]], dim=1)
        grid = grid.reshape(1, x.shape[1], h, w)
        if causal:
            out = F.conv2d(F.pad(grid, (k - 1, 0, k - 1, 0)), image_A)
        else:
            out = F.conv2d(grid, image_A, padding="same")
        h_img = out.reshape(image_A.shape[0], h * w)[:, :present].t()
        y = y.index_add(0, torch.tensor(tokens), image_scale * F.linear(h_img, image_B))
    return y


def make_params(gen, n, d_in, d_out, r_t, r_i, k, dtype=torch.float64, bias=True,
                x_adapter=False):
    """Random (never zero) inputs for one MOSS linear, scaled to keep values O(1); with
    ``x_adapter``, a distinct adapter input too (as dropout(x) would be: x's shape)."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    params = dict(
        x=rand(n, d_in), weight=rand(d_out, d_in, scale=d_in ** -0.5),
        bias=rand(d_out) if bias else None,
        text_A=rand(r_t, d_in, scale=d_in ** -0.5),
        text_B=rand(d_out, r_t, scale=max(r_t, 1) ** -0.5),
        image_A=rand(r_i, d_in, k, k, scale=d_in ** -0.5),
        image_B=rand(d_out, r_i, scale=max(r_i, 1) ** -0.5),
    )
    if x_adapter:
        params["x_adapter"] = rand(n, d_in)
    return params


class Interrupted(BaseException):
    """What a crash injected by :func:`interrupt_at` raises (a BaseException, like Ctrl-C, so
    that no ``except Exception`` in the code under test can swallow it)."""


def interrupt_at(monkeypatch, k: int) -> list[int]:
    """Make the k-th call (from 1) of any file-system step a save takes raise Interrupted:
    the writers (safetensors, torch.save, Path.write_text) after writing half a file, the rest
    (fsync, rename, unlink, rmtree) before acting. Returns the running call count, so a caller
    knows a save that passed k made fewer calls and every point has been tried."""
    import shutil
    from pathlib import Path

    import safetensors.torch

    calls = [0]

    def wrap(fn, target_arg):
        def inner(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                if target_arg is not None:
                    with open(args[target_arg], "wb") as f:
                        f.write(b"half a file")
                raise Interrupted
            return fn(*args, **kwargs)
        return inner

    # (owner, function, which positional argument is the file it writes, if it writes one)
    for owner, name, target_arg in [(safetensors.torch, "save_file", 1), (torch, "save", 1),
                                    (Path, "write_text", 0), (os, "fsync", None),
                                    (os, "replace", None), (os, "unlink", None),
                                    (shutil, "rmtree", None)]:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name), target_arg))
    return calls


# ---------------------------------------------------------------------- tiny transformers models
#: The tiny Chameleon's VQ code ids, and the grid its images are cut into.
IMG = list(range(40, 72))
GRID = (3, 3)


def tiny_llama(seed=0, layers=2, hidden=32):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_chameleon(seed=0):
    import transformers

    from moss import tiny

    torch.manual_seed(seed)
    vq = dict(embed_dim=16, num_embeddings=32, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, resolution=32, in_channels=3, latent_channels=16,
              attn_resolutions=[])
    vocab = {tiny.code_name(i): tok for i, tok in enumerate(IMG)}
    vocab.update({"<image>": 3, "<racm3:break>": 4, "<eoss>": 5})
    cfg = transformers.ChameleonConfig(vocab_size=80, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vq_config=vq,
                                       vocabulary_map=vocab, image_token_id=3)
    return transformers.ChameleonForConditionalGeneration(cfg).eval()


#: The tiny Emu3's visual tokens (64 VQ codes), row end and <image> placeholder; its whole
#: vocabulary (as Emu3's config lists it): pad / bos / eos, reserved ids, the image markers,
#: the visual tokens, then a byte-level alphabet for text.
EMU3_VISUAL, EMU3_EOL, EMU3_PLACEHOLDER = list(range(100, 164)), 90, 91
EMU3_MARKERS = {"<|image start|>": 92, "<|image end|>": 93, "<|image token|>": 94,
                "<|extra_201|>": 95}


def _emu3_vocabulary() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|endoftext|>": 0, "<|extra_203|>": 1, "<|extra_204|>": 2}
    vocab.update({f"<|reserved {i}|>": i for i in [*range(3, 90), *range(96, 100)]})
    vocab.update({"<|extra_200|>": EMU3_EOL, "<image>": EMU3_PLACEHOLDER, **EMU3_MARKERS})
    vocab.update({f"<|visual token {i:06d}|>": tok for i, tok in enumerate(EMU3_VISUAL)})
    vocab.update({ch: 164 + i for i, ch in enumerate(sorted(ByteLevel.alphabet()))})
    return vocab


def tiny_emu3(seed=0):
    """A 2-layer Emu3 built from its config (text and VQ configs, a 2x VQ-VAE), random
    weights."""
    import transformers

    torch.manual_seed(seed)
    vocab = _emu3_vocabulary()
    vq = dict(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[], hidden_size=64,
              num_attention_heads=1, temporal_downsample_factor=1)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.Emu3Config(vq_config=vq, text_config=text, vocabulary_map=vocab)
    return transformers.Emu3ForConditionalGeneration(cfg).eval()


def emu3_checkpoint(path):
    """A tiny Emu3 saved as a user's checkpoint folder: the model and a byte-level BPE tokenizer
    over its vocabulary (Emu3's own is byte-level too), the image markers as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _emu3_vocabulary()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True)
                            for name in vocab if name.startswith("<")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   bos_token="<|extra_203|>", eos_token="<|extra_204|>")
    tiny_emu3().save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_janus(seed=0):
    """A Janus built from its config (Llama text model, SigLIP vision tower, VQ-VAE with its
    generation embedding and head), random weights; images are 4 x 4 codes of 64."""
    import transformers

    torch.manual_seed(seed)
    text = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, num_image_tokens=16, projection_dim=32, mlp_ratio=2.0, depth=1)
    vq = dict(base_channels=32, channel_multiplier=[1, 2], embed_dim=4, latent_channels=16,
              num_embeddings=64, projection_dim=32, image_token_embed_dim=32, num_patches=4,
              num_res_blocks=1)
    cfg = transformers.JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                   image_token_id=299)
    model = transformers.JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a head whose logits spread, as a trained one's do (init: ~uniform)
        for p in model.model.generation_head.parameters():
            p.normal_(std=0.5)
    return model


def randomize_B(moss, scale=0.3):
    """Non-zero up-projections (a fresh adapter's are zero and change nothing), so that tests
    see the adapters' effect."""
    with torch.no_grad():
        for name, p in moss.model.named_parameters():
            if name.endswith(("text_B", "image_B")):
                p.copy_(torch.randn_like(p) * scale)
