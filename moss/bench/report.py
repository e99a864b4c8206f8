"""Reporting: the terminal table, speedups against the alternatives, CSV rows, PNG plots (the
layer benchmark's and ``moss bench --model``'s)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The fields that make two layer-benchmark rows the same measurement but for the provider.
LAYER_KEY = ("name", "tokens", "rank", "kernel_size", "image_fraction", "mode")


def add_speedups(rows: list[dict], alts, same=LAYER_KEY) -> None:
    """For each row, ``x_<alt>`` = the alternative's median / this row's median (the row of
    provider ``alt`` equal to it in the ``same`` fields), for each alternative in ``alts``
    (NaN where it was not timed)."""
    index = {(*(r[k] for k in same), r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        key = tuple(r[k] for k in same)
        for alt in alts:
            other = index.get((*key, alt))
            r[f"x_{alt}"] = other / r["median_ms"] if other else float("nan")


@dataclass(frozen=True)
class Column:
    header: str
    width: int
    cell: Callable[[dict], str]
    left: bool = False


#: A measurement's median with its p20 and p80 (runner.summary's fields).
SPREAD = [Column("median ms", 10, lambda r: f"{r['median_ms']:.3f}"),
          Column("p20", 9, lambda r: f"{r['p20_ms']:.3f}"),
          Column("p80", 9, lambda r: f"{r['p80_ms']:.3f}")]


def table(rows: list[dict], columns: list[Column]) -> str:
    """The rows under a header and a rule, one cell per column."""
    def line(cells):
        return " ".join(f"{v:<{c.width}}" if c.left else f"{v:>{c.width}}"
                        for c, v in zip(columns, cells))

    head = line(c.header for c in columns)
    return "\n".join([head, "-" * len(head)] + [line(c.cell(r) for c in columns) for r in rows])


def format_table(rows: list[dict], alts: list[str]) -> str:
    """The rows as a table; with a roofline (``roofline_ms`` in the rows) its time and the
    measured time over it beside each median."""
    roof = bool(rows) and "roofline_ms" in rows[0]
    columns = [Column("provider", 20, lambda r: r["provider"], left=True),
               Column("mode", 16, lambda r: r["mode"], left=True),
               *SPREAD]
    if roof:
        columns += [Column("roof ms", 9, lambda r: f"{r['roofline_ms']:.3f}"),
                    Column("x roof", 7, lambda r: f"{r['x_roofline']:.2f}x")]
    columns += [Column("x floor", 8, lambda r: f"{r['ratio_to_floor']:.3f}x"),
                Column("TFLOP/s", 8, lambda r: f"{r['tflops']:.3f}"),
                Column("saved MB", 9, lambda r: f"{r['saved_mb']:.1f}"),
                Column("peak MB", 9, lambda r: f"{r['peak_mb']:.1f}"),
                Column("peak/ref", 8, lambda r: f"{r['peak_vs_reference']:.2f}")]
    columns += [Column("vs " + a, 18, lambda r, a=a: "" if r["provider"] == "F.linear"
                       else speedup(r.get("x_" + a))) for a in alts]
    return table(rows, columns)


def speedup(v) -> str:
    """``1.23x faster`` / ``1.23x slower`` for a ratio other / this; blank for NaN."""
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


def _pyplot():
    """matplotlib's pyplot drawing to files, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, out: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(rows: list[dict], field: str, out: Path, title: str) -> Path | None:
    """Ratio to the floor against ``field`` (one line per provider, a panel per mode)."""
    plt = _pyplot()
    if plt is None:
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
    return _save(plt, fig, out, title)


def bar_plot(rows: list[dict], panel: str, series: str, out: Path, title: str,
             label: Callable[[object], str] = str) -> Path | None:
    """Medians as bars with p20-p80 whiskers: a panel per value of ``panel``, the providers
    along x, side by side a bar per value of ``series`` the provider has (coloured and named
    ``label(value)`` alike in every panel)."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = list(dict.fromkeys(r[panel] for r in rows))
    colours = {k: f"C{i}" for i, k in enumerate(dict.fromkeys(r[series] for r in rows))}
    width = 0.8 / max(sum(r["provider"] == p and r[panel] == v for r in rows)
                      for p in {r["provider"] for r in rows} for v in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4), squeeze=False)
    for ax, value in zip(axes[0], panels):
        providers = list(dict.fromkeys(r["provider"] for r in rows if r[panel] == value))
        labelled = set()
        for i, provider in enumerate(providers):
            mine = [r for r in rows if r[panel] == value and r["provider"] == provider]
            for j, r in enumerate(mine):
                kind = r[series]
                ax.bar(i + (j - (len(mine) - 1) / 2) * width, r["median_ms"], width,
                       yerr=[[r["median_ms"] - r["p20_ms"]], [r["p80_ms"] - r["median_ms"]]],
                       capsize=3, color=colours[kind],
                       label=None if kind in labelled else label(kind))
                labelled.add(kind)
        ax.set_xticks(range(len(providers)), providers, fontsize=8)
        ax.set_ylabel("ms: median, p20-p80 (lower is better)")
        ax.set_title(str(value))
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom: the legend above the bars
        ax.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, out, title)
