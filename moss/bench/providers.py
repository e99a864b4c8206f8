"""What is timed: the floor, the alternatives a user has today, and our backends.

Every provider turns a :class:`Problem` into ``fn(tensors) -> y`` over the same leaf tensors
(``x``, ``weight``, ``bias``, ``text_A``, ``text_B``, ``image_A``, ``image_B``), so one harness
checks each against the float64 reference and times forward, backward and both.

* ``F.linear``       the frozen layer alone: the floor every ratio is taken against.
* ``eager``          MOSS as the paper's eager code writes it: boolean-mask gathers of the
                     text tokens through a linear LoRA, one ``F.conv2d`` per image over its
                     zero-filled token grid, results added back with ``index_add``.
* ``peft``           MOSS assembled from PEFT's LoRA layers: a ``lora.Linear`` on the text
                     tokens and a ``lora.Conv2d`` over each image's grid. PEFT's Conv2d LoRA
                     takes its kernel size from the base conv, so the image base is a K x K
                     conv holding W at the causal centre tap (zeros elsewhere): that is how a
                     K x K LoRA over a linear layer is had from PEFT, and it pays K^2 times the
                     base FLOPs on image tokens. Padding tokens go through F.linear.
* ``compile:eager``, ``compile:reference``
                     ``torch.compile`` of the eager formulation and of the rank-space reference
                     math (moss_kernels.reference called directly, not through the custom op,
                     so that inductor sees and fuses it).
* ``moss:<backend>`` ``moss_kernels.moss_linear`` on each available backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moss_kernels as mk
from moss_kernels import backends, reference

from .cases import Case

TEXT_SCALE = IMAGE_SCALE = 2.0
NAMES = ("x", "weight", "bias", "text_A", "text_B", "image_A", "image_B")
#: Every alternative a user has today: each gets a speedup column (``x_<name>``) in every CSV
#: row, NaN where it was not run, so that runs with and without some of them share one file.
ALTERNATIVES = ("eager", "peft", "compile:eager", "compile:reference")


@dataclass
class Problem:
    case: Case
    plan: mk.RoutingPlan
    images: list[tuple[int, int, int, int]]  # (start, H, W, present)
    text_rows: torch.Tensor  # [n_text] int64
    pad_rows: torch.Tensor  # [n_pad] int64


def make_problem(case: Case, route: torch.Tensor, spans: torch.Tensor) -> Problem:
    plan = mk.RoutingPlan.from_spans(route, spans, kernel_size=case.kernel_size)
    images = [(s, h, w, min(h * w, case.tokens - s)) for s, h, w in spans.tolist()]
    return Problem(case, plan, images, (route == 0).nonzero().flatten(),
                   (route == -1).nonzero().flatten())


Fn = Callable[[dict], torch.Tensor]


def _floor(p: Problem) -> Fn:
    return lambda t: F.linear(t["x"], t["weight"], t["bias"])


def _image_grid(x: torch.Tensor, start: int, h: int, w: int, present: int) -> torch.Tensor:
    grid = F.pad(x[start:start + present].t(), (0, h * w - present))
    return grid.reshape(1, x.shape[1], h, w)


def _eager(p: Problem) -> Fn:
    k = p.case.kernel_size

    def fn(t):
        x = t["x"]
        y = F.linear(x, t["weight"], t["bias"])
        text = p.plan.route == 0
        rows = [text.nonzero().flatten()]
        vals = [TEXT_SCALE * F.linear(F.linear(x[text], t["text_A"]), t["text_B"])]
        for start, h, w, present in p.images:
            grid = F.pad(_image_grid(x, start, h, w, present), (k - 1, 0, k - 1, 0))
            out = F.conv2d(grid, t["image_A"]).reshape(t["image_A"].shape[0], h * w)
            vals.append(IMAGE_SCALE * F.linear(out[:, :present].t(), t["image_B"]))
            rows.append(torch.arange(start, start + present, device=x.device))
        return y.index_add(0, torch.cat(rows), torch.cat(vals).to(y.dtype))

    return fn


def _peft(p: Problem) -> Fn:
    from peft import LoraConfig
    from peft.tuners.lora import layer as lora

    c, k, r = p.case, p.case.kernel_size, p.case.rank
    cfg = LoraConfig(r=r, lora_alpha=TEXT_SCALE * r, lora_dropout=0.0)
    text = lora.Linear(torch.nn.Linear(c.d_in, c.d_out), "default", cfg, r=r,
                       lora_alpha=TEXT_SCALE * r)
    image = lora.Conv2d(torch.nn.Conv2d(c.d_in, c.d_out, k), "default", cfg, r=r,
                        lora_alpha=IMAGE_SCALE * r)
    cache = {}

    def conv_weight(weight):
        # The frozen K x K base conv: W at the causal centre tap. Built once per weight.
        if cache.get("src") is not weight:
            cw = weight.new_zeros(c.d_out, c.d_in, k, k)
            cw[:, :, k - 1, k - 1] = weight
            cache.update(src=weight, conv=cw)
        return cache["conv"]

    def fn(t):
        x = t["x"]
        text_params = {"base_layer.weight": t["weight"], "base_layer.bias": t["bias"],
                       "lora_A.default.weight": t["text_A"], "lora_B.default.weight": t["text_B"]}
        image_params = {"base_layer.weight": conv_weight(t["weight"]),
                        "base_layer.bias": t["bias"], "lora_A.default.weight": t["image_A"],
                        "lora_B.default.weight": t["image_B"][:, :, None, None]}
        rows = [p.text_rows, p.pad_rows]
        vals = [torch.func.functional_call(text, text_params, (x[p.text_rows],)),
                F.linear(x[p.pad_rows], t["weight"], t["bias"])]
        for start, h, w, present in p.images:
            grid = F.pad(_image_grid(x, start, h, w, present), (k - 1, 0, k - 1, 0))
            out = torch.func.functional_call(image, image_params, (grid,))
            vals.append(out.reshape(c.d_out, h * w)[:, :present].t())
            rows.append(torch.arange(start, start + present, device=x.device))
        y = x.new_zeros(x.shape[0], c.d_out)
        return y.index_copy(0, torch.cat(rows), torch.cat(vals).to(y.dtype))

    return fn


def _reference_math(p: Problem) -> Fn:
    def fn(t):
        return reference.forward(backends.LinearInputs(
            t["x"], t["weight"], t["bias"], None, t["text_A"], t["text_B"], t["image_A"],
            t["image_B"], p.plan.route, p.plan.nbr, p.plan.nbr_t, TEXT_SCALE, IMAGE_SCALE))[0]

    return fn


def _moss(name: str) -> Callable[[Problem], Fn]:
    def build(p: Problem) -> Fn:
        return lambda t: mk.moss_linear(t["x"], t["weight"], t["bias"], p.plan,
                                        *(t[n] for n in NAMES[3:]), TEXT_SCALE, IMAGE_SCALE,
                                        backend=name)

    return build


def _compiled(build: Callable[[Problem], Fn]) -> Callable[[Problem], Fn]:
    def compiled(p: Problem) -> Fn:
        return torch.compile(build(p), fullgraph=False, dynamic=False)

    return compiled


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Problem], Fn]
    floor: bool = False
    ours: bool = False
    compiled: bool = False


def available_providers(device: torch.device, with_compile: bool = True
                        ) -> tuple[list[Provider], dict[str, str]]:
    """The providers that can run on ``device``, and why the others cannot."""
    found = [Provider("F.linear", _floor, floor=True), Provider("eager", _eager)]
    skipped = {}
    if importlib.util.find_spec("peft") is None:
        skipped["peft"] = "peft is not installed (pip install peft; a benchmark-only dependency)"
    else:
        found.append(Provider("peft", _peft))
    if with_compile:
        found += [Provider("compile:eager", _compiled(_eager), compiled=True),
                  Provider("compile:reference", _compiled(_reference_math), compiled=True)]
    else:
        skipped["compile:*"] = "left out (--no-compile)"
    for name in mk.available_backends(device):
        if backends.backend(name).emulated:
            skipped[f"moss:{name}"] = "emulated on the CPU (timings would mean nothing)"
        else:
            found.append(Provider(f"moss:{name}", _moss(name), ours=True))
    return found, skipped
