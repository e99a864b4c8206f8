"""The bench lines of bench/gpu_check.sh's summary, from the CSV rows moss bench wrote.

    python bench/gpu_summary.py OUT/moss_bench_cuda.csv

One line per case and mode: each of our fused backends' median over F.linear's, over its
roofline (when measured) and against torch.compile of the eager formulation (when timed), and
which of them is fastest there.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _num(row: dict, key: str) -> float | None:
    try:
        value = float(row.get(key) or "nan")
    except ValueError:
        return None
    return None if value != value else value


def summarise(rows: list[dict]) -> list[str]:
    lines, groups = [], {}
    for r in rows:
        if r["provider"].startswith("moss:") and r["provider"] != "moss:reference":
            groups.setdefault((r["name"], r["rank"], r["dtype"], r["mode"]), []).append(r)
    for (name, rank, dtype, mode), ours in groups.items():
        parts = []
        for r in ours:
            text = f"{r['provider']} {float(r['ratio_to_floor']):.2f}x F.linear"
            if (roof := _num(r, "x_roofline")) is not None:
                text += f", {roof:.1f}x roofline"
            if (compiled := _num(r, "x_compile:eager")) is not None:
                text += f", {compiled:.2f}x faster than compile:eager"
            parts.append(text)
        best = min(ours, key=lambda r: float(r["median_ms"]))["provider"]
        lines.append(f"  {name} R={rank} {dtype} {mode}: {'; '.join(parts)}; fastest {best}")
    return lines


def main(argv: list[str]) -> int:
    rows = [r for path in argv for r in csv.DictReader(Path(path).open())]
    print("\n".join(summarise(rows)) or "  (no rows of our backends)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
