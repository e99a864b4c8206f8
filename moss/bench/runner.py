"""Check every provider against float64, then time them interleaved; one row per measurement.

Timing: each round runs every (provider, mode) once, in the same order (A B C A B C ...), so a
drifting machine hits all alike (:func:`interleave`; ``moss bench --model`` times with the
same three functions); each timed call follows an untimed one of the same provider
(:func:`time_once`); rounds after the warm-up are kept and summarised by their median with
p20/p80 (:func:`summary`). ``backward`` times the backward alone (its forward runs untimed in
the same round). Memory: ``saved_mb`` is what the autograd graph keeps for the backward (counted
through saved-tensor hooks, any device); ``peak_mb`` is the allocator's peak above its level at
the start of the measured call (CUDA: the caching allocator's statistics, in the timed rounds;
CPU: :func:`moss_kernels.memory.cpu_peak_bytes`, in one extra untimed call per provider and
mode, since profiling slows the call), and ``peak_vs_reference`` that peak over
``moss:reference``'s for the same case and mode.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

import moss_kernels as mk
from moss_kernels.memory import cpu_peak_bytes

from .cases import Case, layout
from .providers import IMAGE_SCALE, NAMES, TEXT_SCALE, Provider, make_problem
from .roofline import Ceilings

MODES = ("forward", "backward", "forward+backward")
ADAPTERS = NAMES[3:]
#: Max |error| / max |float64 reference| for a provider to be timed, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _master(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out, r, k = case.d_in, case.d_out, case.rank, case.kernel_size

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return {"x": rand(case.tokens, d_in), "weight": rand(d_out, d_in, scale=d_in ** -0.5),
            "bias": rand(d_out), "text_A": rand(r, d_in, scale=d_in ** -0.5),
            "text_B": rand(d_out, r, scale=r ** -0.5),
            "image_A": rand(r, d_in, k, k, scale=(k * k * d_in) ** -0.5),
            "image_B": rand(d_out, r, scale=r ** -0.5)}


def _leaves(master: dict, dtype: torch.dtype, grad: bool) -> dict[str, torch.Tensor]:
    """Fresh copies, so that gradients of different providers never accumulate together."""
    return {n: v.to(dtype, copy=True).requires_grad_(grad and n in ("x", *ADAPTERS))
            for n, v in master.items()}


def _saved_bytes(fn: Callable, tensors: dict) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(tensors)
    return total


def _rel_err(got: torch.Tensor | None, want: torch.Tensor) -> float:
    if got is None:  # a tensor the provider never used (no image tokens: image_A)
        got = torch.zeros_like(want)
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check(provider: Provider, fn: Callable, master: dict, dtype, dy, want: dict) -> str | None:
    """None if the provider's output and gradients match float64, else what is off."""
    t = _leaves(master, dtype, True)
    y = fn(t)
    y.backward(dy)
    got = {"y": y.detach(), **{f"d{n}": t[n].grad for n in ("x", *ADAPTERS)}}
    for name, value in want.items():
        err = _rel_err(got[name], value)
        if not err <= TOLERANCE[dtype]:
            return f"{name} off by {err:.1e} (tolerance {TOLERANCE[dtype]:.0e} for {dtype})"
    return None


def run_case(case: Case, providers: list[Provider], device: torch.device, dtype: torch.dtype,
             reps: int, warmup: int, modes=MODES, progress=None, log=print,
             ceilings: Ceilings | None = None) -> tuple[list[dict], dict[str, str]]:
    """Rows for every timed (provider, mode), and {provider: what is wrong} for those that
    failed the float64 check (never timed). With ``ceilings``, each row's roofline time
    (``roofline_ms``) and the measured median over it (``x_roofline``)."""
    # Fresh compile caches per case: the eager formulation's Python loop over images recompiles
    # for every layout, and past dynamo's recompile limit (8) the compile:* providers would
    # silently run eager for the rest of a sweep.
    torch._dynamo.reset()
    route, spans = layout(case, device)
    problem = make_problem(case, route, spans)
    master = _master(case, device)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(case.tokens, case.d_out, generator=gen).to(device, dtype)

    ref = _leaves(master, torch.float64, True)
    y_ref = mk.moss_linear(ref["x"], ref["weight"], ref["bias"], problem.plan,
                           *(ref[n] for n in ADAPTERS), TEXT_SCALE, IMAGE_SCALE,
                           backend="reference")
    y_ref.backward(dy.double())
    want = {"y": y_ref.detach(), **{f"d{n}": ref[n].grad for n in ("x", *ADAPTERS)}}
    del ref, y_ref

    built, failures = [], {}
    for p in providers:
        fn = p.build(problem)
        if not p.floor:
            problem_found = check(p, fn, master, dtype, dy, want)
            if problem_found:
                failures[p.name] = problem_found
                log(f"  {p.name}: WRONG, not timed: {problem_found}")
                continue
        built.append((p, fn))

    fwd_t, bwd_t = _leaves(master, dtype, False), _leaves(master, dtype, True)
    bwd_t["x"].requires_grad_(True)
    candidates = [(p, fn, mode) for p, fn in built for mode in modes]

    def reset_grads():  # so that every timed backward writes them fresh, not accumulating
        for v in bwd_t.values():
            v.grad = None

    def timer(fn, mode):
        return lambda: time_once(lambda: _measured_call(fn, mode, fwd_t, bwd_t, dy), device,
                                 before=reset_grads)

    kept = interleave([timer(fn, mode) for _, fn, mode in candidates], reps, warmup, progress)
    times = {i: [t for t, _ in got] for i, got in enumerate(kept)}
    peaks = {i: max(p for _, p in got) for i, got in enumerate(kept)}
    if device.type == "cpu":
        for i, (_, fn, mode) in enumerate(candidates):
            peaks[i] = cpu_peak_bytes(_measured_call(fn, mode, fwd_t, bwd_t, dy))
            reset_grads()

    rows, floor = [], {}
    saved = {p.name: _saved_bytes(fn, bwd_t) for p, fn in built}
    for i, (p, _, mode) in enumerate(candidates):
        spread = summary(times[i])
        med = spread["median_ms"] / 1e3
        if p.floor:
            floor[mode] = med
        itemsize = torch.tensor([], dtype=dtype).element_size()
        flops, nbytes = case.flops(mode, not p.floor), case.bytes(mode, itemsize, not p.floor)
        roof = {} if ceilings is None else {"roofline_ms": ceilings.seconds(flops, nbytes) * 1e3,
                                            "x_roofline": med / ceilings.seconds(flops, nbytes)}
        rows.append({
            **{k: v for k, v in vars(case).items() if k != "grid"},
            "grid": f"{case.grid[0]}x{case.grid[1]}", "dtype": str(dtype).split(".")[-1],
            "provider": p.name, "mode": mode, **spread,
            **roof, "tflops": flops / med / 1e12, "gbps": nbytes / med / 1e9,
            "saved_mb": saved[p.name] / 2**20 if mode != "forward" else 0.0,
            "peak_mb": peaks[i] / 2**20,
        })
    ref_peak = {r["mode"]: r["peak_mb"] for r in rows if r["provider"] == "moss:reference"}
    for row in rows:
        row["peak_vs_reference"] = (row["peak_mb"] / ref_peak[row["mode"]]
                                    if ref_peak.get(row["mode"]) else float("nan"))
        base = floor.get(row["mode"])
        row["ratio_to_floor"] = row["median_ms"] / 1e3 / base if base else float("nan")
        row["overhead_ms"] = row["median_ms"] - base * 1e3 if base else float("nan")
    return rows, failures


def _measured_call(fn, mode, fwd_t, bwd_t, dy) -> Callable[[], None]:
    """The call a round measures; for ``backward`` its forward runs now, outside it."""
    if mode == "forward":
        def call():
            with torch.no_grad():
                fn(fwd_t)
    elif mode == "backward":
        y = fn(bwd_t)
        def call():
            y.backward(dy)
    else:
        def call():
            fn(bwd_t).backward(dy)
    return call


def interleave(timers: list[Callable[[], T]], reps: int, warmup: int, progress=None
               ) -> list[list[T]]:
    """Every timer once per round, in the same order each round (A B C A B C ...), so that a
    drifting machine hits all alike; what each returned in the rounds after the warm-up."""
    kept = [[] for _ in timers]
    for rnd in range(warmup + reps):
        for got, timer in zip(kept, timers):
            result = timer()
            if rnd >= warmup:
                got.append(result)
        if progress is not None:
            progress.update(1)
    return kept


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of a candidate's timed rounds, in milliseconds."""
    ts = sorted(seconds)
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
    return {"median_ms": statistics.median(ts) * 1e3, "p20_ms": q[1] * 1e3,
            "p80_ms": q[7] * 1e3}


def time_once(make_call: Callable[[], Callable[[], object]], device: torch.device,
              before: Callable[[], None] | None = None) -> tuple[float, int]:
    """Seconds and peak bytes (CUDA; 0 on a CPU) of one ``make_call()()``, after an untimed
    one: rounds interleave the candidates, and what the previous one left (freed blocks the
    allocator splits differently, its cache footprint) moved a CPU time by up to 10%
    otherwise. ``make_call`` does the untimed set-up (a forward before a timed backward, a
    prefill before timed decoding); ``before`` runs after it, outside the time."""
    cuda = device.type == "cuda"
    make_call()()
    call = make_call()
    if before is not None:
        before()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    call()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else 0
    return elapsed, peak
