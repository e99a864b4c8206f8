"""The ``moss`` command line (``python -m moss`` works too):

    moss info        versions, hardware, extension build and backends (or why not)
    moss bench       the benchmark (moss/bench/)
    moss train       train adapters (a built-in tiny Chameleon and shipped sample by default)
    moss generate    interleaved output from a trained adapter
    moss experiment  does ConvLoRA model image tokens better? (a small reproduction)
"""

from __future__ import annotations

import argparse
import sys

from . import bench


def build_parser() -> argparse.ArgumentParser:
    from .train import add_generate_arguments, add_train_arguments

    parser = argparse.ArgumentParser(prog="moss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, hardware, extension build and backends (or why not)")
    bench.add_arguments(sub.add_parser(
        "bench", help="time every backend against F.linear and the alternatives"))
    add_train_arguments(sub.add_parser("train", help="train MOSS adapters"))
    add_generate_arguments(sub.add_parser("generate", help="generate with a trained adapter"))
    from . import experiment

    experiment.add_arguments(sub.add_parser(
        "experiment", help="adapter variants on a shifted synthetic distribution (ConvLoRA claim)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    if args.command == "train":
        import os

        from .train import train

        final = train(args)
        if os.environ.get("RANK", "0") == "0":
            print(f"saved {final}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Every rank has synchronised after the last checkpoint. Leave without running
            # interpreter teardown: gloo's threads outliving it intermittently abort the process
            # ("terminate called without an active exception"), and destroy_process_group()
            # was seen to hang one rank instead.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    if args.command == "generate":
        from .train import generate

        print(generate(args))
        return 0
    if args.command == "experiment":
        from . import experiment

        return experiment.main(args)
    return bench.main(args)
