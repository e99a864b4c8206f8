"""Reporting: the terminal table, speedups against the alternatives, CSV rows, PNG plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def add_speedups(rows: list[dict], alts) -> None:
    """For each row, ``x_<alt>`` = the alternative's median / this row's median (same case and
    mode), for each alternative provider in ``alts`` (NaN where it was not timed)."""
    index = {(r["name"], r["tokens"], r["rank"], r["kernel_size"], r["image_fraction"],
              r["mode"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        key = (r["name"], r["tokens"], r["rank"], r["kernel_size"], r["image_fraction"], r["mode"])
        for alt in alts:
            other = index.get((*key, alt))
            r[f"x_{alt}"] = other / r["median_ms"] if other else float("nan")


def format_table(rows: list[dict], alts: list[str]) -> str:
    """The rows as a table; with a roofline (``roofline_ms`` in the rows) its time and the
    measured time over it beside each median."""
    roof = bool(rows) and "roofline_ms" in rows[0]
    head = (f"{'provider':<20} {'mode':<16} {'median ms':>10} {'p20':>9} {'p80':>9} "
            + (f"{'roof ms':>9} {'x roof':>7} " if roof else "")
            + f"{'x floor':>8} {'TFLOP/s':>8} {'saved MB':>9} {'peak MB':>9} {'peak/ref':>8}"
            + "".join(f" {'vs ' + a:>18}" for a in alts))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['provider']:<20} {r['mode']:<16} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} "
            f"{r['p80_ms']:>9.3f} "
            + (f"{r['roofline_ms']:>9.3f} {r['x_roofline']:>6.2f}x " if roof else "")
            + f"{r['ratio_to_floor']:>7.3f}x {r['tflops']:>8.3f} "
            f"{r['saved_mb']:>9.1f} {r['peak_mb']:>9.1f} {r['peak_vs_reference']:>8.2f}"
            + "".join(f" {_speedup(r.get('x_' + a)) if r['provider'] != 'F.linear' else '':>18}"
                      for a in alts))
    return "\n".join(lines)


def _speedup(v) -> str:
    if v is None or math.isnan(v):
        return ""
    return f"{v:.2f}x faster" if v >= 1 else f"{1 / v:.2f}x slower"


def append_csv(path: Path, rows: list[dict], context: dict) -> Path:
    """Append rows, each with the run's context (hardware, versions, git sha, date). A file
    whose header differs (an older layout) is left alone and a new one started beside it."""
    records = [{**context, **r} for r in rows]
    fields = list(records[0])
    for r in records[1:]:
        fields += [k for k in r if k not in fields]
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            path = path.with_name(f"{path.stem}.{len(fields)}cols{path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(records)
    return path


def plot(rows: list[dict], field: str, out: Path, title: str) -> Path | None:
    """Ratio to the floor against ``field`` (one line per provider, a panel per mode)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = [m for m in ("forward", "forward+backward") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in sorted({r["provider"] for r in rows}):
            pts = sorted((r[field], r["ratio_to_floor"]) for r in rows
                         if r["provider"] == provider and r["mode"] == mode)
            if pts:
                style = ("-o" if provider.startswith("moss:") else
                         "--s" if provider != "F.linear" else ":")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=provider)
        ax.set_xlabel(field.replace("_", " "))
        ax.set_ylabel("time / F.linear (lower is better)")
        ax.set_title(mode)
        if field == "rank":
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
