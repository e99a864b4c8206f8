"""MossConfig: what to wrap and how (the adapter hyper-parameters), validated and serialisable.

``image_adapter`` names a variant of moss/variants.py; ``target_modules`` None means the
backbone's own defaults (moss/backbones/); ``image_token_ids`` / ``image_grid`` override what
the backbone says about its image tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from .variants import VARIANTS

FORMAT_VERSION = 1


@dataclass
class MossConfig:
    r_text: int = 16
    r_image: int = 16
    alpha_text: float = 32.0
    alpha_image: float = 32.0
    kernel_size: int = 2
    causal: bool = True
    dropout: float = 0.0
    image_adapter: str = "conv"
    target_modules: list[str] | None = None  # None: the backbone's defaults
    image_token_ids: list[int] | None = None  # token-based backbones: which ids are image tokens
    image_grid: tuple[int, int] | None = None  # and their H x W grid (overrides the backbone's)
    backend: str | None = None

    def __post_init__(self):
        for name in ("r_text", "r_image", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        for name in ("alpha_text", "alpha_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 < value < math.inf):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(self.causal).__name__}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
                0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.image_adapter, str) or self.image_adapter not in VARIANTS:
            raise ValueError(f"image_adapter: expected one of {', '.join(VARIANTS)}, got "
                             f"{self.image_adapter!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not self.target_modules or not all(
                    isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules: expected a non-empty list of module names "
                                 f"(or None), got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        if self.image_token_ids is not None:
            ids = list(_iterable("image_token_ids", self.image_token_ids))
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                  for i in ids):
                raise ValueError(f"image_token_ids: expected non-negative ints, got {ids!r}")
            self.image_token_ids = ids
        if self.image_grid is not None:
            grid = tuple(_iterable("image_grid", self.image_grid))
            if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1
                                         for g in grid):
                raise ValueError(f"image_grid: expected (height, width) >= 1, got "
                                 f"{self.image_grid!r}")
            self.image_grid = grid
        if self.backend is not None:
            from moss_kernels.backends import BACKENDS

            if self.backend not in BACKENDS:
                raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or None, got "
                                 f"{self.backend!r}")

    @property
    def variant(self):
        """The image-adapter variant (moss/variants.py) ``image_adapter`` names."""
        return VARIANTS[self.image_adapter]

    @property
    def window(self) -> int:
        """The kernel size the image adapter convolves with (1 for the linear variants)."""
        return self.variant.window(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_grid"] = list(self.image_grid) if self.image_grid else None
        return {"format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> MossConfig:
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict (a JSON object), got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version: this moss reads adapter configs of version "
                             f"{FORMAT_VERSION}, the file says {version!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"format_version"})
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def _iterable(name: str, value) -> Iterable:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a list, got {type(value).__name__}")
    return value
