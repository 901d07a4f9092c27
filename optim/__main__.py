"""``python -m optim COMMAND``: the command-line entry point.

Commands:
    bench   time the updates against the speed of memory (see ``optim.bench``)
"""
import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m optim",
        description="optim: fused Cython optimizers for Thinc and spaCy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "bench", add_help=False,
        help="time optim's updates against the memory roofline and peers "
             "(python -m optim bench --help)")
    if not argv or argv[0] not in ("bench",):
        args = parser.parse_args(argv)  # --help, or an unknown command: exits
        if args.command is None:
            parser.print_help()
            return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench

        return bench.main(rest, prog="python -m optim bench")
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
