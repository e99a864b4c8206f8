"""``moss experiment --dataset digits``: does ConvLoRA help on real images nobody here made?

The protocol (bench/results/README.md reads the committed run):

1. **Data**: scikit-learn's handwritten digits (``load_digits``: 1,797 real 8 x 8 scans,
   intensities 0-16, bundled with the package: no download), each an 8 x 8 grid of 17 codes in
   a record ``"digit k"`` -> image -> ``"that is a <name>"``. Digits 0-4 pre-train a small
   Chameleon from scratch (all its weights), which is then frozen; digits 5-9 are the shift:
   60% to adapt on, 40% held out (validation losses, the scoring classifier, the real
   reference for distances).
2. **Variants** on the frozen backbone, with the same data order, steps and learning rate, over
   several seeds (the adapters' initialisation differs per seed): at **equal rank** (the
   paper's setting, ``r_text = r_image``): a LoRA on every token (``shared``), MOSS with a
   linear image LoRA (``moe``), MOSS with ConvLoRA K 2 and K 3 (K*K times the linear
   down-projection's parameters); at **equal parameters**: ConvLoRA K 2 and 3 at the rank whose
   count is nearest ``moe``'s; and a **full fine-tune** of the backbone on 5-9 (what a
   rank-limited adapter approaches).
3. **Measures**: validation loss per image token and per text token, beside a uniform guess over
   the 17 codes (ln 17) and the full fine-tune; the validation image loss along training
   (curves); conditional generation: ``--samples`` images of each "digit k" under constrained
   decoding (moss.constrain.ImageSpans), scored by a logistic regression trained on real
   digits (the held-out 5-9 and the pre-training 0-4: accuracy of the intended digit among all
   ten) and by the MMD (RBF kernel, median bandwidth) to the held-out real images of that
   digit; mean ± sample sd over seeds; a figure of samples per variant.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
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
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OLD, NEW = range(0, 5), range(5, 10)
RANK = 8
#: (variant, K, budget): budget "rank" = r_text = r_image = RANK; "params" = moe's count.
RUNS = [("shared", 1, "rank"), ("moe", 1, "rank"), ("conv", 2, "rank"), ("conv", 3, "rank"),
        ("conv", 2, "params"), ("conv", 3, "params")]
FULL, FROZEN = "full fine-tune", "frozen (no adapter)"
#: pre-training steps, adapter steps, probe every, samples per digit
SIZES = {"quick": (300, 150, 50, 8), "full": (1500, 600, 50, 24)}
KEYS = ("image", "best", "text", "accuracy", "mmd")  # what the table reports per variant


def load() -> tuple[np.ndarray, np.ndarray]:
    """``(codes [1797, 64] in 0..16, digit [1797])`` of scikit-learn's bundled digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("moss experiment --dataset digits: needs scikit-learn "
                         "(pip install 'moss-kernels[experiment]')") from None
    digits = load_digits()
    return digits.images.reshape(-1, 64).astype(np.int64), digits.target.astype(np.int64)


def splits(digit: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices: ``pre`` (every 0-4), and 5-9 shuffled into ``train`` (60%) / ``held`` (40%)."""
    new = np.random.default_rng(seed).permutation(np.flatnonzero(digit >= NEW.start))
    cut = int(0.6 * len(new))
    return {"pre": np.flatnonzero(digit < NEW.start), "train": new[:cut], "held": new[cut:]}


def record(codes: np.ndarray, digit: int) -> dict:
    return {"segments": [
        {"role": "user", "type": "text", "text": f"digit {digit}"},
        {"role": "assistant", "type": "image", "codes": codes.tolist()},
        {"role": "assistant", "type": "text", "text": f"that is a {NAMES[digit]}"}]}


def digits_vocabulary(model) -> backbones.Vocabulary:
    """The tiny Chameleon's vocabulary on 8 x 8 images of its first 17 codes."""
    vocab = vocabulary(model)
    return dataclasses.replace(vocab, code_to_token=vocab.code_to_token[:LEVELS])


def examples(codes, digit, idx, vocab):
    return [encode_record(record(codes[i], int(digit[i])), vocab, True, f"digits[{i}]")
            for i in idx]


@torch.no_grad()
def sample(model, vocab, per_digit: int, seed: int) -> np.ndarray:
    """``[5, per_digit, 64]`` intensities: each new digit's images, sampled under the
    constraint (exactly 64 of the 17 codes, then the image's end)."""
    prompts = [[vocab.bos, *vocab.encode_text(f"digit {k}"), vocab.begin_image]
               for k in NEW for _ in range(per_digit)]
    ids = torch.tensor(prompts)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         max_new_tokens=65, pad_token_id=vocab.pad, eos_token_id=vocab.eos,
                         logits_processor=[ImageSpans(vocab)])
    grids = [images_of([vocab.begin_image, *row], vocab)[0].codes
             for row in out[:, ids.shape[1]:].tolist()]
    return np.array(grids).reshape(len(NEW), per_digit, 64)


class Scorer:
    """How real the generated digits look: a logistic regression over all ten digits, trained
    on real images (held-out 5-9, pre-training 0-4), and the MMD to each digit's held-out
    images."""

    def __init__(self, codes, digit, parts):
        from sklearn.linear_model import LogisticRegression

        ref = np.concatenate([parts["held"], parts["pre"]])
        self.clf = LogisticRegression(max_iter=3000).fit(codes[ref] / 16, digit[ref])
        self.real = {k: codes[parts["held"][digit[parts["held"]] == k]] / 16 for k in NEW}
        pooled = np.concatenate(list(self.real.values()))
        d2 = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
        self.gamma = 1.0 / np.median(d2[d2 > 0])

    def __call__(self, images: np.ndarray) -> dict[str, float]:
        """``images [5, n, 64]`` (intensities) -> accuracy and mean MMD^2."""
        x = images / 16
        pred = self.clf.predict(x.reshape(-1, 64)).reshape(x.shape[:2])
        acc = float((pred == np.array(list(NEW))[:, None]).mean())
        mmd = float(np.mean([self._mmd2(x[i], self.real[k]) for i, k in enumerate(NEW)]))
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


def run(quick: bool, seeds: int, out: Path, sizes: tuple[int, int, int, int] | None = None
        ) -> list[dict]:
    from tqdm import tqdm

    pre_steps, steps, every, per_digit = sizes or SIZES["quick" if quick else "full"]
    codes, digit = load()
    parts = splits(digit)
    base = tiny.build(seed=0)
    spec = backbones.spec_for(base)
    spec.unmask_image_logits(base)
    vocab = digits_vocabulary(base)
    image_ids = set(vocab.code_to_token)
    train, held = (examples(codes, digit, parts[p], vocab) for p in ("train", "held"))
    scorer = Scorer(codes, digit, parts)
    torch.manual_seed(0)
    print(f"pre-training the tiny Chameleon on {len(parts['pre'])} real digits 0-4 "
          f"({pre_steps} steps)", file=sys.stderr)
    _fit(base, list(base.parameters()), examples(codes, digit, parts["pre"], vocab), pre_steps,
         3e-3, seed=2, batch=16)
    for p in base.parameters():
        p.requires_grad_(False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    layers = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in spec.targets]

    def probe(model):
        return lambda: evaluate(model, held, image_ids)["image"]

    samples = {FROZEN: sample(base, vocab, per_digit, 0)}
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
        images = sample(model, vocab, per_digit, 1000 + seed)
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
    real = codes[parts["train"]]
    reference = {"uniform": float(np.log(LEVELS)),
                 **{f"real {k}": v for k, v in scorer(np.stack(
                     [real[digit[parts["train"]] == k][:per_digit] for k in NEW])).items()}}
    report(rows, reference, samples, out, quick)
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


def report(rows, reference, samples, out: Path, quick: bool) -> None:
    summary = summarise(rows)
    lines = ["| variant | comparison | adapter params | seeds | image-token val loss | "
             "best along training | text-token val loss | intended digit (accuracy) | "
             "MMD² to real |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['variant']} | {s['comparison']} | {s['params']:,} | {s['seeds']} | "
            + " | ".join(f"{s[k]:.4f} ± {s[k + '_sd']:.4f}"
                         for k in KEYS) + " |")
    lines.append(f"| real digits 5-9 of the adaptation set (reference) | | | | | | | "
                 f"{reference['real accuracy']:.4f} | {reference['real mmd']:.4f} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if quick else "full"
    stem = out / f"digits_experiment_{tag}"
    Path(f"{stem}.json").write_text(json.dumps({"rows": rows, "reference": reference},
                                               indent=1) + "\n")
    Path(f"{stem}.md").write_text(
        f"Command: `moss experiment --dataset digits{' --quick' if quick else ''} --seeds "
        f"{max(r['seed'] for r in rows) + 1} --out {out}`\n\n{table}\n\n"
        f"Mean ± sample standard deviation over seeds. Losses in nats per token on the held-out "
        f"digits 5-9 (a uniform guess over the 17 codes: {reference['uniform']:.4f}), at the end "
        f"and the lowest of the curve (probed every few steps: early stopping); accuracy: "
        f"share of generated images a logistic regression on real digits reads as the intended "
        f"digit (of ten); MMD²: to the held-out real images of the same digit (lower is "
        f"closer); the reference row scores real images the adapters trained on.\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    _plot_curves(plt, rows, reference, f"{stem}_curves.png")
    _plot_samples(plt, samples, f"{stem}_samples.png")


def _plot_curves(plt, rows, reference, path) -> None:
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
    ax.set_title("Real digits 5-9 on a backbone pre-trained on 0-4 (mean over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_samples(plt, samples, path, shown: int = 4) -> None:
    names = list(samples)
    shown = min(shown, next(iter(samples.values())).shape[1])
    fig, axes = plt.subplots(len(names), 1, figsize=(len(NEW) * shown * 0.45 + 2,
                                                     len(names) * 0.75 + 0.4))
    for ax, name in zip(np.atleast_1d(axes), names):
        images = samples[name][:, :shown].reshape(len(NEW), shown, 8, 8)
        strip = np.concatenate([np.pad(im, 1) for row in images for im in row], axis=1)
        ax.imshow(strip, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"Samples of 'digit 5' ... 'digit 9' ({shown} each, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
