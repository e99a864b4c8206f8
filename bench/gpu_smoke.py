"""The smoke test of bench/gpu_check.sh: every fused backend on the device x fp32 / fp16 / bf16 x
K = 1, 2, 3, forward and backward, against float64, with every kernel output starting as NaN
(MOSS_KERNELS_POISON=1), so that an element a kernel fails to write, or writes wrong, fails;
and per backend and dtype, a NaN in one route's adapter must reach exactly that route's rows
(``text_B`` in the forward, ``image_A`` in dx).

    python bench/gpu_smoke.py --size tiny     (a few hundred tokens: fast under compute-sanitizer)
    python bench/gpu_smoke.py --size large    (Chameleon-sized rows, 32 x 32 images)

One line per (backend, dtype, K) and a last line with the count; exit status 1 on any failure.
On a CPU (``--device cpu``, the dry run) the fused backends are the compiled ``cpu`` one, the
CUDA source emulated and Triton interpreted.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before moss_kernels is imported: kernels' outputs start as NaN, one Triton config (no
# autotuning), and Triton interpreted where there is no GPU.
os.environ.setdefault("MOSS_KERNELS_POISON", "1")
os.environ.setdefault("MOSS_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moss_kernels as mk  # noqa: E402
from moss.bench.cases import Case, layout  # noqa: E402
from moss.bench.runner import TOLERANCE  # noqa: E402
from moss_kernels import backends  # noqa: E402

SIZES = {  # tokens, D_in, D_out, rank, grid
    "tiny": Case("smoke-tiny", 211, 40, 24, rank=5, grid=(5, 3), image_fraction=0.6),
    "large": Case("smoke-large", 4096, 1024, 768, rank=16, grid=(32, 32), image_fraction=0.6),
}
NAMES = ("x", "weight", "bias", "text_A", "text_B", "image_A", "image_B")


def run(case: Case, k: int, dtype: torch.dtype, backend: str, device: torch.device,
        edit=None) -> dict:
    """Output and every gradient; ``edit(leaves)`` may change the inputs first."""
    route, spans = layout(case, device)
    plan = mk.RoutingPlan.from_spans(route, spans, kernel_size=k)
    gen = torch.Generator().manual_seed(k)
    shapes = [(case.tokens, case.d_in), (case.d_out, case.d_in), (case.d_out,),
              (case.rank, case.d_in), (case.d_out, case.rank), (case.rank, case.d_in, k, k),
              (case.d_out, case.rank)]
    scale = [1.0, case.d_in ** -0.5, 1.0, case.d_in ** -0.5, case.rank ** -0.5,
             (k * k * case.d_in) ** -0.5, case.rank ** -0.5]
    leaves = {n: (torch.randn(*s, generator=gen) * c).to(device, dtype)
              for n, s, c in zip(NAMES, shapes, scale)}
    if edit is not None:
        edit(leaves)
    leaves = {n: v.requires_grad_() for n, v in leaves.items()}
    y = mk.moss_linear(*(leaves[n] for n in NAMES[:3]), plan, *(leaves[n] for n in NAMES[3:]),
                       1.5, 0.5, backend=backend)
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(dy)
    return {"y": y.detach(), "route": route, **{f"d{n}": v.grad for n, v in leaves.items()}}


def nan_routing(backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """None if a NaN in ``text_B[2]`` makes exactly the text rows' y[:, 2] non-finite and one
    in ``image_A[1, 4]`` exactly the image rows' dx[:, 4]; else what went wrong."""
    def poison(name, index):
        return lambda leaves: leaves[name].__setitem__(index, float("nan"))

    case = SIZES["tiny"]
    out = run(case, 2, dtype, backend, device, poison("text_B", (2, 1)))
    bad, text = ~out["y"].isfinite(), out["route"] == 0
    if not (torch.equal(bad[:, 2], text) and bad.sum() == text.sum()):
        return "a NaN in text_B reached other rows or columns of y"
    out = run(case, 2, dtype, backend, device, poison("image_A", (1, 4)))
    bad, image = ~out["dx"].isfinite(), out["route"] == 1
    if not (torch.equal(bad[:, 4], image) and bad.sum() == image.sum()):
        return "a NaN in image_A reached other rows or columns of dx"
    return None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, case = torch.device(args.device), SIZES[args.size]
    names = [b for b in mk.available_backends(device) if b != "reference"]
    failures, count, want_by_k = 0, 0, {}
    for backend in names:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if not backends.backend(backend).supports(dtype):
                continue
            for k in (1, 2, 3):
                count += 1
                if k not in want_by_k:  # float64 reference, once per K for every backend
                    want_by_k[k] = run(case, k, torch.float64, "reference", device)
                want = want_by_k[k]
                got = run(case, k, dtype, backend, device)
                errs = {n: rel_err(got[n], want[n]) for n in want if n != "route"}
                worst = max(errs, key=lambda n: (errs[n] != errs[n], errs[n]))  # NaN first
                ok = all(e <= TOLERANCE[dtype] for e in errs.values())  # NaN compares False
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {backend:<14} {str(dtype)[6:]:<9} K={k}  "
                      f"worst {worst} {errs[worst]:.1e} (tolerance {TOLERANCE[dtype]:.0e})")
            count += 1
            wrong = nan_routing(backend, dtype, device)
            failures += wrong is not None
            print(f"{'ok  ' if wrong is None else 'FAIL'} {backend:<14} {str(dtype)[6:]:<9} NaN "
                  f"in one route's adapter: {wrong or 'exactly its own rows'}")
    print(f"smoke {args.size} on {device.type}: {count - failures}/{count} checks passed "
          f"(backend x dtype x K within tolerance, NaN routing; "
          f"{', '.join(names) or 'no fused backend'})")
    return 1 if failures or not count else 0


if __name__ == "__main__":
    sys.exit(main())
