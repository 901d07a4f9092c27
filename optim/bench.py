"""``python -m optim bench``: optimizer updates against the speed of memory.

For every configuration (optimizer, dtype, number of parameters, layout) the bench times

* ``optim``: our update, ``opt(key, w, g)`` on one tensor, or
  ``opt.step_many(keys, ws, gs)`` on many small tensors;
* the *roofline*: :class:`optim._roofline.Plan` run on arrays of the same number, sizes
  and dtype as the update reads and writes (the same bytes, with trivial arithmetic). It is
  the limit for this machine, and ``ratio = roofline / time`` (1.0 = at the speed of memory);
* optional peers (``--compare thinc,torch,numpy``): Thinc's optimizers, torch.optim (fused
  where torch has a fused kernel, foreach otherwise) and a plain in-place NumPy update.
  Peers that are not installed are named and skipped.

All implementations of one configuration are timed interleaved (sample 1 of each, then
sample 2 of each, ...), so drift on a shared machine hits them alike; the reported time is
the median of the samples. Each sample times a block of back-to-back updates long enough
to be well above the timer's resolution, after warm-up calls (the first update of a key
allocates its state). On CPU with one thread the clock is the thread's CPU time
(``time.thread_time_ns``), which leaves out the time a shared machine gives our core to
other processes; ``--clock wall`` uses ``time.perf_counter_ns``. Both are recorded.

Gradients are zeros, allocated once and never refilled: every update zeroes its gradient
anyway, so refilling would time a memset, and on CPU the arithmetic costs the same on zeros
(with zero gradients the moments stay exactly zero, so there are no denormals either).

Use ``main(argv)`` to run it in-process (returns the exit status) or ``run(config)`` for
the result dict that ``--json`` writes.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat as _repeat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy

SCHEMA_VERSION = 1
PROG = "python -m optim bench"
LEARN_RATE = 0.001


# ---------------------------------------------------------------------------------------
# What is benchmarked


@dataclass(frozen=True)
class Spec:
    """One optimizer configuration."""

    name: str  # CLI name
    label: str  # table label
    kind: str  # "sgd", "adam", "radam"
    grad_clip: float
    use_averages: bool

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for optim's and Thinc's constructors."""
        return dict(learn_rate=LEARN_RATE, L2=0.0, grad_clip=self.grad_clip,
                    use_averages=self.use_averages)

    @property
    def n_arrays(self) -> int:
        """Arrays read and written once per update: w, g (+ m, v) (+ averages)."""
        return (2 if self.kind == "sgd" else 4) + (1 if self.use_averages else 0)

    @property
    def clips(self) -> bool:
        return self.grad_clip > 0

    def bytes_per_param(self, itemsize: int) -> int:
        """The bytes model: each array read+written once, + one read of g to clip."""
        return itemsize * (2 * self.n_arrays + (1 if self.clips else 0))


SPECS: Dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("sgd", "SGD", "sgd", 0.0, False),
        Spec("adam", "Adam", "adam", 0.0, False),
        Spec("radam", "RAdam", "radam", 0.0, False),
        Spec("adam-thinc", "Adam (Thinc defaults: clip+averages)", "adam", 1.0, True),
    )
}
DTYPES = ("float32", "float64")
LAYOUTS = ("one", "many")
PEERS = ("thinc", "torch", "numpy")
DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
QUICK_SIZES = (10**3, 10**4)
OVERHEAD_PARAMS = 8

BYTES_MODEL = (
    "bytes/param = itemsize x (2 x arrays read and written once + 1 if clipping reads g "
    "once more for its norm). float32: SGD (w, g) 16 B; Adam and RAdam (w, g, m, v) 32 B; "
    "averages add 8 B (avg read+written); clipping adds 4 B; Adam with Thinc's defaults "
    "44 B. float64: twice that. GB/s uses this model for every implementation (the work "
    "the update has to do), not what each implementation actually moves (Thinc makes "
    "several passes; torch leaves g alone, 28 B for lean Adam)."
)


@dataclass
class Config:
    """Everything a run needs; ``parse_args`` builds one from the command line."""

    optimizers: List[str] = field(default_factory=lambda: list(SPECS))
    sizes: List[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    dtypes: List[str] = field(default_factory=lambda: ["float32"])
    layouts: List[str] = field(default_factory=lambda: list(LAYOUTS))
    tensor_size: int = 1000
    repeats: Optional[int] = None  # None: by size, see repeats_for
    threads: int = 1
    device: str = "cpu"
    compare: List[str] = field(default_factory=list)
    json_path: Optional[str] = None
    quick: bool = False
    progress: bool = True
    overhead: bool = True
    min_block_s: float = 1e-4
    clock: str = "auto"

    @property
    def resolved_clock(self) -> str:
        """auto: thread CPU time when everything timed runs on this one thread."""
        if self.clock != "auto":
            return self.clock
        return "cpu" if self.device == "cpu" and self.threads == 1 else "wall"

    def repeats_for(self, n: int) -> int:
        if self.repeats is not None:
            return self.repeats
        if self.quick:
            return 3
        if n <= 10**5:
            return 31
        if n <= 10**6:
            return 15
        return 7

    def n_tensors(self, n: int, layout: str) -> int:
        return 1 if layout == "one" else n // self.tensor_size


# ---------------------------------------------------------------------------------------
# The command line


class UsageError(Exception):
    """A bad option: reported as ``error: ...`` with exit status 2."""


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
        help="threads for the peers (torch.set_num_threads, BLAS through threadpoolctl "
             "when installed). optim's CPU kernels and the roofline run on one thread. "
             "(default: 1)")
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
        min_block_s=5e-5 if args.quick else 1e-4, clock=args.clock)


# ---------------------------------------------------------------------------------------
# Devices


class Device:
    """Array namespace, synchronisation and roofline for a device."""

    name = "cpu"

    def __init__(self) -> None:
        self.xp = numpy

    def sync(self) -> None:
        pass

    def filled(self, n: int, dtype: str, value: float) -> Any:
        # empty + fill, not zeros: calloc'd zero pages would make reads look free.
        arr = self.xp.empty(n, dtype=dtype)
        arr.fill(value)
        return arr

    def roofline(self, tensors: List[List[Any]], read_index: Optional[int]) -> Callable:
        from ._roofline import Plan

        return Plan(tensors, read_index=read_index).run

    def describe(self) -> str:
        return cpu_name()


class CupyDevice(Device):
    name = "gpu"

    def __init__(self, cupy: Any) -> None:
        self.xp = cupy

    def sync(self) -> None:
        self.xp.cuda.Device().synchronize()

    def roofline(self, tensors: List[List[Any]], read_index: Optional[int]) -> Callable:
        cp = self.xp
        k = len(tensors[0])
        names = "abcdef"[:k]
        if k == 1:
            body = "a = -a;"
        else:
            body = "T t = a; " + " ".join(
                f"{names[i]} = {names[i + 1]};" for i in range(k - 1)) + f" {names[-1]} = t;"
        rotate = cp.ElementwiseKernel(
            "", ", ".join(f"T {c}" for c in names), body, f"optim_roofline_rw{k}")
        reduce_or = cp.ReductionKernel(
            "T x", "T y", "x", "a | b", "y = a", "0", "optim_roofline_or")
        utype = cp.uint32 if tensors[0][0].dtype.itemsize == 4 else cp.uint64

        def run(number: int = 1) -> None:
            for _ in range(number):
                for arrays in tensors:
                    if read_index is not None:
                        reduce_or(arrays[read_index].view(utype))
                    rotate(*arrays)

        return run

    def describe(self) -> str:
        cp = self.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props.get("name", b"CUDA device")
        return name.decode() if isinstance(name, bytes) else str(name)


def get_device(name: str) -> Device:
    if name == "cpu":
        return Device()
    try:
        import cupy
    except ImportError as err:
        raise UsageError(f"--device gpu needs CuPy, which is not importable ({err}); "
                         "install optim's cuda extra, e.g. pip install optim[cuda12x]")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError without a driver
        raise UsageError(f"--device gpu: CuPy sees no CUDA device ({err})")
    if count < 1:
        raise UsageError("--device gpu: CuPy sees no CUDA device")
    return CupyDevice(cupy)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------
# Implementations. Each builder allocates its own arrays for one configuration and
# returns a function that performs ONE update of all its tensors.


@dataclass
class Case:
    spec: Spec
    dtype: str
    n: int  # parameters in all
    layout: str
    sizes: List[int]  # parameters per tensor
    section: str = "main"  # or "overhead"

    @property
    def keys(self) -> List[Tuple[int, str]]:
        return [(i, "W") for i in range(len(self.sizes))]


class NotReady(Exception):
    """optim's core cannot be imported: reported with exit status 1."""


class Skip(Exception):
    """This implementation does not run this configuration: the message says why."""


def _arrays(dev: Device, case: Case) -> Tuple[List[Any], List[Any]]:
    ws = [dev.filled(s, case.dtype, 0.5) for s in case.sizes]
    gs = [dev.filled(s, case.dtype, 0.0) for s in case.sizes]
    return ws, gs


def build_optim(dev: Device, case: Case) -> Callable[[], Any]:
    import optim

    cls = {"sgd": optim.SGD, "adam": optim.Adam, "radam": optim.RAdam}[case.spec.kind]
    opt = cls(**case.spec.kwargs)
    ws, gs = _arrays(dev, case)
    keys = case.keys
    if case.layout == "one":
        return partial(opt, keys[0], ws[0], gs[0])
    if not hasattr(opt, "step_many"):
        raise Skip("optim has no step_many")
    return partial(opt.step_many, keys, ws, gs)


def build_thinc(dev: Device, case: Case) -> Callable[[], Any]:
    import thinc.api

    cls = {"sgd": thinc.api.SGD, "adam": thinc.api.Adam,
           "radam": thinc.api.RAdam}[case.spec.kind]
    opt = cls(**case.spec.kwargs)
    ws, gs = _arrays(dev, case)
    triples = list(zip(case.keys, ws, gs))
    if len(triples) == 1:
        return partial(opt, *triples[0])

    def step() -> None:  # Thinc has no multi-tensor call: a Python loop
        for key, w, g in triples:
            opt(key, w, g)

    return step


def build_torch(dev: Device, case: Case, threads: int) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    tdev = "cuda" if dev.name == "gpu" else "cpu"
    if tdev == "cuda" and not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")
    tdtype = getattr(torch, case.dtype)
    params = []
    for s in case.sizes:
        p = torch.nn.Parameter(torch.full((s,), 0.5, dtype=tdtype, device=tdev))
        p.grad = torch.full((s,), 0.0, dtype=tdtype, device=tdev)
        params.append(p)
    spec = case.spec
    if spec.kind == "sgd":
        opt = torch.optim.SGD(params, lr=LEARN_RATE, fused=True)
        variant = "fused"
    elif spec.kind == "adam":
        opt = torch.optim.Adam(params, lr=LEARN_RATE, fused=True)
        variant = "fused"
    else:  # no fused RAdam in torch
        opt = torch.optim.RAdam(params, lr=LEARN_RATE, foreach=True)
        variant = "foreach"
    step: Callable[[], Any] = opt.step
    if spec.clips or spec.use_averages:
        # Thinc's defaults in torch: clip the global gradient norm, step, then keep an
        # exponential moving average of the weights with Thinc's avg_keep schedule.
        clip = spec.grad_clip
        detached = [p.detach() for p in params]
        avgs = [d.clone() for d in detached] if spec.use_averages else []
        t = [0]

        def step() -> None:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()
            if avgs:
                t[0] += 1
                keep = min((1 + t[0]) / (10 + t[0]), 0.9999)
                torch._foreach_lerp_(avgs, detached, 1.0 - keep)

        variant += "+clip" * (clip > 0) + "+avg" * bool(avgs)
    step_fn = torch.no_grad()(step)
    step_fn.variant = variant  # type: ignore[attr-defined]
    return step_fn


class NumpyOptimizer:
    """The textbook update in plain in-place NumPy (CuPy on GPU): a pass per operation,
    with a scratch array per key so nothing is allocated after a key's first update."""

    def __init__(self, xp: Any, spec: Spec) -> None:
        self.xp = xp
        self.spec = spec
        self.state: Dict[Any, list] = {}
        self.b1, self.b2, self.eps = 0.9, 0.999, 1e-8

    def __call__(self, key: Any, w: Any, g: Any) -> None:
        xp, spec = self.xp, self.spec
        st = self.state.get(key)
        if st is None:
            zeros = partial(xp.zeros_like, w)
            st = self.state[key] = [0, zeros(), zeros(), zeros(), w.copy()]
        st[0] += 1
        t, m, v, tmp, avg = st
        if spec.clips:
            norm = math.sqrt(float(xp.dot(g, g)))
            if norm >= spec.grad_clip:
                g *= spec.grad_clip / norm
        if spec.kind == "sgd":
            xp.multiply(g, LEARN_RATE, out=tmp)
            w -= tmp
        else:
            b1, b2 = self.b1, self.b2
            m *= b1
            xp.multiply(g, 1 - b1, out=tmp)
            m += tmp
            v *= b2
            xp.multiply(g, g, out=tmp)
            tmp *= 1 - b2
            v += tmp
            if spec.kind == "adam":
                lr, rectified = LEARN_RATE * math.sqrt(1 - b2**t) / (1 - b1**t), True
            else:
                rho_inf = 2 / (1 - b2) - 1
                rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
                rectified = rho_t >= 5
                if rectified:
                    lr = LEARN_RATE * math.sqrt(
                        (1 - b2**t) * (rho_t - 4) / (rho_inf - 4) * (rho_t - 2) / rho_t
                        * rho_inf / (rho_inf - 2)) / (1 - b1**t)
                else:
                    lr = LEARN_RATE / (1 - b1**t)
            if rectified:
                xp.sqrt(v, out=tmp)
                tmp += self.eps
                xp.divide(m, tmp, out=tmp)
                tmp *= lr
            else:
                xp.multiply(m, lr, out=tmp)
            w -= tmp
        g.fill(0)
        if spec.use_averages:
            keep = min((1 + t) / (10 + t), 0.9999)
            xp.subtract(avg, w, out=tmp)
            tmp *= 1 - keep
            avg -= tmp


def build_numpy(dev: Device, case: Case) -> Callable[[], Any]:
    opt = NumpyOptimizer(dev.xp, case.spec)
    ws, gs = _arrays(dev, case)
    triples = list(zip(case.keys, ws, gs))
    if len(triples) == 1:
        return partial(opt, *triples[0])

    def step() -> None:
        for key, w, g in triples:
            opt(key, w, g)

    return step


def build_roofline(dev: Device, case: Case) -> Callable[[int], Any]:
    k = case.spec.n_arrays
    tensors = [[dev.filled(s, case.dtype, 0.5 + j) for j in range(k)] for s in case.sizes]
    return dev.roofline(tensors, read_index=1 if case.spec.clips else None)


PEER_IMPORTS = {"thinc": "thinc.api", "torch": "torch", "numpy": "numpy"}
PEER_HINTS = {"thinc": "pip install thinc", "torch": "pip install torch"}


def peer_missing(peer: str) -> Optional[str]:
    """Why a peer cannot run (None if it can)."""
    try:
        __import__(PEER_IMPORTS[peer])
    except ImportError as err:
        hint = PEER_HINTS.get(peer)
        return f"not installed ({err})" + (f"; {hint}" if hint else "")
    return None


# ---------------------------------------------------------------------------------------
# Timing


def _loop(step: Callable[[], Any]) -> Callable[[int], None]:
    def block(number: int) -> None:
        for _ in _repeat(None, number):
            step()

    return block


CLOCKS = ("auto", "cpu", "wall")


def _time_block(block: Callable[[int], Any], number: int,
                sync: Callable[[], None]) -> Tuple[float, float]:
    """(wall, thread CPU) seconds per update over a block of `number` updates."""
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    block(number)
    sync()
    t1 = time.perf_counter_ns()
    c1 = time.thread_time_ns()
    return (t1 - t0) / number / 1e9, (c1 - c0) / number / 1e9


def measure(blocks: Dict[str, Callable[[int], Any]], repeats: int, min_block_s: float,
            sync: Callable[[], None], clock: str = "wall",
            warmup: int = 2) -> Dict[str, dict]:
    """Median seconds per update of each block, sampled interleaved.

    clock "cpu" reports this thread's CPU time (time.thread_time_ns): on a shared machine
    it leaves out the time the OS gave our core to someone else, which wall-clock medians
    of multi-millisecond samples do not. Both clocks are recorded.
    """
    numbers = {}
    for name, block in blocks.items():
        for _ in range(warmup):
            block(1)
        sync()
        once = _time_block(block, 1, sync)[0]
        numbers[name] = 1 if once >= min_block_s else min(
            10**6, math.ceil(min_block_s / max(once, 1e-9)))
    wall: Dict[str, List[float]] = {name: [] for name in blocks}
    cpu: Dict[str, List[float]] = {name: [] for name in blocks}
    for _ in range(repeats):
        for name, block in blocks.items():
            w, c = _time_block(block, numbers[name], sync)
            wall[name].append(w)
            cpu[name].append(c)
    out = {}
    for name in blocks:
        # Thread CPU time can read 0 for a block shorter than its tick on some systems.
        use_cpu = clock == "cpu" and min(cpu[name]) > 0
        samples = cpu[name] if use_cpu else wall[name]
        out[name] = {"time_s": statistics.median(samples), "times_s": samples,
                     "wall_time_s": statistics.median(wall[name]),
                     "clock": "cpu" if use_cpu else "wall", "number": numbers[name]}
    return out


# ---------------------------------------------------------------------------------------
# The run


def _cases(cfg: Config) -> List[Case]:
    cases = []
    if cfg.overhead:
        for name in cfg.optimizers:
            cases.append(Case(SPECS[name], cfg.dtypes[0], OVERHEAD_PARAMS, "one",
                              [OVERHEAD_PARAMS], section="overhead"))
    for name in cfg.optimizers:
        for dtype in cfg.dtypes:
            for n in cfg.sizes:
                for layout in cfg.layouts:
                    if layout == "one":
                        sizes = [n]
                    else:
                        count = cfg.n_tensors(n, layout)
                        if count < 10:
                            continue
                        sizes = [cfg.tensor_size] * count
                        sizes[-1] += n - cfg.tensor_size * count
                    cases.append(Case(SPECS[name], dtype, n, layout, sizes))
    return cases


def _threadpool_limits(threads: int) -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads)


def machine_info(dev: Device, cfg: Config) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "device": dev.name,
        "processor": dev.describe(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import optim

        info["optim"] = getattr(optim, "__version__", None)
    except ImportError:
        info["optim"] = None
    for peer, module in (("thinc", "thinc"), ("torch", "torch")):
        if peer in cfg.compare and module in sys.modules:
            info[peer] = getattr(sys.modules[module], "__version__", None)
    return info


def run(cfg: Config) -> Dict[str, Any]:
    """Run the bench; returns the result dict (what ``--json`` writes)."""
    dev = get_device(cfg.device)
    try:
        import optim  # noqa: F401
        for cls in ("SGD", "Adam", "RAdam"):
            getattr(optim, cls)
    except (ImportError, AttributeError) as err:
        raise NotReady(f"optim's core is not importable ({err}); build it first: "
                           "python setup.py build_ext --inplace") from err

    skipped: List[Dict[str, str]] = []
    peers = []
    for peer in cfg.compare:
        why = peer_missing(peer)
        if why:
            skipped.append({"impl": peer, "reason": why})
        else:
            peers.append(peer)
    builders: Dict[str, Callable[[Device, Case], Callable]] = {"optim": build_optim}
    for peer in peers:
        builders[peer] = {"thinc": build_thinc, "numpy": build_numpy,
                          "torch": partial(build_torch, threads=cfg.threads)}[peer]

    cases = _cases(cfg)
    results: List[Dict[str, Any]] = []
    limits = _threadpool_limits(cfg.threads)
    started = time.perf_counter()
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), file=sys.stderr, unit="config", leave=False,
                   dynamic_ncols=True, disable=None if cfg.progress else True)
        try:
            for case in cases:
                bar.set_description(
                    f"{case.spec.name} {case.dtype} {_fmt_count(case.n)} {case.layout}")
                results.extend(_run_case(dev, cfg, case, builders, skipped))
                gc.collect()
                bar.update(1)
        finally:
            bar.close()
    finally:
        if limits is not None:
            limits.unregister()
    return {
        "schema_version": SCHEMA_VERSION,
        "command": PROG,
        "config": {
            "optimizers": cfg.optimizers, "sizes": cfg.sizes, "dtypes": cfg.dtypes,
            "layouts": cfg.layouts, "tensor_size": cfg.tensor_size,
            "repeats": cfg.repeats, "threads": cfg.threads, "device": cfg.device,
            "compare": cfg.compare, "quick": cfg.quick, "min_block_s": cfg.min_block_s,
            "clock": cfg.resolved_clock,
        },
        "machine": machine_info(dev, cfg),
        "bytes_model": BYTES_MODEL,
        "gradient": "zeros",
        "notes": notes(cfg),
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - started,
        "results": results,
    }


def _run_case(dev: Device, cfg: Config, case: Case, builders: Dict[str, Callable],
              skipped: List[Dict[str, str]]) -> List[Dict[str, Any]]:
    blocks: Dict[str, Callable[[int], Any]] = {}
    variants: Dict[str, str] = {}
    for impl, build in builders.items():
        try:
            step = build(dev, case)
            step()  # fail here, not in the timing loop
        except Exception as err:
            if impl == "optim" and not isinstance(err, Skip):
                raise
            skipped.append({"impl": impl, "optimizer": case.spec.name, "dtype": case.dtype,
                            "n_params": case.n, "layout": case.layout,
                            "reason": f"{type(err).__name__}: {err}"
                            if not isinstance(err, Skip) else str(err)})
            continue
        variants[impl] = getattr(step, "variant", "")
        blocks[impl] = _loop(step)
    if not blocks:
        return []
    blocks["roofline"] = build_roofline(dev, case)
    timed = measure(blocks, cfg.repeats_for(case.n), cfg.min_block_s, dev.sync,
                    clock=cfg.resolved_clock)
    itemsize = numpy.dtype(case.dtype).itemsize
    bpp = case.spec.bytes_per_param(itemsize)
    roof = timed.pop("roofline")
    ours = timed.get("optim", {}).get("time_s")
    rows = []
    for impl, t in timed.items():
        secs = t["time_s"]
        rows.append({
            "section": case.section,
            "optimizer": case.spec.name,
            "label": case.spec.label,
            "dtype": case.dtype,
            "n_params": case.n,
            "layout": case.layout,
            "n_tensors": len(case.sizes),
            "impl": impl,
            "variant": variants.get(impl, ""),
            "time_s": secs,
            "times_s": t["times_s"],
            "wall_time_s": t["wall_time_s"],
            "clock": t["clock"],
            "calls_per_sample": t["number"],
            "params_per_s": case.n / secs,
            "bytes_per_param": bpp,
            "gb_per_s": case.n * bpp / secs / 1e9,
            "roofline_s": roof["time_s"],
            "roofline_times_s": roof["times_s"],
            "ratio": roof["time_s"] / secs,
            "optim_speedup": secs / ours if ours else None,
        })
    return rows


def notes(cfg: Config) -> List[str]:
    return [
        f"time/update: median of the samples; each sample times back-to-back updates "
        f"(at least {cfg.min_block_s * 1e3:g} ms or one update) after warm-up updates; "
        "all implementations of a configuration are sampled interleaved. Clock: "
        + ("this thread's CPU time (time.thread_time_ns: leaves out time the OS gave "
           "the core to other processes; wall-clock medians are in the JSON)."
           if cfg.resolved_clock == "cpu" else "wall (time.perf_counter_ns)."),
        "gradients: zeros, allocated once, never refilled (each update zeroes its "
        "gradient anyway; arithmetic on zeros costs the same on CPU, and the moments "
        "stay exactly 0, so no denormals). Thinc and NumPy skip the clip multiply when "
        "the norm is below grad_clip, which zero gradients always are.",
        "roofline: optim._roofline on arrays of the same number, sizes and dtype as the "
        "update (same bytes, read and written once; + one read of g when clipping), "
        "one thread; ratio = roofline / time (1.0 = at the speed of memory).",
        "optim x: how many times faster optim is than that implementation "
        "(its time / optim's time).",
        f"layout many: tensors of {cfg.tensor_size} parameters; optim updates them in "
        "one step_many call, torch in one step over a parameter list, Thinc and NumPy "
        "in a Python loop.",
        "overhead rows: one update of 8 float parameters, lean unless the optimizer is "
        "adam-thinc: per-call cost, not memory.",
        f"threads: {cfg.threads} for the peers; optim and the roofline use one thread.",
        BYTES_MODEL,
    ]


# ---------------------------------------------------------------------------------------
# Output


def _fmt_count(n: int) -> str:
    if n >= 1000:
        e = int(round(math.log10(n)))
        if 10**e == n:
            return f"1e{e}"
    return f"{n:,}" if n >= 10**4 else str(n)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _fmt_si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
    if x >= 9.95:
        return f"{x:.0f}"
    return f"{x:.2f}" if x >= 0.095 else f"{x:.2g}"


def _impl_name(row: Dict[str, Any]) -> str:
    return row["impl"] + (f" ({row['variant']})" if row.get("variant") else "")


COLUMNS = ("optimizer", "dtype", "params", "layout", "impl", "time/update", "params/s",
           "GB/s", "B/param", "roofline", "ratio", "optim x")


def table_rows(rows: List[Dict[str, Any]]) -> List[Tuple[str, ...]]:
    out = []
    for r in rows:
        layout = r["layout"] if r["n_tensors"] == 1 else f"{r['n_tensors']}x{_fmt_count(r['n_params'] // r['n_tensors'])}"
        speedup = r.get("optim_speedup")
        out.append((
            r["label"], r["dtype"], _fmt_count(r["n_params"]), layout, _impl_name(r),
            _fmt_time(r["time_s"]), _fmt_si(r["params_per_s"]), f"{r['gb_per_s']:.3g}",
            str(r["bytes_per_param"]), _fmt_time(r["roofline_s"]), _fmt_ratio(r["ratio"]),
            "" if r["impl"] == "optim" or speedup is None else _fmt_ratio(speedup) + "x",
        ))
    return out


def format_table(rows: List[Dict[str, Any]], group_by: Sequence[str] = ("optimizer", "dtype")) -> str:
    body = table_rows(rows)
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(COLUMNS)]
    right = {5, 6, 7, 8, 9, 10, 11}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(COLUMNS), line(["-" * w for w in widths])]
    previous = None
    for r, b in zip(rows, body):
        group = tuple(r[k] for k in group_by)
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append(line(b))
    return "\n".join(lines)


def format_report(result: Dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    head = (f"{PROG} | optim {m.get('optim') or '?'} | {m['device']}: {m['processor']}, "
            f"{m['cpu_count']} CPUs | threads {cfg['threads']} | python {m['python']}, "
            f"numpy {m['numpy']}"
            + "".join(f", {p} {m[p]}" for p in ("thinc", "torch") if m.get(p)))
    parts = [head, ""]
    over = [r for r in result["results"] if r["section"] == "overhead"]
    main = [r for r in result["results"] if r["section"] != "overhead"]
    if over:
        parts += [f"Per-call overhead: one update of {OVERHEAD_PARAMS} parameters", "",
                  format_table(over, group_by=()), ""]
    if main:
        parts += ["Updates", "", format_table(main), ""]
    if result["skipped"]:
        parts.append("Skipped:")
        seen = set()
        for s in result["skipped"]:
            where = " ".join(str(s[k]) for k in ("optimizer", "dtype", "n_params", "layout")
                             if k in s)
            text = f"  {s['impl']}{' ' + where if where else ''}: {s['reason']}"
            if text not in seen:
                seen.add(text)
                parts.append(text)
        parts.append("")
    parts.append("Notes:")
    parts += [f"  - {n}" for n in result["notes"]]
    parts.append(f"  - elapsed: {result['elapsed_s']:.1f} s")
    return "\n".join(parts)


def write_json(result: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


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


if __name__ == "__main__":
    sys.exit(main())
