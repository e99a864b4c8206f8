"""RoutingPlan: tables against a brute-force construction, both constructors (bad inputs:
tests/test_bad_inputs_*.py)."""

import random

import pytest
import torch

from moss_kernels import RoutingPlan

from helpers import Layout, random_layout, special_layouts

LAYOUTS = ([random_layout(seed) for seed in range(40)] + special_layouts()
           + [random_layout(seed, separators=True) for seed in range(20)])
WINDOWS = [(1, True), (2, True), (3, True), (2, False), (3, False)]


def brute_force_tables(layout: Layout, k: int, causal: bool):
    """nbr and nbr_t by walking every image's grid, one token and one tap at a time."""
    nbr = [[-1] * (k * k) for _ in range(layout.n)]
    nbr_t = [[-1] * (k * k) for _ in range(layout.n)]
    o = k - 1 if causal else (k - 1) // 2
    for i, (_, _, w, _) in enumerate(layout.images):
        cell = {divmod(p, w): t for p, t in enumerate(layout.grid_tokens(i))}  # (row, col) -> t
        for (row, col), t in cell.items():
            for p in range(k):
                for q in range(k):
                    s = cell.get((row + p - o, col + q - o))
                    if s is not None:
                        nbr[t][p * k + q] = s
                        nbr_t[s][p * k + q] = t
    return torch.tensor(nbr, dtype=torch.int32), torch.tensor(nbr_t, dtype=torch.int32)


@pytest.mark.parametrize("k,causal", WINDOWS)
@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_from_spans_matches_brute_force(index, k, causal):
    layout = LAYOUTS[index]
    plan = RoutingPlan.from_spans(layout.route_tensor(), layout.spans(), kernel_size=k,
                                  causal=causal, cu_seqlens=layout.cu_seqlens)
    nbr, nbr_t = brute_force_tables(layout, k, causal)
    assert plan.route.dtype == torch.int8 and plan.route.tolist() == layout.route
    assert plan.nbr.dtype == torch.int32 and plan.nbr_t.dtype == torch.int32
    assert torch.equal(plan.nbr.reshape(-1, k * k), nbr.reshape(-1, k * k))
    assert torch.equal(plan.nbr_t.reshape(-1, k * k), nbr_t.reshape(-1, k * k))
    assert plan.images.tolist() == sorted(layout.spans().tolist())
    assert plan.num_tokens == layout.n and plan.shape == layout.shape


def test_spans_in_any_order_and_validate_off_give_the_same_plan():
    layout = special_layouts()[3]
    spans = layout.spans()
    a = RoutingPlan.from_spans(layout.route_tensor(), spans)
    b = RoutingPlan.from_spans(layout.route_tensor(), spans.flip(0), validate=False)
    assert torch.equal(a.nbr, b.nbr) and torch.equal(a.nbr_t, b.nbr_t)
    assert torch.equal(a.images, b.images)


def test_construction_never_syncs_with_the_host():
    """On the meta device any .item(), bool() or data-dependent shape would raise."""
    layout = special_layouts()[4]
    plan = RoutingPlan.from_spans(layout.route_tensor().to("meta"), layout.spans().to("meta"),
                                  cu_seqlens=torch.tensor(layout.cu_seqlens, device="meta"),
                                  validate=False)
    assert plan.nbr.device.type == "meta" and plan.nbr.shape == (layout.n, 4)
    ids = torch.zeros(2, 9, dtype=torch.int64, device="meta")
    plan = RoutingPlan.from_input_ids(ids, [5, 6], (2, 2), attention_mask=torch.ones_like(ids),
                                      kernel_size=3, validate=False)
    assert plan.nbr_t.shape == (18, 9)
    plan = RoutingPlan.from_input_ids(ids, [5, 6], None, attention_mask=torch.ones_like(ids),
                                      validate=False, row_end_ids=[9])
    assert plan.nbr.shape == (18, 4)
    strided = RoutingPlan.from_spans(torch.ones(2, 9, dtype=torch.int64, device="meta"),
                                     torch.tensor([[0, 2, 2, 3], [9, 3, 3, 3]], device="meta"),
                                     validate=False)
    assert strided.nbr_t.shape == (18, 4)


def _ids_for(layout: Layout, image_ids=(7, 8, 9)):
    """Token ids realising a layout: image tokens cycle through ``image_ids``, text is 1..3."""
    ids = [(t % 3) + 1 if r != 1 else image_ids[t % len(image_ids)]
           for t, r in enumerate(layout.route)]
    mask = [0 if r == -1 else 1 for r in layout.route]
    return (torch.tensor(ids).reshape(layout.shape), torch.tensor(mask).reshape(layout.shape))


@pytest.mark.parametrize("k,causal", WINDOWS)
@pytest.mark.parametrize("seed", range(12))
def test_from_input_ids_cuts_runs_into_grids(seed, k, causal):
    """A random token stream with one grid: every image-token run is cut into H x W images."""
    gen = torch.Generator().manual_seed(seed)
    h = int(torch.randint(1, 4, (1,), generator=gen))
    w = int(torch.randint(1, 4, (1,), generator=gen))
    b, t = 2, 23
    kind = torch.randint(0, 10, (b, t), generator=gen)  # 0-1 pad, 2-4 text, 5-9 image
    route = torch.where(kind < 2, -1, torch.where(kind < 5, 0, 1))
    # Images: cut each run of 1s (per row) into consecutive H*W chunks.
    images = []
    for row in range(b):
        run = 0
        for col in range(t + 1):
            if col < t and route[row, col] == 1:
                run += 1
                continue
            for s in range(col - run, col, h * w):
                images.append((row * t + s, h, w, min(h * w, col - s)))
            run = 0
    layout = Layout((b, t), route.flatten().tolist(), images)
    ids, mask = _ids_for(layout)
    plan = RoutingPlan.from_input_ids(ids, torch.tensor([7, 8, 9]), (h, w), attention_mask=mask,
                                      kernel_size=k, causal=causal)
    nbr, nbr_t = brute_force_tables(layout, k, causal)
    assert plan.route.tolist() == layout.route
    assert torch.equal(plan.nbr, nbr) and torch.equal(plan.nbr_t, nbr_t)
    assert plan.images.tolist() == [list(im[:3]) for im in images]


def _rows_layout(seed: int) -> tuple[Layout, torch.Tensor, torch.Tensor]:
    """Emu3-style token streams (batched, left- or right-padded): images of random sizes as rows
    of image tokens (id 5) each ended by a row end (9) and closed by an end token (3), text (1)
    between; partial images ending inside a row or right after a row end, the last one of a
    sequence possibly unclosed (still being generated). Returns the layout with row strides,
    the ids and the attention mask."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randint(1, 3)):
        ids, images = [], []
        for _ in range(rng.randint(1, 3)):
            ids += [1] * rng.randint(1, 3)
            h, w = rng.randint(1, 4), rng.randint(1, 5)
            present = rng.randint(1, h * w) if rng.random() < 0.4 else h * w
            images.append((len(ids), h, w, present))
            for p in range(present):
                ids += [5] + [9] * ((p + 1) % w == 0)
            ids.append(3)
        if rng.random() < 0.5:
            ids.pop()  # the last image still being generated
        seqs.append((ids, images))
    t = max(len(ids) for ids, _ in seqs) + rng.randint(0, 2)
    all_ids, mask, route, images, strides = [], [], [], [], []
    for b, (ids, ims) in enumerate(seqs):
        left = rng.choice([0, t - len(ids)])
        right = t - len(ids) - left
        all_ids += [0] * left + ids + [0] * right
        mask += [0] * left + [1] * len(ids) + [0] * right
        route += [-1] * left + [int(i == 5) for i in ids] + [-1] * right
        images += [(b * t + left + s, h, w, p) for s, h, w, p in ims]
        strides += [w + 1 for _, _, w, _ in ims]
    layout = Layout((len(seqs), t), route, images, strides=strides)
    shape = (len(seqs), t)
    return layout, torch.tensor(all_ids).reshape(shape), torch.tensor(mask).reshape(shape)


@pytest.mark.parametrize("k,causal", WINDOWS)
@pytest.mark.parametrize("seed", range(16))
def test_from_input_ids_with_row_ends_reads_sizes_from_the_sequence(seed, k, causal):
    """Each image's width from its first row end, its rows at stride W + 1: the same tables as
    the brute force over the true layout (a first row still being generated has its length so
    far as width, which no window can tell from the true one)."""
    layout, ids, mask = _rows_layout(seed)
    plan = RoutingPlan.from_input_ids(ids, [5], None, attention_mask=mask, kernel_size=k,
                                      causal=causal, row_end_ids=[9])
    nbr, nbr_t = brute_force_tables(layout, k, causal)
    assert plan.route.tolist() == layout.route
    assert torch.equal(plan.nbr, nbr) and torch.equal(plan.nbr_t, nbr_t)
    whole = [(s, h, w, w + 1) for s, h, w, p in layout.images if p == h * w]
    assert set(whole) <= set(map(tuple, plan.images.tolist()))


def test_from_input_ids_with_row_ends_counts_rows_present():
    """A 2 x 3 image, then one being generated (its second row begun): the images table."""
    ids = torch.tensor([1, 5, 5, 5, 9, 5, 5, 5, 9, 3, 1, 5, 5, 9, 5])
    plan = RoutingPlan.from_input_ids(ids, [5], None, row_end_ids=[9])
    assert plan.images.tolist() == [[1, 2, 3, 4], [11, 2, 2, 3]]
    assert plan.route.tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1]
    assert plan.nbr[14].tolist() == [-1, 11, -1, 14]  # row 1, column 0: above it, token 11


def test_from_input_ids_flat_and_without_mask():
    plan = RoutingPlan.from_input_ids(torch.tensor([1, 9, 9, 9, 9, 9, 2]), [9], (2, 2))
    assert plan.route.tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert plan.images.tolist() == [[1, 2, 2], [5, 2, 2]]
    assert plan.nbr[5].tolist() == [-1, -1, -1, 5]  # a new image: no neighbours from the last


def test_to_moves_every_table():
    layout = special_layouts()[3]
    plan = RoutingPlan.from_spans(layout.route_tensor(), layout.spans()).to("meta")
    assert {plan.route.device.type, plan.nbr.device.type, plan.nbr_t.device.type,
            plan.images.device.type} == {"meta"}
    assert "RoutingPlan(shape=(10,)" in repr(plan)


@pytest.mark.parametrize("validate", [True, False])
def test_more_tokens_than_int32_tables_hold_is_an_error(validate):
    """nbr/nbr_t hold token indices as int32: 2^31 tokens (here on the meta device, which costs
    nothing) must be refused by name, not built into wrapped tables; 2^31 - 1 still builds."""
    limit = torch.iinfo(torch.int32).max
    images = torch.zeros(0, 3, dtype=torch.int64, device="meta")
    for shape in [(limit + 1,), (2, 2**30)]:
        route = torch.zeros(shape, dtype=torch.int8, device="meta")
        with pytest.raises(ValueError, match=rf"route: shape \({shape[0]},.*2147483648 tokens, "
                                             rf"more than one RoutingPlan.*at most 2147483647"):
            RoutingPlan.from_spans(route, images, validate=validate)
        with pytest.raises(ValueError, match=r"input_ids: shape .* 2147483648 tokens"):
            RoutingPlan.from_input_ids(route.long(), [5], (2, 2), validate=validate)
    plan = RoutingPlan.from_spans(torch.zeros(limit, dtype=torch.int8, device="meta"), images,
                                  validate=False)
    assert plan.nbr.shape == (limit, 4) and plan.nbr.dtype == torch.int32
