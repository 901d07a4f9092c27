"""``python -m optim COMMAND``: the command-line entry point.

Commands:
    bench   time the updates against the speed of memory (see ``optim.bench``)
    plot    plot a ``bench --json`` file (see ``optim.bench.plot``; needs matplotlib)
"""
import argparse
import sys
from typing import Optional, Sequence

from .about import check_package

COMMANDS = ("bench", "plot")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        check_package()  # another project's optim/__init__.py makes every command fail
    except ImportError as err:
        print(f"python -m optim: {err}", file=sys.stderr)
        return 1
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m optim",
        description="optim (thinc-optim): fused Cython optimizers for Thinc and spaCy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "bench", add_help=False,
        help="time optim's updates against the memory roofline and peers "
             "(python -m optim bench --help)")
    commands.add_parser(
        "plot", add_help=False,
        help="plot a `python -m optim bench --json` file (python -m optim plot --help)")
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # --help, or an unknown command: exits
        if args.command is None:
            parser.print_help()
            return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench

        return bench.main(rest, prog="python -m optim bench")
    if command == "plot":
        from .bench import plot

        return plot.main(rest, prog="python -m optim plot")
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
