"""The ``moss`` command line (``python -m moss`` works too):

    moss info        versions, hardware, extension build and backends (or why not)
    moss bench       the benchmark (moss/bench/)
    moss train       train adapters (a built-in tiny Chameleon and shipped sample by default)
    moss generate    interleaved output from a trained adapter
    moss experiment  does ConvLoRA model image tokens better? (a small reproduction)

Each command is a module with ``add_arguments(parser)`` and ``main(args) -> int``; this file
only parses and dispatches, and nothing below it imports it.
"""

from __future__ import annotations

import argparse
import importlib

#: command -> (module, help)
COMMANDS = {
    "info": ("moss.info", "versions, hardware, extension build and backends (or why not)"),
    "bench": ("moss.bench", "time every backend against F.linear and the alternatives"),
    "train": ("moss.train", "train MOSS adapters"),
    "generate": ("moss.generate", "generate with a trained adapter"),
    "experiment": ("moss.experiment",
                   "adapter variants on a shifted distribution, synthetic or real digits "
                   "(ConvLoRA claim)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (module, help) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(command, help=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)  # bench, train, experiment: checked before hours of work
    if out is not None and out.exists() and not out.is_dir():
        raise SystemExit(f"moss {args.command}: --out: {out} is a file, not a folder")
    return importlib.import_module(COMMANDS[args.command][0]).main(args)
