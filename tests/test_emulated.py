"""The CUDA backend's own source, run on CPU tensors (the ``cuda-emulated`` test backend):
launch shapes that make the grid-stride loops and bounds guards work, and a check that every
output element is written by exactly one (block, thread). Its correctness on every layout, rank
and dtype is tests/test_backends.py's, as for any backend; its outputs start as NaN always."""

import pytest
import torch

import moss_kernels as mk

from helpers import Layout, check_backend, make_params, random_layout, special_layouts

pytestmark = pytest.mark.skipif("cuda-emulated" not in mk.available_backends("cpu"),
                                reason="moss_kernels._C is not built")


@pytest.fixture
def launch():
    """Set the emulated launch shape for one test, then put the default back."""
    from moss_kernels.compiled import configure_emulation

    previous = []

    def configure(max_blocks, threads, check_writes=False):
        previous.append(configure_emulation(max_blocks, threads, check_writes))

    yield configure
    if previous:
        configure_emulation(*previous[0])


@pytest.mark.parametrize("blocks,threads", [(1, 1), (3, 7), (2, 33), (1, 256), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_element_is_written_by_exactly_one_thread(blocks, threads, dtype, launch, gen):
    """Fewer threads than elements (the grid-stride loop takes many strides), more threads than
    elements (the bounds guard), and odd shapes; every launch checked element by element. The
    second layout's adapters read an input of their own (x_adapter): dx_adapter is poisoned
    apart from dx."""
    launch(blocks, threads, check_writes=True)
    for layout, separate in ((special_layouts()[3], False), (random_layout(5, p_image=0.6), True)):
        params = make_params(gen, layout.n, 7, 5, 2, 3, 2, x_adapter=separate)
        check_backend(layout, 2, True, params, dtype, "cuda-emulated")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_many_small_blocks_over_long_runs(k, launch, gen):
    """A 13 x 11 image and text runs (several hundred rows) on a grid of many small blocks."""
    launch(40, 5)
    route, images = [0] * 29, [(29, 13, 11, 143)]
    route += [1] * 143 + [0] * 17 + [-1] * 4
    layout = Layout((len(route),), route, images)
    check_backend(layout, k, True, make_params(gen, layout.n, 19, 23, 5, 4, k), torch.float32,
                  "cuda-emulated")


def test_launch_settings_round_trip_and_are_checked():
    from moss_kernels.compiled import configure_emulation

    default = configure_emulation(2, 3, True)
    assert configure_emulation(*default) == (2, 3, 1)
    assert default == (5, 64, 0)  # small blocks by default: the loops stride in every test
    with pytest.raises(RuntimeError, match="max_blocks and threads: expected >= 1"):
        configure_emulation(0, 3, False)
    assert configure_emulation(*default) == default


@pytest.mark.parametrize("blocks,threads", [(1, 1), (3, 7), (1, 256)])
def test_every_decode_output_is_written_by_exactly_one_thread(blocks, threads, launch, gen):
    """The decode step's kernel (z; each thread also writes its column of the ring slot) under
    the same check, and its result the reference's, for text, image and padding rows."""
    from moss_kernels.decode import moss_decode, pack, ring_size
    from moss_kernels.reference import decode as reference_decode

    launch(blocks, threads, check_writes=True)
    b, d_in, d_out, r_t, r_i, k, w = 12, 7, 5, 3, 4, 2, 3
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    packed = pack(rand(r_t, d_in), rand(d_out, r_t), rand(r_i, d_in, k, k), rand(d_out, r_i),
                  1.5, 0.5)
    x, weight, bias = rand(b, d_in), rand(d_out, d_in), rand(d_out)
    ring = rand(b, ring_size(k, w), k * k * r_i)
    kind = torch.tensor([1, 0, -1, 1] * 3, dtype=torch.int8)
    pos = torch.arange(b) % 9
    want_ring = ring.clone()
    width = torch.full((b,), w)
    want = reference_decode(x, weight, bias, *packed, want_ring, kind, pos, width, r_t, k)
    got = moss_decode(x, weight, bias, *packed, ring, kind, pos, width, r_t, k,
                      backend="cuda-emulated")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ring, want_ring)
