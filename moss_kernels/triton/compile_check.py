"""Compile every Triton kernel specialisation the backend can launch for sm_90, without a GPU.

    python -m moss_kernels.triton.compile_check [--all-configs]

Triton lowers to PTX and assembles with its bundled ptxas for a chosen target, so a kernel
that would fail to compile on the H200 fails here (and in CI) instead. Run it from a process
without TRITON_INTERPRET set (the interpreter replaces the compiler). By default each kernel is
compiled for every dtype and flag combination with one tile config, plus the bf16 GEMM with
every autotune config (the forward's fused GEMM), and the routing kernels with every rank
chunk for K = 3; ``--all-configs`` crosses everything (~3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

TARGET = ("cuda", 90, 32)
DTYPES = ("bf16", "fp16", "fp32")


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in types:
            sig[p.name] = types[p.name]
        else:
            sig[p.name] = "i32"
    return sig


def gemm_cases(all_configs: bool):
    from .gemm import _gemm_kernel, configs

    tiles = configs()
    rank = lambda d: "fp32" if d == "fp16" else d  # noqa: E731 -- triton/__init__.py: rank_dtype
    no_flags = [(False, False, False)]
    uses = {  # the dtypes each use passes (A, B and out default to d; unused operands get A's)
        "taps": lambda d: dict(out=rank(d), route="i8", flags=[(False, False, True)]),
        "y": lambda d: dict(a2="fp32", b2=d, bias=d, route=d,
                            flags=[(a2, bias, False) for a2 in (True, False)
                                   for bias in (True, False)]),
        "dx": lambda d: dict(a2=rank(d), b2=d, flags=[(True, False, False), (False, False, False)]),
        # fp16 only: the backward's products that mix in an fp32 intermediate (torch otherwise)
        "dz": lambda d: dict(out="fp32", flags=no_flags) if d == "fp16" else None,
        "dBcat": lambda d: dict(b="fp32", out="fp32", flags=no_flags) if d == "fp16" else None,
        "dA": lambda d: dict(a="fp32", out="fp32", flags=no_flags) if d == "fp16" else None,
    }
    for use, dtype in itertools.product(uses, DTYPES):
        spec = uses[use](dtype)
        if spec is None:
            continue
        a = spec.get("a", dtype)
        spec = {"b": dtype, "out": dtype, "a2": a, "b2": a, "bias": a, "route": a} | spec
        precisions = ("ieee", "tf32") if a == "fp32" else ("ieee",)
        for (has_a2, has_bias, skip), prec, tile in itertools.product(spec["flags"], precisions,
                                                                      tiles):
            main_case = use == "y" and dtype == "bf16" and has_a2 and has_bias
            if not (all_configs or tile is tiles[0] or main_case):
                continue
            types = {"a_ptr": f"*{a}", "b_ptr": f"*{spec['b']}", "a2_ptr": f"*{spec['a2']}",
                     "b2_ptr": f"*{spec['b2']}", "bias_ptr": f"*{spec['bias']}",
                     "route_ptr": f"*{spec['route']}", "out_ptr": f"*{spec['out']}"}
            consts = dict(HAS_A2=has_a2, HAS_BIAS=has_bias, ROUTE_SKIP=skip, PRECISION=prec,
                          **tile.kwargs)
            name = f"gemm[{use} {dtype} a2={has_a2} bias={has_bias} {prec} {tile.kwargs}]"
            yield name, _gemm_kernel, types, consts, dict(num_warps=tile.num_warps,
                                                          num_stages=tile.num_stages)


def route_cases(all_configs: bool):
    from .route import BLOCK_T, _route_bwd_kernel, _route_fwd_kernel

    for kernel, io in ((_route_fwd_kernel, ("p_ptr", "z_ptr")),
                       (_route_bwd_kernel, ("dz_ptr", "dp_ptr"))):
        for dtype, kk, block_r in itertools.product(DTYPES, (1, 4, 9), (16, 32, 64, 128)):
            if not (all_configs or block_r == 16 or (dtype == "bf16" and kk == 9)):
                continue
            out = "fp32" if kernel is _route_fwd_kernel else dtype
            ids = "nbr_ptr" if kernel is _route_fwd_kernel else "nbr_t_ptr"
            types = {io[0]: f"*{dtype}", io[1]: f"*{out}", "route_ptr": "*i8", ids: "*i32"}
            consts = dict(KK=kk, BLOCK_T=BLOCK_T, BLOCK_R=block_r)
            yield (f"{kernel.__name__}[{dtype} KK={kk} BLOCK_R={block_r}]", kernel, types, consts,
                   dict(num_warps=4, num_stages=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)",
              file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget(*TARGET)
    failures, count, wgmma, start = [], 0, 0, time.perf_counter()
    for name, kernel, types, consts, options in itertools.chain(
            gemm_cases(args.all_configs), route_cases(args.all_configs)):
        count += 1
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, types, consts),
                            constexprs=consts)
            compiled = triton.compile(src, target=target, options=options)
            wgmma += "wgmma" in compiled.asm["ptx"]
        except Exception as exc:  # noqa: BLE001 -- every failure is listed, then we fail
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    took = time.perf_counter() - start
    print(f"compiled {count - len(failures)}/{count} Triton specialisations for sm_{TARGET[1]} "
          f"(triton {triton.__version__}, {took:.0f} s; {wgmma} use wgmma)")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
