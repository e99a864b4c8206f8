"""``moss experiment``: does a convolutional LoRA model image tokens better than a linear one?

A small, honest test of MOSS's claim, end to end on our own code, in minutes on a CPU:

1. Synthetic interleaved data with real local image structure: 8 x 8 grids of VQ-like codes
   (``code = 8 * colour + shade``) holding a shape in one colour on a background of another,
   the shade following a smooth gradient, under a caption that says what is drawn
   ("draw a red cross on blue"). Two distributions: A (pre-training: bars and squares, colours
   0-3) and B (the shift: crosses, diagonals and frames, colours 4-7). Seeded.
2. The built-in tiny Chameleon is fully fine-tuned on A, then frozen.
3. Each adapter variant (``shared``, ``moe``, ``conv`` with K = 2 and 3, ``conv_rank``) is
   trained on B with the same steps, learning rate and data order, its ranks chosen so that
   every variant has (as nearly as integer ranks allow) the parameter count of ``moe``, over
   several seeds.
4. Reported: validation loss on B's image tokens and text tokens, mean and spread over seeds,
   as a table (printed, CSV, Markdown) and a plot. Whatever the outcome, as measured.

``--dataset digits`` / ``photos`` runs the real-image reproduction instead
(moss/real_experiment.py: real handwritten digits or photo patches, equal rank and equal
parameters, generation scored), on this module's training loop and evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from . import backbones, tiny
from .config import MossConfig
from .data import IGNORE, Example, collate, encode_record
from .model import get_moss_model
from .train import schedule
from .variants import VARIANTS

GRID = (8, 8)
COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "grey"]
SHAPES = {
    "A": ["horizontal bar", "vertical bar", "square"],
    "B": ["cross", "diagonal", "frame"],
}
RUNS = [("shared", 2), ("moe", 2), ("conv", 2), ("conv", 3), ("conv_rank", 2)]  # variant, K


def _mask(shape: str, rng: torch.Generator) -> torch.Tensor:
    h, w = GRID
    m = torch.zeros(h, w, dtype=torch.bool)
    a = int(torch.randint(1, 4, (1,), generator=rng))
    b = int(torch.randint(1, 4, (1,), generator=rng))
    if shape == "horizontal bar":
        m[a:a + 2, :] = True
    elif shape == "vertical bar":
        m[:, b:b + 2] = True
    elif shape == "square":
        m[a:a + 4, b:b + 4] = True
    elif shape == "cross":
        m[a + 1, :] = True
        m[:, b + 1] = True
    elif shape == "diagonal":
        idx = torch.arange(h)
        m[idx, (idx + b) % w] = True
    elif shape == "frame":
        m[a, b:b + 5] = m[a + 4, b:b + 5] = True
        m[a:a + 5, b] = m[a:a + 5, min(b + 4, w - 1)] = True
    return m


def make_record(split: str, rng: torch.Generator, i: int) -> dict:
    colours = range(4) if split == "A" else range(4, 8)
    fg, bg = torch.randperm(4, generator=rng)[:2].tolist()
    fg, bg = list(colours)[fg], list(colours)[bg]
    shape = SHAPES[split][int(torch.randint(len(SHAPES[split]), (1,), generator=rng))]
    mask = _mask(shape, rng)
    rows = torch.arange(GRID[0])[:, None].expand(GRID)
    shade = (rows + torch.randint(0, 2, GRID, generator=rng)).clamp(max=7)  # smooth gradient
    codes = torch.where(mask, fg * 8 + shade, bg * 8 + (7 - shade)).flatten().tolist()
    desc = f"a {COLOURS[fg]} {shape} on {COLOURS[bg]}"
    return {"id": f"{split}-{i}", "segments": [
        {"role": "user", "type": "text", "text": f"draw {desc}"},
        {"role": "assistant", "type": "image", "codes": codes},
        {"role": "assistant", "type": "text", "text": desc}]}


def vocabulary(model) -> backbones.Vocabulary:
    """The tiny Chameleon's vocabulary with this experiment's 8 x 8 images."""
    tok = tiny.ByteTokenizer()
    text = backbones.TextCodec(tok.encode, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return dataclasses.replace(backbones.spec_for(model).vocabulary(model, text), grid=GRID)


def dataset(split: str, n: int, seed: int, vocab: backbones.Vocabulary) -> list[Example]:
    rng = torch.Generator().manual_seed(seed)
    return [encode_record(make_record(split, rng, i), vocab, True, f"{split}-{i}")
            for i in range(n)]


def _batches(examples, steps, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch,), generator=gen).tolist()
        yield collate([examples[i] for i in idx], 0)


def _fit(model, params, examples, steps, lr, seed, batch=8, probe=None, every=0):
    """AdamW with warm-up and cosine decay over ``steps`` batches (data order from ``seed``);
    with ``probe``, its value every ``every`` steps and at the end: ``[(step, value)]``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, steps // 10))
    curve = [] if probe is None else [(0, probe())]
    model.train()
    for step, b in enumerate(_batches(examples, steps, batch, seed), 1):
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if probe is not None and (step % every == 0 or step == steps):
            curve.append((step, probe()))
            model.train()
    return curve


@torch.no_grad()
def evaluate(model, examples, image_ids: set[int]) -> dict[str, float]:
    """Mean loss per target token, separately over image-code tokens and text tokens."""
    model.eval()
    totals = {"image": [0.0, 0], "text": [0.0, 0]}
    for start in range(0, len(examples), 16):
        b = collate(examples[start:start + 16], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = b["labels"][:, 1:]
        valid = target != IGNORE
        nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        is_img = torch.isin(target, torch.tensor(sorted(image_ids)))
        for kind, sel in (("image", valid & is_img), ("text", valid & ~is_img)):
            totals[kind][0] += nll[sel].sum().item()
            totals[kind][1] += int(sel.sum())
    return {k: s / max(n, 1) for k, (s, n) in totals.items()}


def adapter_params(cfg: MossConfig, layers) -> int:
    """Trainable parameters a config adds to the given (d_in, d_out) layers."""
    return sum(cfg.variant.num_params(cfg, d_in, d_out) for d_in, d_out in layers)


def matched_config(variant: str, k: int, r_text: int, r_ref: int, layers) -> MossConfig:
    """The variant's ranks whose parameter count is nearest ``moe`` with ranks (r_text, r_ref)."""
    target = adapter_params(MossConfig(r_text=r_text, r_image=r_ref, image_adapter="moe"), layers)

    def cfg(r_t, r_i):
        return MossConfig(r_text=r_t, r_image=r_i, alpha_text=2.0 * r_t, alpha_image=2.0 * r_i,
                          kernel_size=k, image_adapter=variant, image_grid=GRID)

    if not VARIANTS[variant].has_image_adapter:  # one rank to choose: the shared LoRA's
        candidates = [cfg(r, 1) for r in range(1, 4 * (r_text + r_ref))]
    else:
        candidates = [cfg(r_text, r) for r in range(1, 4 * r_ref)]
    return min(candidates, key=lambda c: abs(adapter_params(c, layers) - target))


SIZES = {"quick": (150, 100, 96), "full": (600, 400, 384)}  # pre-train steps, steps, examples


def run(quick: bool, seeds: int, out: Path,
        sizes: tuple[int, int, int] | None = None) -> list[dict]:
    from tqdm import tqdm

    pre_steps, steps, n_train = sizes or SIZES["quick" if quick else "full"]
    base = tiny.build(seed=0)
    spec = backbones.spec_for(base)
    spec.unmask_image_logits(base)
    vocab = vocabulary(base)
    image_ids = set(vocab.code_to_token)
    torch.manual_seed(0)
    _fit(base, list(base.parameters()), dataset("A", n_train, 1, vocab), pre_steps, 3e-3, seed=2)
    for p in base.parameters():
        p.requires_grad_(False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    train_b, val_b = dataset("B", n_train, 3, vocab), dataset("B", 64, 4, vocab)
    frozen = evaluate(base, val_b, image_ids)
    layers = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in spec.targets]
    rows = [{"variant": "frozen (no adapter)", "seed": 0, "params": 0, **frozen}]
    jobs = [(v, k, s) for v, k in RUNS for s in range(seeds)]
    for variant, k, seed in tqdm(jobs, desc="variants x seeds", file=sys.stderr, disable=None):
        base.load_state_dict(state)
        cfg = matched_config(variant, k, 4, 4, layers)
        torch.manual_seed(100 + seed)  # adapter init differs per seed; data order is shared
        moss = get_moss_model(base, cfg)
        params = [p for p in moss.parameters() if p.requires_grad]
        _fit(moss, params, train_b, steps, 5e-3, seed=5)
        rows.append({"variant": cfg.variant.label(cfg), "window": cfg.window, "seed": seed,
                     "params": sum(p.numel() for p in params),
                     "r_text": cfg.r_text, "r_image": cfg.r_image,
                     **evaluate(moss, val_b, image_ids)})
        moss.unload()
    report(rows, out, quick)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        entry = {"variant": name, "window": rs[0].get("window", 0), "params": rs[0]["params"],
                 "seeds": len(rs)}
        for kind in ("image", "text"):
            vals = [r[kind] for r in rs]
            entry[f"{kind}_mean"] = statistics.mean(vals)
            entry[f"{kind}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def report(rows: list[dict], out: Path, quick: bool) -> None:
    summary = summarise(rows)
    lines = ["| variant | adapter params | seeds | image-token val loss | text-token val loss |",
             "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['params']:,} | {s['seeds']} | "
                     f"{s['image_mean']:.4f} ± {s['image_sd']:.4f} | "
                     f"{s['text_mean']:.4f} ± {s['text_sd']:.4f} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "full"
    (out / f"convlora_experiment_{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / f"convlora_experiment_{tag}.md").write_text(
        f"Command: `moss experiment{' --quick' if quick else ''} --seeds "
        f"{max(r['seed'] for r in rows) + 1} --out {out}`\n\n{table}\n"
        f"\n(mean ± sample standard deviation over seeds; lower is better)\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    frozen, adapters = summary[0], summary[1:]  # the frozen bar would flatten the rest
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("image", "text")):
        means = [s[f"{kind}_mean"] for s in adapters]
        sds = [s[f"{kind}_sd"] for s in adapters]
        colours = ["#dd8452" if s["window"] > 1 else "#4c72b0" for s in adapters]  # convolving
        ax.bar([s["variant"] for s in adapters], means, yerr=sds, capsize=4, color=colours)
        top = max(m + d for m, d in zip(means, sds))
        bottom = min(m - d for m, d in zip(means, sds))
        ax.set_ylim(bottom - (top - bottom), top + (top - bottom))
        ax.set_title(f"{kind} tokens (frozen backbone: {frozen[kind + '_mean']:.2f})", fontsize=10)
        ax.set_ylabel("validation loss on the shifted distribution (nats)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / f"convlora_experiment_{tag}.png", dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["synthetic", "digits", "photos"], default="synthetic",
                   help="synthetic code images (this module), or real images shipped with "
                        "scikit-learn (handwritten digits; patches of its two sample photos) at "
                        "equal rank and equal parameters, generation scored "
                        "(moss/real_experiment.py)")
    p.add_argument("--quick", action="store_true", help="fewer steps and examples (minutes)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("moss-experiment"))


def main(args) -> int:
    if args.seeds < 1:
        raise SystemExit("moss experiment: --seeds must be >= 1")
    if args.dataset != "synthetic":
        from . import real_experiment

        real_experiment.run(args.dataset, args.quick, args.seeds, args.out)
    else:
        run(args.quick, args.seeds, args.out)
    return 0
