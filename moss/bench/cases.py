"""Benchmark cases: shapes from real models, the layouts they route, and the sweeps.

A case is one MOSS linear layer (``D_in -> D_out``) over ``N`` tokens of which a fraction sits
in whole ``H x W`` images between text runs (the last image may be partial, as during
generation), with both adapters of rank ``R`` and a ``K x K`` causal image kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    d_in: int
    d_out: int
    rank: int = 16
    kernel_size: int = 2
    grid: tuple[int, int] = (16, 16)
    image_fraction: float = 0.5

    def id(self) -> str:
        """The label as one word (pytest ids, file names)."""
        return (f"{self.name}-N{self.tokens}-{self.d_in}x{self.d_out}-R{self.rank}-"
                f"K{self.kernel_size}-{self.grid[0]}x{self.grid[1]}-img{self.image_fraction:g}")

    def label(self) -> str:
        return (f"{self.name} N={self.tokens} {self.d_in}->{self.d_out} R={self.rank} "
                f"K={self.kernel_size} {self.grid[0]}x{self.grid[1]} img={self.image_fraction:g}")

    # ------------------------------------------------------------------ FLOP and byte counts
    def image_tokens(self) -> int:
        return round(self.tokens * self.image_fraction)

    def flops(self, mode: str, with_adapter: bool) -> int:
        """Useful FLOPs: the base GEMM (2 N D_in D_out; its dx GEMM again in a backward), and
        the adapter as routing leaves it: text rows need R_t tap columns and R_t expand
        columns, image rows K^2 R_i and R_i. A backward costs the adapter twice its forward
        (dx and the A/B gradients)."""
        n, n_img = self.tokens, self.image_tokens()
        base = 2 * n * self.d_in * self.d_out
        adapter = 2 * (n - n_img) * self.rank * (self.d_in + self.d_out) + 2 * n_img * self.rank * (
            self.kernel_size ** 2 * self.d_in + self.d_out)
        if not with_adapter:
            adapter = 0
        return {"forward": base + adapter, "backward": base + 2 * adapter,
                "forward+backward": 2 * base + 3 * adapter}[mode]

    def bytes(self, mode: str, itemsize: int, with_adapter: bool = False) -> int:
        """Compulsory traffic: read x and W, write y (for the backward read dy and W, write
        dx), and with the adapter read its weights ``A_all [R + K^2 R, D_in]`` and
        ``Bcat [D_out, 2R]`` (for the backward also write their gradients). Rank-space
        intermediates (P, z, dz, dP: N * (R + K^2 R) values) are not compulsory: a fused kernel
        keeps them on chip. Achieved GB/s against it tells how close a provider runs to memory."""
        n, r, kk = self.tokens, self.rank, self.kernel_size ** 2
        fwd = (n * self.d_in + self.d_in * self.d_out + n * self.d_out) * itemsize
        weights = ((r + kk * r) * self.d_in + 2 * r * self.d_out) * itemsize if with_adapter else 0
        return {"forward": fwd + weights, "backward": fwd + 2 * weights,
                "forward+backward": 2 * fwd + 3 * weights}[mode]


# Shapes of real models' adapted projections (hidden size -> output) and their image grids.
MODEL_CASES = {
    "chameleon-7b-qkvo": Case("chameleon-7b-qkvo", 16384, 4096, 4096, grid=(32, 32)),
    "chameleon-7b-mlp-up": Case("chameleon-7b-mlp-up", 16384, 4096, 11008, grid=(32, 32)),
    "chameleon-7b-mlp-down": Case("chameleon-7b-mlp-down", 16384, 11008, 4096, grid=(32, 32)),
    "emu2-qkvo": Case("emu2-qkvo", 16384, 6656, 6656, grid=(8, 8)),
    "emu2-mlp-up": Case("emu2-mlp-up", 16384, 6656, 17920, grid=(8, 8)),
}
#: What a 2-core CPU can time in seconds (docs/design.md section 8's measurement shape).
CPU_CASE = Case("cpu", 4096, 1024, 1024, grid=(16, 16))
QUICK_CASE = Case("cpu-quick", 1024, 512, 512, grid=(16, 16))

SWEEPS = {
    "rank": ("rank", (16, 64, 256)),
    "kernel_size": ("kernel_size", (1, 2, 3)),
    "image_fraction": ("image_fraction", (0.0, 0.5, 1.0)),
    "tokens": ("tokens", (0.25, 1.0, 2.0)),  # multiples of the base case's N
}


def sweep(base: Case, name: str) -> list[Case]:
    field, values = SWEEPS[name]
    if field == "tokens":
        return [replace(base, tokens=max(1, round(base.tokens * v))) for v in values]
    return [replace(base, **{field: v}) for v in values]


def layout(case: Case, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat route and image spans: text runs and whole images alternating in the requested
    proportion; the last image may be partial."""
    h, w = case.grid
    hw = h * w
    f = case.image_fraction
    route = torch.zeros(case.tokens, dtype=torch.int8)
    images = []
    if f >= 1.0:
        text_run = 0
    elif f <= 0.0:
        text_run = case.tokens
    else:
        text_run = max(1, round(hw * (1 - f) / f))
    t = 0
    while t < case.tokens:
        t += text_run
        if t >= case.tokens:
            break
        route[t : t + hw] = 1
        images.append((t, h, w))
        t += hw
    return route.to(device), torch.tensor(images, dtype=torch.int64).reshape(-1, 3).to(device)
