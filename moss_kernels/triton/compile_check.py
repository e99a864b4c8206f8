"""Compile every Triton kernel specialisation the backend can launch for sm_90, without a GPU.

    python -m moss_kernels.triton.compile_check [--all-configs] [--report] [--jobs N]

Triton lowers to PTX and assembles with its bundled ptxas for a chosen target, so a kernel that
would fail to compile on the H200 fails here (and in CI, under the newest triton and under the
GPU machine's, .ci/triton_compile) instead. What a launch compiles is compiled:

* every kernel for each dtype and flag combination the backend launches it with;
* under the two specialisations Triton's JIT makes of real arguments: ``aligned`` (pointers
  16-byte aligned, integers divisible by 16, unit strides folded to the constant 1: model sizes)
  and ``odd`` (none of that: odd sizes, views);
* with the launch's warps and stages: the GEMM's launch config (the one used without
  autotuning) and, for its widest operands (fp32) and for bf16, every autotune config;
  Triton's defaults (4 warps, 3 stages) for the routing, packing and decode kernels, launched
  without options;
* and every result's shared memory is checked against sm_90's 232,448 bytes per block (a
  config over it fails at launch: OutOfResources), and each GEMM config's against the figure
  the autotuner prunes by (gemm.shared_bytes): a config that would not fit is not compiled but
  must be one the autotuner prunes for those dtypes.

``--all-configs`` crosses every config with every use and dtype. Compiles run in parallel
(``--jobs``, default: the cores). Run it from a process without TRITON_INTERPRET set (the
interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time

TARGET = ("cuda", 90, 32)
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90
DTYPES = ("bf16", "fp16", "fp32")
SPECIALISATIONS = ("aligned", "odd")


def _compile_args(fn, types: dict[str, str], constexprs: dict, units: tuple[str, ...], spec: str):
    """``(signature, constexprs, attrs)`` as the JIT builds them for a launch whose integer
    arguments are ``spec`` (see the module docstring); ``units`` are the strides that are 1."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif spec == "aligned" and p.name in units:
            sig[p.name], consts[p.name] = "constexpr", 1
        else:
            sig[p.name] = types.get(p.name, "i32")
            if spec == "aligned" and sig[p.name] != "fp32":  # pointers and integers
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def gemm_cases(all_configs: bool):
    from .gemm import DEFAULT_SHAPE, SHAPES, _gemm_kernel, configs, shared_bytes

    tiles = {shape: config for shape, config in zip([DEFAULT_SHAPE, *SHAPES],
                                                    configs(False) + configs(True))}
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rank = lambda d: "fp32" if d == "fp16" else d  # noqa: E731 -- triton/__init__.py: rank_dtype
    a2_b = [(a2, bias) for a2 in (True, False) for bias in (True, False)]
    # Per use: the dtypes it passes (A, B and out default to the input dtype d; unused operands
    # get A's and B's), its flags (HAS_A2, HAS_BIAS, ROUTE_SKIP, POISON) and its unit strides.
    uses = {
        "taps": lambda d: dict(out=rank(d), route="i8", flags=[(False, False, True, False)],
                               units=("stride_ak", "stride_bk", "stride_a2k", "stride_b2k",
                                      "stride_on")),
        "y": lambda d: dict(a2="fp32", route="i8", bad="u8",
                            flags=[(a2, bias, False, True) for a2, bias in a2_b],
                            units=("stride_ak", "stride_bk", "stride_a2k", "stride_b2k",
                                   "stride_on")),
        "dx": lambda d: dict(a2=rank(d), route="i8", bad="u8",
                             flags=[(True, False, False, True), (False, False, False, True)],
                             units=("stride_ak", "stride_bn", "stride_a2k", "stride_b2n",
                                    "stride_on")),
        # With an x_adapter, its gradient dP A_all on its own (dx = dy W is cuBLAS's).
        "dx_adapter": lambda d: dict(a=rank(d), route="i8", bad="u8",
                                     flags=[(False, False, False, True)],
                                     units=("stride_ak", "stride_bn", "stride_a2k", "stride_b2n",
                                            "stride_on")),
        # The backward's products that meet an fp32 value (cuBLAS when all dtypes agree).
        "dz": lambda d: None if d == "fp32" else dict(
            out="fp32", units=("stride_ak", "stride_bn", "stride_a2k", "stride_b2n", "stride_on")),
        "dBcat": lambda d: None if d == "fp32" else dict(
            b="fp32", out="fp32",
            units=("stride_am", "stride_bn", "stride_a2m", "stride_b2n", "stride_on")),
        "dA": lambda d: None if d != "fp16" else dict(
            a="fp32", out="fp32",
            units=("stride_am", "stride_bn", "stride_a2m", "stride_b2n", "stride_on")),
    }
    for use, dtype in itertools.product(uses, DTYPES):
        spec = uses[use](dtype)
        if spec is None:
            continue
        a = spec.get("a", dtype)
        spec = {"b": dtype, "out": dtype, "a2": a, "b2": spec.get("b", dtype), "bias": a,
                "route": a, "bad": a, "flags": [(False, False, False, False)]} | spec
        dtypes = tuple(
            torch_dtype[t] for t in (a, spec["b"], spec["a2"], spec["b2"]))
        precisions = ("ieee", "tf32") if a == "fp32" else ("ieee",)
        for flags, prec, (shape, tile) in itertools.product(spec["flags"], precisions,
                                                            tiles.items()):
            has_a2, has_bias, skip, poison = flags
            every = (dtype in ("fp32", "bf16") and flags == spec["flags"][0]
                     and prec == precisions[-1] and use in ("taps", "y", "dx"))
            if not (all_configs or shape == DEFAULT_SHAPE or every):
                continue
            types = {"a_ptr": f"*{a}", "b_ptr": f"*{spec['b']}", "a2_ptr": f"*{spec['a2']}",
                     "b2_ptr": f"*{spec['b2']}", "bias_ptr": f"*{spec['bias']}",
                     "route_ptr": f"*{spec['route']}", "bad_ptr": f"*{spec['bad']}",
                     "out_ptr": f"*{spec['out']}"}
            consts = dict(HAS_A2=has_a2, HAS_BIAS=has_bias, ROUTE_SKIP=skip, POISON=poison,
                          PRECISION=prec, **tile.kwargs)
            name = (f"gemm[{use} {dtype} a2={has_a2} bias={has_bias} {prec} "
                    f"{'x'.join(map(str, shape[:3]))} w{shape[3]} s{shape[4]}"
                    f"{' (launch config)' if shape == DEFAULT_SHAPE else ''}]")
            specs = SPECIALISATIONS if shape == DEFAULT_SHAPE or all_configs else ("aligned",)
            yield (name, _gemm_kernel, types, consts, spec["units"],
                   dict(num_warps=tile.num_warps, num_stages=tile.num_stages), specs,
                   shared_bytes(tile.kwargs, tile.num_stages, dtypes))


def route_cases(all_configs: bool):
    from .route import BLOCK_T, _route_bwd_kernel, _route_fwd_kernel

    for kernel, io in ((_route_fwd_kernel, ("p_ptr", "z_ptr")),
                       (_route_bwd_kernel, ("dz_ptr", "dp_ptr"))):
        for dtype, kk, block_r in itertools.product(DTYPES, (1, 4, 9), (16, 32, 64, 128)):
            if not (all_configs or block_r == 16 or (dtype == "bf16" and kk == 9)):
                continue
            fwd = kernel is _route_fwd_kernel
            src = (dtype if dtype != "fp16" else "fp32") if fwd else "fp32"  # P, or dz
            out = "fp32" if fwd else (dtype if dtype != "fp16" else "fp32")  # z, or dP
            ids = "nbr_ptr" if fwd else "nbr_t_ptr"
            types = {io[0]: f"*{src}", io[1]: f"*{out}", "route_ptr": "*i8", ids: "*i32",
                     "text_scale": "fp32", "image_scale": "fp32"}
            consts = dict(KK=kk, BLOCK_T=BLOCK_T, BLOCK_R=block_r)
            yield (f"{kernel.__name__}[{dtype} KK={kk} BLOCK_R={block_r}]", kernel, types, consts,
                   (), {}, SPECIALISATIONS, None)


def pack_cases(all_configs: bool):
    from .pack import BLOCK_D, BLOCK_R, _pack_down_kernel, _pack_up_kernel

    for dtype in DTYPES:
        types = {"text_ptr": f"*{dtype}", "image_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                 "bad_ptr": "*u8"}
        consts = dict(BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R)
        yield (f"_pack_up_kernel[{dtype}]", _pack_up_kernel, types, consts, (), {},
               SPECIALISATIONS, None)
        for kk in (1, 4, 9):
            yield (f"_pack_down_kernel[{dtype} KK={kk}]", _pack_down_kernel, types,
                   dict(consts, KK=kk), (), {}, SPECIALISATIONS, None)


def decode_cases(all_configs: bool):
    from .decode import _decode_taps_kernel

    for dtype, k, block_r in itertools.product(DTYPES, (1, 2, 3), (16, 32, 64, 128)):
        if not (all_configs or block_r == 16 or (dtype == "bf16" and k == 3)):
            continue
        rank = "fp32" if dtype == "fp16" else dtype  # P and the ring: ring_dtype
        types = {"p_ptr": f"*{rank}", "ring_ptr": f"*{rank}", "kind_ptr": "*i8",
                 "pos_ptr": "*i64", "width_ptr": "*i64", "z_ptr": "*fp32"}
        yield (f"_decode_taps_kernel[{dtype} K={k} BLOCK_R={block_r}]", _decode_taps_kernel,
               types, dict(K=k, BLOCK_R=block_r), (), {}, SPECIALISATIONS, None)


@functools.cache  # each worker builds the list once, not once per job
def cases(all_configs: bool) -> list[tuple]:
    """``(name, kernel, types, constexprs, unit strides, options, specialisation, expected
    shared bytes or None)``, one per compile."""
    found = itertools.chain(gemm_cases(all_configs), route_cases(all_configs),
                            pack_cases(all_configs), decode_cases(all_configs))
    return [(*case[:6], spec, case[7]) for case in found for spec in case[6]]


def _compile(job: tuple[int, bool]) -> tuple[str, int | None, bool, str | None]:
    """Compile case ``index``: ``(label, shared bytes, uses wgmma, failure)``; a config the
    autotuner prunes for its dtypes is not compiled (shared None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, all_configs = job
    name, kernel, types, consts, units, options, spec, expected = cases(all_configs)[index]
    label = f"{name} {spec}"
    if expected is not None and expected > SHARED_LIMIT:
        return label, None, False, None  # gemm.fitting prunes it before any launch
    try:
        sig, constexprs, attrs = _compile_args(kernel, types, consts, units, spec)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget(*TARGET), options=options)
    except Exception as exc:  # noqa: BLE001 -- every failure is listed, then we fail
        return label, None, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    shared = compiled.metadata.shared
    failure = None
    if shared > SHARED_LIMIT:
        failure = f"{shared:,} bytes of shared memory, over sm_90's {SHARED_LIMIT:,}"
    elif expected is not None and shared > expected:
        failure = (f"{shared:,} bytes of shared memory, more than the {expected:,} the autotuner "
                   f"prunes by (gemm.shared_bytes)")
    return label, shared, "wgmma" in compiled.asm["ptx"], failure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--report", action="store_true", help="a line per compiled kernel")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)",
              file=sys.stderr)
        return 2
    import multiprocessing

    import triton

    start = time.perf_counter()
    jobs = [(i, args.all_configs) for i in range(len(cases(args.all_configs)))]
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        results = pool.map(_compile, jobs, chunksize=1)
    failures = [f"{label}: {why}" for label, _, _, why in results if why]
    compiled = [(shared, label) for label, shared, _, why in results if shared is not None]
    pruned = sum(1 for _, shared, _, why in results if shared is None and not why)
    if args.report:
        for shared, label in compiled:
            print(f"{shared:>8,} B  {label}")
    most = max(compiled) if compiled else (0, "")
    print(f"compiled {len(compiled)} Triton specialisations for sm_{TARGET[1]} (triton "
          f"{triton.__version__}, {time.perf_counter() - start:.0f} s; "
          f"{sum(r[2] for r in results)} use wgmma; most shared memory {most[0]:,} B of "
          f"{SHARED_LIMIT:,}: {most[1]}); {pruned} configs too large for their dtypes' shared "
          f"memory left out, as the autotuner prunes them; {len(failures)} failed")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
