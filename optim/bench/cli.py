"""The command line: options, `Config` from them, and `main`."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

from .cases import (DEFAULT_SIZES, DTYPES, LAYOUTS, PEERS, PROG, QUICK_SIZES, SPECS,
                    BYTES_MODEL, Config)
from .errors import NotReady, UsageError
from .report import format_report, write_json
from .runner import run
from .timing import CLOCKS


def _split(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _choices(value: str, allowed: Sequence[str], what: str) -> List[str]:
    names = _split(value.lower())
    if names == ["all"]:
        return list(allowed)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(map(repr, bad)) or repr(value)}; "
            f"choose from {', '.join(allowed)} (comma-separated) or 'all'")
    return list(dict.fromkeys(names))


def _sizes(value: str) -> List[int]:
    sizes = []
    for item in _split(value) or [value]:
        try:
            f = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: give parameter counts like 1000,1e5,1e6") from None
        if not math.isfinite(f) or f < 1 or f != int(f):
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: sizes must be positive whole numbers")
        sizes.append(int(f))
    return sorted(set(sizes))


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options, for ``python -m optim bench`` and for ``main``."""
    parser.add_argument(
        "--optimizer", type=lambda v: _choices(v, list(SPECS), "optimizer"),
        default=list(SPECS), metavar="NAMES",
        help=f"comma-separated, from {', '.join(SPECS)} (default: all). adam-thinc is "
             "Adam with Thinc's defaults: grad_clip=1.0 and use_averages=True; the "
             "others are lean (no clipping, no averages, no L2)")
    parser.add_argument(
        "--sizes", type=_sizes, default=None, metavar="N,N,...",
        help="parameter counts per update (default: 1e3,1e4,1e5,1e6,1e7; "
             "--quick: 1e3,1e4)")
    parser.add_argument(
        "--dtype", type=lambda v: _choices(v, DTYPES, "dtype"), default=["float32"],
        metavar="DTYPES", help="float32, float64 or both: float32,float64 (default: "
                               "float32)")
    parser.add_argument(
        "--layout", type=lambda v: _choices(v, LAYOUTS, "layout"), default=list(LAYOUTS),
        metavar="LAYOUTS",
        help="one (a single tensor) and/or many (tensors of --tensor-size parameters, "
             "updated with step_many in one call; only sizes >= 10 tensors) "
             "(default: one,many)")
    parser.add_argument(
        "--tensor-size", type=_positive_int, default=1000, metavar="N",
        help="parameters per tensor in the 'many' layout (default: 1000)")
    parser.add_argument(
        "--repeats", type=_positive_int, default=None, metavar="N",
        help="timed samples per implementation and configuration (default: 31 up to "
             "1e5 parameters, 15 to 1e6, 7 above; --quick: 3)")
    parser.add_argument(
        "--threads", type=_positive_int, default=1, metavar="N",
        help="threads for optim's CPU kernels (optim.set_num_threads), the roofline and "
             "the peers (torch.set_num_threads, BLAS through threadpoolctl when "
             "installed). With N > 1 the roofline is also run on one thread, optim too "
             "(optim-1t), in the same run; timings use the wall clock (default: 1)")
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu",
        help="cpu (default) or gpu (needs CuPy and a CUDA device)")
    parser.add_argument(
        "--compare", type=lambda v: _choices(v, PEERS, "peer"), default=[],
        metavar="PEERS",
        help="also time peers: thinc (thinc.api optimizers), torch (torch.optim, fused "
             "where torch has it, else foreach), numpy (plain in-place NumPy); "
             "comma-separated or 'all'. Peers that are not installed are named and "
             "skipped")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="auto",
        help="cpu: this thread's CPU time (time.thread_time_ns), which leaves out time the "
             "OS gave the core to other processes; wall: time.perf_counter_ns. auto "
             "(default): cpu on --device cpu with --threads 1, else wall. Both are "
             "recorded in the JSON")
    parser.add_argument(
        "--json", dest="json_path", default=None, metavar="PATH",
        help="also write the results as JSON to PATH (plot with bin/plot_bench.py)")
    parser.add_argument(
        "--groups", type=int, default=0, metavar="N",
        help="also time optim with N per-parameter groups bound (optim+groups rows; each "
             "group its own learning rate, the tensors dealt round-robin), beside optim "
             "without groups in the same run (default: 0, no such rows)")
    parser.add_argument(
        "--nonfinite", choices=("apply", "skip", "raise"), default="apply",
        help="skip or raise: also time optim with that nonfinite mode (optim+skip / "
             "optim+raise rows) beside the default apply mode in the same run")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: sizes 1e3,1e4, 3 repeats, short samples")
    parser.add_argument(
        "--no-overhead", dest="overhead", action="store_false",
        help="skip the per-call overhead rows (one update of 8 parameters)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false",
        help="no progress bar on stderr (it is also off when stderr is not a terminal)")


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time optim's updates against the speed of memory (a roofline "
                    "kernel on the same arrays, measured in the same run) and, "
                    "optionally, against Thinc, torch and NumPy.",
        epilog=BYTES_MODEL)
    add_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    return Config(
        optimizers=args.optimizer, sizes=sizes, dtypes=args.dtype, layouts=args.layout,
        tensor_size=args.tensor_size, repeats=args.repeats, threads=args.threads,
        device=args.device, compare=args.compare, json_path=args.json_path,
        quick=args.quick, progress=args.progress, overhead=args.overhead,
        min_block_s=5e-5 if args.quick else 1e-4, clock=args.clock,
        groups=args.groups, nonfinite=args.nonfinite)


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """Run the CLI in-process; returns the exit status (2 for a bad option)."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)  # exits 2 with "error: ..." on bad options
    cfg = config_from_args(args)
    if cfg.json_path:
        folder = os.path.dirname(os.path.abspath(cfg.json_path))
        if not os.path.isdir(folder):
            parser.error(f"--json {cfg.json_path}: folder {folder} does not exist")
    try:
        result = run(cfg)
    except UsageError as err:
        parser.error(str(err))  # exits 2
    except NotReady as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(format_report(result))
    if cfg.json_path:
        write_json(result, cfg.json_path)
        print(f"\nwrote {cfg.json_path}")
    return 0
