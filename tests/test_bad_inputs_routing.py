"""Bad input to the RoutingPlan constructors: rows of docs/bad-inputs.md (tests/catalogue.py)."""

import torch

from moss_kernels import RoutingPlan

from catalogue import NAN, OK_SPANS, Catalogue, R

catalogue = Catalogue()
error, errors, behaviour = catalogue.error, catalogue.errors, catalogue.behaviour


SPANS = "RoutingPlan.from_spans"


def spans(route=R, images=OK_SPANS, **kw):
    return RoutingPlan.from_spans(route, images, **kw)


error(SPANS, "`route` not a tensor (a list)", TypeError, "route: expected a torch.Tensor, got list",
      lambda: spans(R.tolist()))
error(SPANS, "`route` float, bool or complex", ValueError,
      "route: expected an integer tensor of shape [N] or [B, T], got dtype",
      lambda: spans(R.float()), lambda: spans(R.bool()), lambda: spans(R.to(torch.complex64)))
error(SPANS, "`route` of rank 3", ValueError,
      "route: expected an integer tensor of shape [N] or [B, T], got dtype torch.int64 and "
      "shape (1, 2, 6)", lambda: spans(R[None]))
error(SPANS, "a `route` value other than -1, 0, 1", ValueError,
      "route[1, 3] = 2: expected -1 (padding), 0 (text) or 1 (image)",
      lambda: spans(R.clone().index_put_((torch.tensor(1), torch.tensor(3)), torch.tensor(2))))


@behaviour(SPANS, "`route` of another integer dtype (uint8, int32)", "read as int64: the same plan")
def _route_dtypes():
    route = torch.tensor([0, 1, 1, 0])
    want = spans(route, [[1, 1, 2]])
    for dtype in (torch.uint8, torch.int32):
        got = spans(route.to(dtype), [[1, 1, 2]])
        assert torch.equal(got.route, want.route) and torch.equal(got.nbr, want.nbr)


@behaviour(SPANS, "empty `route` (`[0]` or `[B, 0]`)", "an empty plan (N = 0)")
def _empty_route():
    for shape in [(0,), (2, 0)]:
        plan = spans(torch.zeros(shape, dtype=torch.long), [])
        assert plan.num_tokens == 0 and plan.nbr.shape == (0, 4) and plan.images.shape == (0, 3)


error(SPANS, "`images` not a table of numbers (None, ragged rows)", TypeError,
      "images: expected ints (a list or an integer tensor), got",
      lambda: spans(images=None), lambda: spans(images=[[1, 2], [6, 1, 2]]))
error(SPANS, "`images` float or bool (would truncate)", TypeError,
      "images: expected integers, got dtype",
      lambda: spans(images=[[1.5, 2, 2]]), lambda: spans(images=torch.ones(2, 3, dtype=torch.bool)))
error(SPANS, "`images` not of shape `[n_img, 3]` or `[n_img, 4]` (rank 1, 2 or 5 columns)",
      ValueError, "images: expected shape [n_img, 3] with rows (start, height, width), or "
      "[n_img, 4] with rows (start, height, width, row_stride), got",
      lambda: spans(images=[1, 2, 2]), lambda: spans(images=[[1, 2]]),
      lambda: spans(images=[[1, 2, 2, 2, 2]]))
error(SPANS, "a `row_stride` under the width", ValueError,
      "images[0] = [1, 2, 2, 1]: row_stride must be >= the width",
      lambda: spans(images=[[1, 2, 2, 1], [6, 1, 2, 2]]))
error(SPANS, "an image token where a row separator belongs (a column past the width)",
      ValueError, "route[0, 3] is an image token outside every image span",
      lambda: spans(images=[[1, 2, 2, 3], [6, 1, 2, 2]]))
error(SPANS, "`images` empty while `route` has image tokens", ValueError,
      "route[0, 1] is an image token outside every image span", lambda: spans(images=[]))


@behaviour(SPANS, "`images` empty and no image token", "a plan without images (a `[0, 3]` table)")
def _no_images():
    plan = spans(torch.tensor([0, 0, -1]), [])
    assert plan.images.shape == (0, 3) and (plan.nbr == -1).all()


errors(SPANS, "an image of height or width 0 or negative", ValueError,
       "images[0] = {row}: height and width must be >= 1",
       [(dict(row=row), lambda row=row: spans(images=[row, [6, 1, 2]]))
        for row in ([1, 0, 2], [1, 2, -2])])
error(SPANS, "an image start at or past N", ValueError,
      "images[1] = [12, 1, 2]: start is outside the 12 tokens",
      lambda: spans(images=[[1, 2, 2], [12, 1, 2]]))
error(SPANS, "a negative image start", ValueError,
      "images[1] = [-1, 1, 2]: start is outside the 12 tokens",
      lambda: spans(images=[[1, 2, 2], [-1, 1, 2]]))
error(SPANS, "an image starting on a text or padding token", ValueError,
      "images[0] starts at token 0 (route[0, 0] = 0), which is not an image token",
      lambda: spans(images=[[0, 2, 2], [6, 1, 2]]))
errors(SPANS, "overlapping image spans (a shared start included)", ValueError,
       "images[{b}] starts at token {start}, inside images[{a}] (tokens {first}..",
       [(dict(a=1, b=2, start=3, first=1), lambda: spans(images=[[6, 1, 2], [1, 2, 2], [3, 1, 1]])),
        (dict(a=0, b=1, start=1, first=1),
         lambda: spans(images=[[1, 2, 2], [1, 1, 1], [6, 1, 2]]))])
error(SPANS, "an image token that no span covers", ValueError,
      "route[1, 0] is an image token outside every image span", lambda: spans(images=[[1, 2, 2]]))
error(SPANS, "a run of image tokens longer than its span's height * width", ValueError,
      "route[0, 3] is an image token outside every image span",
      lambda: spans(images=[[1, 1, 2], [6, 1, 2]]))
error(SPANS, "an image crossing a `cu_seqlens` boundary", ValueError,
      "route[4] is an image token outside every image span",
      lambda: spans(torch.tensor([0, 1, 1, 1, 1, 1, 0]), [[1, 1, 5]], cu_seqlens=[0, 4, 7]))
error(SPANS, "`cu_seqlens` with a `[B, T]` route", ValueError,
      "cu_seqlens: only for a flat [N] layout", lambda: spans(cu_seqlens=[0, 12]))
error(SPANS, "`cu_seqlens` not from 0 to N, or decreasing", ValueError,
      "cu_seqlens: expected non-decreasing offsets from 0 to N=12, got",
      lambda: spans(R.flatten(), cu_seqlens=[0, 5, 11]),
      lambda: spans(R.flatten(), cu_seqlens=[0, 7, 5, 12]))
error(SPANS, "`cu_seqlens` float", TypeError,
      "cu_seqlens: expected integers, got dtype torch.float32",
      lambda: spans(R.flatten(), cu_seqlens=[0.0, 6.5, 12.0]))
error(SPANS, "`cu_seqlens` of rank 2", ValueError,
      "cu_seqlens: expected a 1-D list of offsets, got shape (2, 2)",
      lambda: spans(R.flatten(), cu_seqlens=[[0, 6], [6, 12]]))
errors(SPANS, "`kernel_size` 0, negative, or not an int (2.0, True)", ValueError,
       "kernel_size: expected an int >= 1, got {k!r}",
       [(dict(k=k), lambda k=k: spans(kernel_size=k)) for k in (0, -1, 2.0, True)])
error(SPANS, "`causal` not a bool", TypeError, "causal: expected a bool, got int",
      lambda: spans(causal=1))


@behaviour(SPANS, "`images` / `cu_seqlens` on another device than `route`",
           "moved to `route`'s device")
def _spans_moved():
    route = R.flatten().to("meta")  # a second device that needs no GPU; meta cannot validate
    plan = spans(route, torch.tensor(OK_SPANS), cu_seqlens=torch.tensor([0, 6, 12]),
                 validate=False)
    assert plan.images.device.type == "meta" and plan.nbr.device.type == "meta"


@behaviour(SPANS, "any inconsistent layout with `validate=False`",
           "not checked (no host sync, no error); the tables are then unspecified")
def _unvalidated():
    bad = R.clone()
    bad[0, 0] = 5
    spans(bad, [[0, 9, 9], [30, 0, 0]], validate=False)


IDS_ENTRY = "RoutingPlan.from_input_ids"
IDS = torch.tensor([[1, 9, 9, 2]])


def from_ids(input_ids=IDS, image_token_ids=(9,), grid=(2, 2), **kw):
    return RoutingPlan.from_input_ids(input_ids, image_token_ids, grid, **kw)


error(IDS_ENTRY, "`input_ids` not a tensor", TypeError,
      "input_ids: expected a torch.Tensor, got list",
      lambda: from_ids(IDS.tolist()))
error(IDS_ENTRY, "`input_ids` float, bool or complex", ValueError,
      "input_ids: expected an integer tensor of shape [T] or [B, T], got dtype",
      lambda: from_ids(IDS.float()), lambda: from_ids(IDS.bool()),
      lambda: from_ids(IDS.to(torch.complex64)))
error(IDS_ENTRY, "`input_ids` of rank 3", ValueError,
      "input_ids: expected an integer tensor of shape [T] or [B, T], got dtype torch.int64 and "
      "shape (1, 1, 4)", lambda: from_ids(IDS[None]))


@behaviour(IDS_ENTRY, "empty `input_ids` (`[0]` or `[B, 0]`)", "an empty plan (N = 0)")
def _empty_ids():
    for shape in [(0,), (2, 0)]:
        assert from_ids(torch.zeros(shape, dtype=torch.long)).num_tokens == 0


errors(IDS_ENTRY, "`image_token_ids` not a list (an int, None, a str)", TypeError,
       "image_token_ids: expected a list of ints or an integer tensor, got {kind}",
       [(dict(kind=type(v).__name__), lambda v=v: from_ids(image_token_ids=v))
        for v in (9, None, "9")])
error(IDS_ENTRY, "`image_token_ids` float (would truncate)", TypeError,
      "image_token_ids: expected integers, got dtype torch.float32",
      lambda: from_ids(image_token_ids=[9.7]),
      lambda: from_ids(image_token_ids=torch.tensor([9.0])))


@behaviour(IDS_ENTRY, "`image_token_ids` empty, or ids that never occur",
           "every unpadded token is text")
def _no_image_ids():
    for ids in ([], [12345]):
        assert from_ids(image_token_ids=ids).route.tolist() == [0, 0, 0, 0]


errors(IDS_ENTRY, "`grid` not two ints >= 1 (a side 0, (2,), None, (2.0, 2), (True, 2))",
       ValueError,
       "grid: expected (height, width) with positive ints, got {grid!r}",
       [(dict(grid=g), lambda g=g: from_ids(grid=g))
        for g in [(0, 2), (2,), None, (2.0, 2), (True, 2)]])
ROWS = torch.tensor([[1, 5, 5, 9, 5, 5, 9, 3]])  # a 2 x 2 image, rows ended by 9
error(IDS_ENTRY, "`grid` given with `row_end_ids` (sizes come from the sequence)", ValueError,
      "grid: with row_end_ids the sizes come from the sequence (each image's first row end); "
      "pass grid=None, got (2, 2)",
      lambda: from_ids(ROWS, [5], (2, 2), row_end_ids=[9]))
errors(IDS_ENTRY, "`row_end_ids` not a list (an int, a str)", TypeError,
       "row_end_ids: expected a list of ints or an integer tensor, got {kind}",
       [(dict(kind=type(v).__name__), lambda v=v: from_ids(ROWS, [5], None, row_end_ids=v))
        for v in (9, "9")])
error(IDS_ENTRY, "an id in both `row_end_ids` and `image_token_ids`", ValueError,
      "row_end_ids: id 5 is also in image_token_ids (a row end is a text token)",
      lambda: from_ids(ROWS, [5], None, row_end_ids=[9, 5]))
errors(IDS_ENTRY, "with `row_end_ids`, an image row longer or shorter than the image's first",
       ValueError, "input_ids[0, {t}]: {what} than its image's first row",
       [(dict(t=6, what="this image row is longer"),
         lambda: from_ids(torch.tensor([[1, 5, 5, 9, 5, 5, 5, 9, 3]]), [5], None,
                          row_end_ids=[9])),
        (dict(t=8, what="the image row before this one is shorter"),
         lambda: from_ids(torch.tensor([[1, 5, 5, 5, 9, 5, 5, 9, 5, 3]]), [5], None,
                          row_end_ids=[9]))])


@behaviour(IDS_ENTRY, "`row_end_ids` and an image's last row still being generated",
           "the rows present: a shorter last row is no error")
def _rows_in_progress():
    plan = from_ids(torch.tensor([[1, 5, 5, 9, 5]]), [5], None, row_end_ids=[9])
    assert plan.images.tolist() == [[1, 2, 2, 3]]


errors(IDS_ENTRY, "`attention_mask` of another shape, or not a tensor", ValueError,
       "attention_mask: expected shape (1, 4) like input_ids, got {got}",
       [(dict(got="(4,)"), lambda: from_ids(attention_mask=torch.ones(4))),
        (dict(got="list"), lambda: from_ids(attention_mask=[[1, 1, 1, 1]]))])
errors(IDS_ENTRY, "an `attention_mask` value other than 0 or 1 (NaN included)", ValueError,
       "attention_mask[0, {t}] = {v}: expected 0 or 1",
       [(dict(t=2, v=2), lambda: from_ids(attention_mask=torch.tensor([[1, 1, 2, 1]]))),
        (dict(t=1, v=NAN), lambda: from_ids(attention_mask=torch.tensor([[1, NAN, 1, 1]])))])


@behaviour(IDS_ENTRY, "`attention_mask` float or bool", "accepted: 0 / False is padding")
def _float_mask():
    for mask in (torch.tensor([[1.0, 0.0, 1.0, 1.0]]), torch.tensor([[True, False, True, True]])):
        assert from_ids(attention_mask=mask).route.tolist() == [0, -1, 1, 0]


@behaviour(IDS_ENTRY, "`attention_mask` / `image_token_ids` on another device than `input_ids`",
           "moved to `input_ids`' device")
def _ids_moved():
    ids = IDS.to("meta")
    plan = from_ids(ids, torch.tensor([9]), attention_mask=torch.ones(1, 4), validate=False)
    assert plan.route.device.type == "meta"


errors(IDS_ENTRY, "`kernel_size` 0, negative, or not an int", ValueError,
       "kernel_size: expected an int >= 1, got {k!r}",
       [(dict(k=k), lambda k=k: from_ids(kernel_size=k)) for k in (0, -1, 1.5)])
error(IDS_ENTRY, "`causal` not a bool", TypeError, "causal: expected a bool, got str",
      lambda: from_ids(causal="no"))


test_row = catalogue.test()
