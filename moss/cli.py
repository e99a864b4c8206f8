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
from contextlib import contextmanager


@contextmanager
def input_errors(command: str):
    """Around a command's input stage: a missing file, malformed data or checkpoint, or an
    unusable backend ends the command with its message (exit status 1), not a traceback.
    Errors after the input stage keep their traceback."""
    from moss_kernels import BackendUnavailableError

    try:
        yield
    except (OSError, ValueError, TypeError, BackendUnavailableError) as exc:
        raise SystemExit(f"moss {command}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import bench
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
    out = getattr(args, "out", None)  # bench, train, experiment: checked before hours of work
    if out is not None and out.exists() and not out.is_dir():
        raise SystemExit(f"moss {args.command}: --out: {out} is a file, not a folder")
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
    from . import bench

    return bench.main(args)
