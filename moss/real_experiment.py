"""``moss experiment --dataset digits|photos``: does ConvLoRA help on real images nobody here
made?

The protocol (bench/results/README.md reads the committed runs):

1. **Data**, shipped inside scikit-learn (no download), as 8 x 8 grids of 17 codes:
   ``digits``: its handwritten digits (``load_digits``: 1,797 real scans, intensities 0-16), in
   records ``"digit k"`` -> image -> ``"that is a <name>"``; digits 0-4 are the old classes,
   5-9 the shift. ``photos``: its two sample photographs (``load_sample_images``: a Chinese
   temple and a flower, 427 x 640), cut into 8 x 8 grey patches quantised to 17 levels, 900
   textured ones (3 levels or more: no flat sky or shadow) from each, in records
   ``"a patch of the <photo>"`` -> image -> ``"that is the <photo>"``; the temple is old, the
   flower the shift. The old classes pre-train a small Chameleon from
   scratch (all its weights), which is then frozen; the new ones are split 60% to adapt on,
   40% held out (validation losses, the scoring classifier, the real reference for distances).
2. **Variants** on the frozen backbone, with the same data order, steps and learning rate, over
   several seeds (the adapters' initialisation differs per seed): at **equal rank** (the
   paper's setting, ``r_text = r_image``): a LoRA on every token (``shared``), MOSS with a
   linear image LoRA (``moe``), MOSS with ConvLoRA K 2 and K 3 (K*K times the linear
   down-projection's parameters); at **equal parameters**: ConvLoRA K 2 and 3 at the rank whose
   count is nearest ``moe``'s; and a **full fine-tune** of the backbone on the new classes
   (what a rank-limited adapter approaches).
3. **Measures**: validation loss per image token and per text token, beside a uniform guess over
   the 17 codes (ln 17) and the full fine-tune, at the end and at the best probe along
   training (curves); conditional generation: samples of each new class under constrained
   decoding (moss.constrain.ImageSpans), scored by a logistic regression trained on real images
   of every class (the held-out new ones and the old ones: accuracy of the intended class) and
   by the MMD (RBF kernel, median bandwidth) to the held-out real images of that class; mean ±
   sample sd over seeds; a figure of samples per variant.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import backbones, tiny
from .config import MossConfig
from .constrain import ImageSpans
from .data import encode_record
from .experiment import _fit, evaluate, matched_config, vocabulary
from .model import get_moss_model
from .render import images_of

LEVELS = 17  # intensities 0..16: the codes
RANK = 8
#: (variant, K, budget): budget "rank" = r_text = r_image = RANK; "params" = moe's count.
RUNS = [("shared", 1, "rank"), ("moe", 1, "rank"), ("conv", 2, "rank"), ("conv", 3, "rank"),
        ("conv", 2, "params"), ("conv", 3, "params")]
FULL, FROZEN = "full fine-tune", "frozen (no adapter)"
#: pre-training steps, adapter steps, probe every, samples per class (spread over the classes)
SIZES = {"quick": (300, 150, 50, 40), "full": (1500, 600, 50, 120)}
KEYS = ("image", "best", "text", "accuracy", "mmd")  # what the table reports per variant
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclasses.dataclass
class RealSet:
    """Images as ``codes [N, 64]`` in 0..16 with a class per image; ``new``: the classes of the
    shift (adapted on, generated); the others pre-train. ``prompt`` / ``answer``: the record's
    text before and after the image, by class."""

    name: str
    codes: np.ndarray
    label: np.ndarray
    new: list[int]
    prompt: Callable[[int], str]
    answer: Callable[[int], str]


def load(name: str) -> RealSet:
    """The data set ``name`` (``digits`` or ``photos``), as scikit-learn ships it."""
    try:
        from sklearn import datasets
    except ImportError:
        raise SystemExit(f"moss experiment --dataset {name}: needs scikit-learn "
                         f"(pip install 'moss-kernels[experiment]')") from None
    if name == "digits":
        digits = datasets.load_digits()
        return RealSet("digits", digits.images.reshape(-1, 64).astype(np.int64),
                       digits.target.astype(np.int64), list(range(5, 10)),
                       lambda k: f"digit {k}", lambda k: f"that is a {DIGITS[k]}")
    photos = ["temple", "flower"]  # china.jpg, flower.jpg
    rng = np.random.default_rng(0)
    codes = []
    for image in datasets.load_sample_images().images:
        grey = image.mean(-1)
        h, w = (s // 8 for s in grey.shape)
        patches = np.rint(grey[:h * 8, :w * 8].reshape(h, 8, w, 8).transpose(0, 2, 1, 3)
                          .reshape(-1, 64) / 255 * 16)
        textured = patches[[len(np.unique(x)) >= 3 for x in patches]]  # not flat sky or shadow
        codes.append(textured[rng.permutation(len(textured))[:900]])
    return RealSet("photos", np.concatenate(codes).astype(np.int64), np.repeat([0, 1], 900), [1],
                   lambda k: f"a patch of the {photos[k]}", lambda k: f"that is the {photos[k]}")


def splits(data: RealSet, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices: ``pre`` (every old class), and the new classes shuffled into ``train`` (60%) /
    ``held`` (40%)."""
    is_new = np.isin(data.label, data.new)
    new = np.random.default_rng(seed).permutation(np.flatnonzero(is_new))
    cut = int(0.6 * len(new))
    return {"pre": np.flatnonzero(~is_new), "train": new[:cut], "held": new[cut:]}


def record(data: RealSet, i: int) -> dict:
    k = int(data.label[i])
    return {"segments": [
        {"role": "user", "type": "text", "text": data.prompt(k)},
        {"role": "assistant", "type": "image", "codes": data.codes[i].tolist()},
        {"role": "assistant", "type": "text", "text": data.answer(k)}]}


def codes_vocabulary(model) -> backbones.Vocabulary:
    """The tiny Chameleon's vocabulary on 8 x 8 images of its first 17 codes."""
    vocab = vocabulary(model)
    return dataclasses.replace(vocab, code_to_token=vocab.code_to_token[:LEVELS])


def examples(data: RealSet, idx, vocab):
    return [encode_record(record(data, i), vocab, True, f"{data.name}[{i}]") for i in idx]


@torch.no_grad()
def sample(model, vocab, data: RealSet, per_class: int, seed: int) -> np.ndarray:
    """``[len(new), per_class, 64]`` intensities: each new class's images, sampled under the
    constraint (exactly 64 of the 17 codes, then the image's end)."""
    prompts = [[vocab.bos, *vocab.encode_text(data.prompt(k)), vocab.begin_image]
               for k in data.new for _ in range(per_class)]
    width = max(map(len, prompts))
    ids = torch.tensor([[vocab.pad] * (width - len(p)) + p for p in prompts])
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=(ids != vocab.pad).long(),
                         do_sample=True, max_new_tokens=65, pad_token_id=vocab.pad,
                         eos_token_id=vocab.eos, logits_processor=[ImageSpans(vocab)])
    grids = [images_of([vocab.begin_image, *row], vocab)[0].codes
             for row in out[:, ids.shape[1]:].tolist()]
    return np.array(grids).reshape(len(data.new), per_class, 64)


class Scorer:
    """How real the generated images look: a logistic regression over every class, trained on
    real images (the held-out new ones, the old ones), and the MMD to each new class's
    held-out images."""

    def __init__(self, data: RealSet, parts):
        from sklearn.linear_model import LogisticRegression

        codes, label, held = data.codes, data.label, parts["held"]
        ref = np.concatenate([held, parts["pre"]])
        self.new = data.new
        self.clf = LogisticRegression(max_iter=3000).fit(codes[ref] / 16, label[ref])
        self.real = {k: codes[held[label[held] == k]] / 16 for k in data.new}
        pooled = np.concatenate(list(self.real.values()))
        d2 = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
        self.gamma = 1.0 / np.median(d2[d2 > 0])

    def __call__(self, images: np.ndarray) -> dict[str, float]:
        """``images [len(new), n, 64]`` (intensities) -> accuracy and mean MMD^2."""
        x = images / 16
        pred = self.clf.predict(x.reshape(-1, 64)).reshape(x.shape[:2])
        acc = float((pred == np.array(self.new)[:, None]).mean())
        mmd = float(np.mean([self._mmd2(x[i], self.real[k]) for i, k in enumerate(self.new)]))
        return {"accuracy": acc, "mmd": mmd}

    def _mmd2(self, a, b) -> float:
        """The unbiased MMD^2 between two samples under exp(-gamma |x - y|^2)."""
        def k(x, y):
            return np.exp(-self.gamma * ((x[:, None] - y[None]) ** 2).sum(-1))
        kaa, kbb = k(a, a), k(b, b)
        m, n = len(a), len(b)
        return ((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb))
                / (n * (n - 1)) - 2 * k(a, b).mean())


def configs(layers) -> list[tuple[str, MossConfig]]:
    """``(comparison, config)`` of every adapter run."""
    out = []
    for variant, k, budget in RUNS:
        if budget == "rank":
            cfg = MossConfig(r_text=RANK, r_image=RANK, alpha_text=2.0 * RANK,
                             alpha_image=2.0 * RANK, kernel_size=max(k, 2),
                             image_adapter=variant, image_grid=(8, 8))
        else:
            cfg = matched_config(variant, k, RANK, RANK, layers)
        out.append(("equal rank" if budget == "rank" else "equal params", cfg))
    return out


def run(dataset: str, quick: bool, seeds: int, out: Path,
        sizes: tuple[int, int, int, int] | None = None) -> list[dict]:
    from tqdm import tqdm

    pre_steps, steps, every, n_samples = sizes or SIZES["quick" if quick else "full"]
    data = load(dataset)
    per_class = max(2, n_samples // len(data.new))
    parts = splits(data)
    base = tiny.build(seed=0)
    spec = backbones.spec_for(base)
    spec.unmask_image_logits(base)
    vocab = codes_vocabulary(base)
    image_ids = set(vocab.code_to_token)
    train, held = (examples(data, parts[p], vocab) for p in ("train", "held"))
    scorer = Scorer(data, parts)
    torch.manual_seed(0)
    print(f"pre-training the tiny Chameleon on {len(parts['pre'])} real {dataset} of the old "
          f"classes ({pre_steps} steps)", file=sys.stderr)
    _fit(base, list(base.parameters()), examples(data, parts["pre"], vocab), pre_steps, 3e-3,
         seed=2, batch=16)
    for p in base.parameters():
        p.requires_grad_(False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    layers = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in spec.targets]

    def probe(model):
        return lambda: evaluate(model, held, image_ids)["image"]

    samples = {FROZEN: sample(base, vocab, data, per_class, 0)}
    frozen = evaluate(base, held, image_ids)
    rows = [{"variant": FROZEN, "comparison": "reference", "seed": 0, "params": 0, "curve": [],
             "best": frozen["image"], **frozen, **scorer(samples[FROZEN])}]
    jobs = [(c, cfg, s) for c, cfg in configs(layers) for s in range(seeds)]
    jobs += [("reference", None, s) for s in range(seeds)]
    for comparison, cfg, seed in tqdm(jobs, desc="variants x seeds", file=sys.stderr,
                                      disable=None):
        base.load_state_dict(state)
        torch.manual_seed(100 + seed)  # the adapters' init differs per seed; data order is shared
        if cfg is None:  # the full fine-tune
            name, model = FULL, base
            params = list(base.parameters())
            for p in params:
                p.requires_grad_(True)
            lr = 3e-3  # the pre-training's
        else:
            name, model = f"{cfg.variant.label(cfg)} r={cfg.r_image}", get_moss_model(base, cfg)
            params, lr = [p for p in model.parameters() if p.requires_grad], 5e-3
        curve = _fit(model, params, train, steps, lr, seed=5, batch=16, probe=probe(model),
                     every=every)
        images = sample(model, vocab, data, per_class, 1000 + seed)
        if seed == 0:
            samples[name] = images
        rows.append({"variant": name, "comparison": comparison, "seed": seed,
                     "params": sum(p.numel() for p in params),
                     "r_text": getattr(cfg, "r_text", None),
                     "r_image": getattr(cfg, "r_image", None),
                     "curve": curve, "best": min(v for _, v in curve),
                     **evaluate(model, held, image_ids), **scorer(images)})
        if cfg is None:
            for p in params:
                p.requires_grad_(False)
        else:
            model.unload()
    train_idx = parts["train"]
    real = np.stack([data.codes[train_idx[data.label[train_idx] == k]][:per_class]
                     for k in data.new])
    reference = {"uniform": float(np.log(LEVELS)),
                 **{f"real {k}": v for k, v in scorer(real).items()}}
    report(data, rows, reference, samples, out, quick)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        entry = {"variant": name, "comparison": rs[0]["comparison"], "params": rs[0]["params"],
                 "seeds": len(rs)}
        for key in KEYS:
            vals = [r[key] for r in rs]
            entry[key] = statistics.mean(vals)
            entry[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def report(data: RealSet, rows, reference, samples, out: Path, quick: bool) -> None:
    summary = summarise(rows)
    lines = ["| variant | comparison | adapter params | seeds | image-token val loss | "
             "best along training | text-token val loss | intended class (accuracy) | "
             "MMD² to real |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['variant']} | {s['comparison']} | {s['params']:,} | {s['seeds']} | "
            + " | ".join(f"{s[k]:.4f} ± {s[k + '_sd']:.4f}"
                         for k in KEYS) + " |")
    lines.append(f"| real images of the adaptation set (reference) | | | | | | | "
                 f"{reference['real accuracy']:.4f} | {reference['real mmd']:.4f} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "full"
    stem = out / f"{data.name}_experiment_{tag}"
    Path(f"{stem}.json").write_text(json.dumps({"rows": rows, "reference": reference},
                                               indent=1) + "\n")
    Path(f"{stem}.md").write_text(
        f"Command: `moss experiment --dataset {data.name}{' --quick' if quick else ''} --seeds "
        f"{max(r['seed'] for r in rows) + 1} --out {out}`\n\n{table}\n\n"
        f"Mean ± sample standard deviation over seeds. Losses in nats per token on the held-out "
        f"images of the new classes (a uniform guess over the 17 codes: "
        f"{reference['uniform']:.4f}), at the end and the lowest of the curve (probed every few "
        f"steps: early stopping); accuracy: share of generated images a logistic regression on "
        f"real images reads as the intended class (of {len(np.unique(data.label))}); MMD²: to "
        f"the held-out real images of the same class (lower is closer); the reference row "
        f"scores real images the adapters trained on.\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    _plot_curves(plt, data, rows, reference, f"{stem}_curves.png")
    _plot_samples(plt, data, samples, f"{stem}_samples.png")


def _plot_curves(plt, data: RealSet, rows, reference, path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["variant"] for r in rows if r["curve"]):
        curves = np.array([[v for _, v in r["curve"]] for r in rows if r["variant"] == name])
        steps = [s for s, _ in next(r for r in rows if r["variant"] == name)["curve"]]
        ax.plot(steps, curves.mean(0), label=name, ls="--" if name == FULL else "-")
    frozen = next(r for r in rows if r["variant"] == FROZEN)
    ax.axhline(reference["uniform"], color="grey", ls=":", label="uniform over 17 codes")
    ax.axhline(frozen["image"], color="black", ls=":", label="frozen backbone")
    ax.set_xlabel("adapter training step")
    ax.set_ylabel("held-out image-token loss (nats)")
    ax.set_title(f"Real {data.name}: the new classes on a backbone pre-trained on the others "
                 f"(mean over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_samples(plt, data: RealSet, samples, path, per_row: int = 20) -> None:
    names, classes = list(samples), len(data.new)
    shown = min(per_row // classes, next(iter(samples.values())).shape[1])
    fig, axes = plt.subplots(len(names), 1, figsize=(classes * shown * 0.45 + 2,
                                                     len(names) * 0.75 + 0.4))
    for ax, name in zip(np.atleast_1d(axes), names):
        images = samples[name][:, :shown].reshape(classes, shown, 8, 8)
        strip = np.concatenate([np.pad(im, 1) for row in images for im in row], axis=1)
        ax.imshow(strip, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    prompts = " / ".join(f"'{data.prompt(k)}'" for k in data.new)
    fig.suptitle(f"Samples of {prompts} ({shown} each, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
