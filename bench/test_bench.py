"""The benchmark's cases through pytest-benchmark:

    pytest bench/ --benchmark-only                  time every case (medians, p20/p80 ...)
    pytest bench/ --benchmark-only -k "moss and forward"

Same cases, providers and float64 check as ``moss bench`` (moss/bench/); only the timing loop
is pytest-benchmark's. Cases: the quick CPU case swept over rank and image fraction on a CPU,
Chameleon-7B's projection on a GPU.
"""

import pytest
import torch

from moss.bench.cases import MODEL_CASES, QUICK_CASE, layout, sweep
from moss.bench.providers import _moss, available_providers, make_problem
from moss.bench.runner import ADAPTERS, MODES, TOLERANCE, _leaves, _master, _rel_err

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
BASE = MODEL_CASES["chameleon-7b-qkvo"] if GPU else QUICK_CASE
CASES = list(dict.fromkeys(sweep(BASE, "rank") + sweep(BASE, "image_fraction")))
PROVIDERS, _ = available_providers(DEVICE)
reference_provider = _moss("reference")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id())
def setup(request):
    case = request.param
    problem = make_problem(case, *layout(case, DEVICE))
    master = _master(case, DEVICE)
    dy = torch.randn(case.tokens, case.d_out, generator=torch.Generator().manual_seed(1))
    return case, problem, master, dy.to(DEVICE, DTYPE)


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_provider(benchmark, setup, provider, mode):
    case, problem, master, dy = setup
    fn = provider.build(problem)
    if not provider.floor:  # float64 check first: never time a wrong provider
        ref = _leaves(master, torch.float64, True)
        want = reference_provider(problem)(ref)
        want.backward(dy.double())
        t = _leaves(master, DTYPE, True)
        got = fn(t)
        got.backward(dy)
        assert _rel_err(got.detach(), want.detach()) <= TOLERANCE[DTYPE]
        for name in ("x", *ADAPTERS):
            assert _rel_err(t[name].grad, ref[name].grad) <= TOLERANCE[DTYPE], name
    leaves = _leaves(master, DTYPE, mode != "forward")
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(leaves)
            _sync()
        benchmark(run)
    elif mode == "forward+backward":
        def run():
            fn(leaves).backward(dy)
            _sync()
        benchmark(run)
    else:
        def setup_backward():
            return (fn(leaves),), {}

        def run(y):
            y.backward(dy)
            _sync()
        benchmark.pedantic(run, setup=setup_backward, rounds=5, warmup_rounds=1)
