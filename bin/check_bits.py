#!/usr/bin/env python
"""Fixed, seeded optimizer runs that print one SHA-256 each: compare them across machines.

Each case builds an optimizer, updates four tensors for `--steps` steps from the same
inputs on every platform (1, 7 and 1000 elements every step; 100003 elements, split
across threads, every 16th step: qemu-user emulates floating point at ~250 ns an element,
~80x native, and this keeps an emulated run near a minute), and hashes the final weights
together with the optimizer's state (step, learning rate, per-key update counts, first
and second moments, averages) as bytes.
Cases: Adam with Thinc's defaults (clipping, averages), lean Adam, Adam with decoupled
L2 and a `compounding` learning rate, RAdam, SGD with coupled L2, SGD with a `decaying`
learning rate; each in float32 and float64, updated per call (`opt(key, w, g)`) and
through `opt.step_many`. Case `libm_pow` hashes `math.pow(b, t)` for the betas and the
compounding factor at t = 1..20000: it tells a libm difference from an optim one.

Every run is done once per thread count in `--threads` (default 1,2); the hashes must
agree (exit 1 otherwise). Two machines agree when their outputs do:

    python bin/check_bits.py [--steps 1200] [--threads 1,2] [--json]
    python bin/check_bits.py --save-state DIR --steps N   # N steps, then save each case
    python bin/check_bits.py --resume DIR --steps M       # load, M more: equals N+M straight

The default 1200 steps pass t = 482 and 1189, where glibc's pow(0.999, t) is known to
differ between x86-64 CPUs with and without FMA. Inputs come from
`numpy.random.default_rng(seed).random` (53 random bits scaled: no libm) in float64 and
are cast to the case's dtype, so they are the same bits everywhere.
Imports only optim, NumPy and the standard library (bin/check_arm64.sh runs it under qemu).
"""
import argparse
import hashlib
import json
import math
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy

import optim

SIZES = (1, 7, 1000, 100003)
BIG_EVERY = 16  # the last (split) tensor is updated on steps 0, 16, 32, ...
POOL = 8  # gradients per tensor, used in turn
SCALES = (0.01, 0.1, 1.0, 10.0)  # gradient magnitudes: clipping on some steps, not others
KINDS: Dict[str, Callable[[], optim.Optimizer]] = {
    "adam": lambda: optim.Adam(0.001),
    "adam_lean": lambda: optim.Adam(0.001, grad_clip=0.0, use_averages=False),
    "adam_l2_compounding": lambda: optim.Adam(optim.compounding(1e-4, 1e-2, 1.001), L2=0.01),
    "radam": lambda: optim.RAdam(0.001, weight_decay=0.01),
    "sgd_l2": lambda: optim.SGD(0.01, L2=1e-4, L2_is_weight_decay=False, use_averages=False),
    "sgd_decaying": lambda: optim.SGD(optim.decaying(0.1, 1e-3), L2=1e-4),
}
DTYPES = {"f32": numpy.float32, "f64": numpy.float64}
MODES = ("call", "many")
KEYS = [(i + 1, "W") for i in range(len(SIZES))]  # Thinc's (model id, name) keys


def case_names() -> List[str]:
    return [f"{kind}.{dt}.{mode}" for kind in KINDS for dt in DTYPES for mode in MODES]


def inputs(dtype: Any, seed: int) -> Tuple[List[numpy.ndarray], List[List[numpy.ndarray]]]:
    """Initial weights and each tensor's gradient pool: float64 from `rng.random`, cast."""
    rng = numpy.random.default_rng(seed)
    weights, pools = [], []
    for size in SIZES:
        weights.append((rng.random(size) - 0.5).astype(dtype))
        pools.append([((rng.random(size) * 2.0 - 1.0) * SCALES[k % len(SCALES)]).astype(dtype)
                      for k in range(POOL)])
    return weights, pools


def state_hash(opt: optim.Optimizer, weights: List[numpy.ndarray]) -> str:
    """SHA-256 of the weights and the optimizer's state, in key order."""
    h = hashlib.sha256(struct.pack("<qd", opt.step, opt.learn_rate))
    averages = opt.averages or {}
    for key, w in zip(KEYS, weights):
        h.update(repr(key).encode() + struct.pack("<q", opt.nr_update.get(key, -1)))
        for array in (w, opt.mom1.get(key), opt.mom2.get(key), averages.get(key)):
            if array is None:
                h.update(b"-")
            else:
                array = numpy.ascontiguousarray(array)
                h.update(f"{array.dtype.str}{array.shape}".encode() + array.tobytes())
    return h.hexdigest()


def run(case: str, steps: int, seed: int, opt: Any = None, weights: Any = None,
        ) -> Tuple[optim.Optimizer, List[numpy.ndarray]]:
    """`steps` more updates of `case` (from scratch, or from a loaded `opt` and `weights`)."""
    kind, dt, mode = case.split(".")
    start_weights, pools = inputs(DTYPES[dt], seed)
    opt = KINDS[kind]() if opt is None else opt
    weights = start_weights if weights is None else weights
    grads = [numpy.empty_like(w) for w in weights]
    for t in range(opt.step, opt.step + steps):
        active = len(SIZES) if t % BIG_EVERY == 0 else len(SIZES) - 1
        for i, g in enumerate(grads[:active]):  # the optimizer zeroes each gradient it takes
            numpy.copyto(g, pools[i][(3 * t + i) % POOL])
        if mode == "many":
            opt.step_many(KEYS[:active], weights[:active], grads[:active])
        else:
            for key, w, g in zip(KEYS[:active], weights[:active], grads[:active]):
                opt(key, w, g)
        opt.step_schedules()
    return opt, weights


def libm_pow_hash() -> str:
    h = hashlib.sha256()
    for base in (0.9, 0.999, 1.001):
        h.update(struct.pack("<20000d", *(math.pow(base, t) for t in range(1, 20001))))
    return h.hexdigest()


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(directory: Path, case: str, opt: optim.Optimizer, weights: List[numpy.ndarray]) -> None:
    folder = directory / case
    folder.mkdir(parents=True, exist_ok=True)
    opt.to_disk(folder / "optimizer.bin")
    for i, w in enumerate(weights):
        write_atomic(folder / f"w{i}.npy", lambda f, w=w: numpy.save(f, w, allow_pickle=False))


def load(directory: Path, case: str) -> Tuple[optim.Optimizer, List[numpy.ndarray]]:
    folder = directory / case
    weights = [numpy.load(folder / f"w{i}.npy", allow_pickle=False) for i in range(len(SIZES))]
    return optim.load(folder / "optimizer.bin"), weights


def hashes(args: argparse.Namespace, threads: int) -> Dict[str, str]:
    """Every case at `threads` threads: from scratch, saved (--save-state) or resumed."""
    optim.set_num_threads(threads)
    out = {}
    for case in args.cases:
        loaded = load(args.resume, case) if args.resume else (None, None)
        opt, weights = run(case, args.steps, args.seed, *loaded)
        if args.save_state and threads == args.threads[0]:
            save(args.save_state, case, opt, weights)
        out[case] = state_hash(opt, weights)
    out["libm_pow"] = libm_pow_hash()
    return out


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="updates to run (default 1200)")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases")
    parser.add_argument("--json", action="store_true", help="print {case: hash} as JSON")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--save-state", type=Path, metavar="DIR")
    mode.add_argument("--resume", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    args.threads = [int(n) for n in args.threads.split(",")]
    args.cases = args.cases.split(",") if args.cases else case_names()
    unknown = sorted(set(args.cases) - set(case_names()))
    if unknown or args.steps < 0:
        parser.error(f"unknown cases {unknown}" if unknown else "--steps must be >= 0")
    meta_path = (args.save_state or args.resume or Path()) / "meta.json"
    if args.resume:
        meta = json.loads(meta_path.read_text())
        if meta["seed"] != args.seed or not set(args.cases) <= set(meta["cases"]):
            parser.error(f"{meta_path} holds seed {meta['seed']} and cases {meta['cases']}")
    if args.save_state:
        args.save_state.mkdir(parents=True, exist_ok=True)
    config = optim.cpu.config()
    print(f"optim {optim.__version__} on {platform.machine()}, SIMD {config['isa']}, NumPy "
          f"{numpy.__version__}, Python {platform.python_version()}; {args.steps} steps"
          + (f" after {meta['steps']} resumed from {args.resume}" if args.resume else ""),
          file=sys.stderr)
    results = {}
    for threads in args.threads:
        began = time.perf_counter()
        results[threads] = hashes(args, threads)
        print(f"threads {threads}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    if args.save_state:
        body = {"steps": args.steps, "seed": args.seed, "cases": args.cases}
        write_atomic(meta_path, lambda f: f.write(json.dumps(body).encode()))
    first = results[args.threads[0]]
    differ = [case for case in first if len({r[case] for r in results.values()}) > 1]
    if args.json:
        print(json.dumps(first, indent=1, sort_keys=True))
    else:
        for case, digest in first.items():
            print(f"{case:28s} {digest}")
    for case in differ:
        print(f"MISMATCH between thread counts: {case}: "
              + ", ".join(f"{n}: {r[case]}" for n, r in results.items()), file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
