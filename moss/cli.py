"""The ``moss`` command line: ``moss info`` and ``moss bench`` (``python -m moss`` works too)."""

from __future__ import annotations

import argparse

from . import bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, hardware, extension build and backends (or why not)")
    bench.add_arguments(sub.add_parser(
        "bench", help="time moss_linear on every available backend against F.linear"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    return bench.main(args)
