"""Adapter variants: what an image token gets (docs/design.md section 6).

Every wrapped layer has the text adapter (``text_A [R_t, D_in]``, ``text_B [D_out, R_t]``); a
variant decides the rest, PEFT's ``LoraVariant`` pattern: the image adapter's parameters (their
attribute names are the checkpoint's keys), the ``[R_i, D_in, K, K]`` image kernel the kernels
run (hence the decode taps), the routing window, and its parameter count. The paper's ablations
are these configurations of one machinery:

* ``conv`` (MOSS, default): ``image_A [R_i, D_in, K, K]``, a causal K x K convolution over the
  image's token grid, then ``image_B``.
* ``moe``: a linear LoRA per modality (``conv`` with a 1 x 1 kernel).
* ``shared``: one LoRA for every token; image tokens take the text adapter.
* ``conv_rank`` (SAM-ConvLoRA style): ``image_down [R_i, D_in]``, then ``image_conv
  [R_i, R_i, K, K]`` in rank space. The kernels run the composition, itself a full-width K x K
  kernel ``image_A[:, :, p, q] = image_conv[:, :, p, q] @ image_down`` (R_i^2 K^2 D_in work per
  step, on the adapter's weights only).

Adding a variant is one class here and its entry in :data:`VARIANTS`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moss_kernels.reference import stack_down

if TYPE_CHECKING:
    from .config import MossConfig


def kaiming_parameter(shape, **factory) -> nn.Parameter:
    """LoRA's initialisation of a down-projection (PEFT's and nn.Linear's)."""
    p = nn.Parameter(torch.empty(*shape, **factory))
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


class Variant:
    name = ""
    #: The image adapter's parameters, in creation order (the checkpoint's keys under a layer).
    params: tuple[str, ...] = ()
    #: False: image tokens are routed to the text adapter (there is no image adapter).
    has_image_adapter = True
    #: True: the image kernel is K x K (``MossConfig.kernel_size``), else 1 x 1.
    convolves = False

    def window(self, cfg: MossConfig) -> int:
        return cfg.kernel_size if self.convolves else 1

    def label(self, cfg: MossConfig) -> str:
        """How reports name this configuration (``conv k=3``)."""
        return f"{self.name} k={cfg.kernel_size}" if self.convolves else self.name

    def create(self, layer: nn.Module, cfg: MossConfig, d_in: int, d_out: int, **factory) -> None:
        """Give ``layer`` the image adapter: its down-projection (random), ``image_B`` (zero,
        so a fresh adapter changes nothing) and ``image_scale``."""
        if not self.has_image_adapter:
            return
        self._create_down(layer, cfg, d_in, self.window(cfg), factory)
        layer.image_B = nn.Parameter(torch.zeros(d_out, cfg.r_image, **factory))
        layer.image_scale = cfg.alpha_image / cfg.r_image

    def _create_down(self, layer, cfg, d_in, k, factory) -> None:
        raise NotImplementedError

    def image_kernel(self, layer: nn.Module) -> torch.Tensor | None:
        """``[R_i, D_in, K, K]`` (``nn.Conv2d`` weight layout); None without an image adapter."""
        return None

    def taps(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """``[K*K*R_i, D_in]``: the kernel as one block of rows per tap (tap = p*K + q), what a
        decode step multiplies the new token by (its ring entry)."""
        a = self.image_kernel(layer).to(dtype)
        return stack_down(a.new_zeros(0, a.shape[1]), a)  # A_all without text rows

    def num_params(self, cfg: MossConfig, d_in: int, d_out: int) -> int:
        """Trainable parameters this variant adds to a ``d_in -> d_out`` layer, text adapter
        included."""
        return cfg.r_text * (d_in + d_out) + (self._image_params(cfg, d_in, d_out)
                                              if self.has_image_adapter else 0)

    def _image_params(self, cfg, d_in, d_out) -> int:
        raise NotImplementedError


class Shared(Variant):
    name = "shared"
    has_image_adapter = False


class Conv(Variant):
    name = "conv"
    params = ("image_A", "image_B")
    convolves = True

    def _create_down(self, layer, cfg, d_in, k, factory):
        layer.image_A = kaiming_parameter((cfg.r_image, d_in, k, k), **factory)

    def image_kernel(self, layer):
        return layer.image_A

    def _image_params(self, cfg, d_in, d_out):
        k = self.window(cfg)
        return cfg.r_image * (k * k * d_in + d_out)


class Moe(Conv):
    name = "moe"
    convolves = False


class ConvRank(Variant):
    name = "conv_rank"
    params = ("image_down", "image_conv", "image_B")
    convolves = True

    def _create_down(self, layer, cfg, d_in, k, factory):
        layer.image_down = kaiming_parameter((cfg.r_image, d_in), **factory)
        layer.image_conv = kaiming_parameter((cfg.r_image, cfg.r_image, k, k), **factory)

    def image_kernel(self, layer):
        return torch.einsum("ospq,si->oipq", layer.image_conv, layer.image_down)

    def _image_params(self, cfg, d_in, d_out):
        k = self.window(cfg)
        return cfg.r_image * (d_in + d_out) + cfg.r_image ** 2 * k * k


#: Every variant by name, in the order users see them.
VARIANTS: dict[str, Variant] = {v.name: v for v in (Shared(), Moe(), Conv(), ConvRank())}
