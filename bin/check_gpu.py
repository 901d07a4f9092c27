#!/usr/bin/env python
"""Check optim's GPU kernels on a real GPU against the CPU (Cython) kernels.

For every kernel (sgd / adam / radam rectified and un-rectified, with averages and
lookahead sync on and off) and float32 / float64, this runs one update on the same
random arrays with the same per-call scalars on the device and on the host, prints the
largest difference (absolute, and in units of the float's epsilon times the array's
magnitude), and times an update on each side. It also checks and times the
sum-of-squares reduction used for gradient clipping.

    pip install "optim[cuda12x]"      # or cuda11x / cuda13x
    python bin/check_gpu.py [--size 4194304] [--repeat 50]

`--fake` runs the same checks with the CUDA kernels executed on the CPU by the tests'
g++ harness (tests/cuda_harness.py): a dry run of this script on a machine without a GPU.
Exit status 1 when any difference exceeds --tolerance (in eps units).
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Tuple

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optim import _kernels  # noqa: E402
from optim import _kernels_cuda as kc  # noqa: E402


class Device:
    """What the check needs from a device: a backend, moves, and a timer."""

    def __init__(self, fake: bool) -> None:
        if fake:
            sys.path.insert(0, str(ROOT / "tests"))
            import cuda_harness

            self.backend: Any = cuda_harness.HarnessBackend()
            self.name = "CPU harness (g++), --fake"
            self.sync: Callable[[], None] = lambda: None
            return
        cupy = kc._import_cupy()
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise SystemExit("no CUDA device visible to CuPy")
        self.backend = kc.CupyBackend()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = f"{props['name'].decode()} (CuPy {cupy.__version__})"
        self.sync = cupy.cuda.get_current_stream().synchronize

    def timed(self, fn: Callable[[], Any], repeat: int) -> float:
        """Seconds per call, after a warm-up call (which compiles the kernel)."""
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeat


def hyper_for(name: str) -> Tuple[Any, int]:
    """Hyperparameters and update count t that select kernel `name`."""
    base = name[len("optim_"):].replace("_avg", "").replace("_la", "")
    h = _kernels.Hyper()
    h.learn_rate, h.eps, h.L2, h.grad_clip = 0.001, 1e-8, 1e-4, 0.0
    h.beta1, h.beta2 = (0.0, 0.0) if base == "sgd" else (0.9, 0.999)
    h.use_radam = base.startswith("radam")
    h.weight_decay = 0.01 if h.use_radam else 0.0
    h.lookahead_k, h.lookahead_alpha = (1 if name.endswith("_la") else 0), 0.5
    t = 1 if base == "radam_unrect" else 100
    return h, t


def check_kernel(dev: Device, name: str, dtype: Any, size: int, repeat: int
                 ) -> Tuple[float, float, float, float]:
    """(max abs error, error in eps * magnitude, device s/update, host s/update)."""
    spec = kc.KERNELS[name]
    hyper, t = hyper_for(name)
    rng = numpy.random.default_rng(0)
    host = {a: rng.standard_normal(size).astype(dtype) for a in spec.arrays}
    if "v" in host:
        host["v"] = host["v"] ** 2
    dev_arrays = {a: dev.backend.from_host(x) for a, x in host.items()}
    coefs = _kernels.coefs(hyper, t, 1.0)
    kind = coefs["kind"]
    assert kc.kernel_name(kind, coefs["rectified"], "avg" in host, coefs["lookahead_sync"]
                          ) == name
    args = [host.get(a) for a in ("w", "g", "m", "v", "avg", "slow")]
    dargs = [dev_arrays.get(a) for a in ("w", "g", "m", "v", "avg", "slow")]

    _kernels.step(hyper, "check", *args, t, 1.0)
    dev.backend.update(kind, coefs, *dargs)
    dev.sync()
    err = rel = 0.0
    eps = float(numpy.finfo(dtype).eps)
    for a in spec.arrays:
        got = dev.backend.to_host(dev_arrays[a]).astype(numpy.float64)
        want = host[a].astype(numpy.float64)
        diff = float(numpy.abs(got - want).max())
        err = max(err, diff)
        rel = max(rel, diff / (eps * max(float(numpy.abs(want).max()), 1e-300)))
    t_dev = dev.timed(lambda: dev.backend.update(kind, coefs, *dargs), repeat)
    t_host = Device.timed(dev, lambda: _kernels.step(hyper, "check", *args, t, 1.0),
                          max(1, repeat // 10))
    return err, rel, t_dev, t_host


def check_reduction(dev: Device, dtype: Any, size: int, repeat: int
                    ) -> Tuple[float, float, float]:
    """(relative error vs a float64 NumPy sum, device s/call, host s/call)."""
    rng = numpy.random.default_rng(1)
    g, w = (rng.standard_normal(size).astype(dtype) for _ in range(2))
    dg, dw = dev.backend.from_host(g), dev.backend.from_host(w)
    terms = (g + dtype(1e-4) * w).astype(numpy.float64)
    want = float((terms * terms).sum())
    got = dev.backend.sum_squares(dg, dw, 1e-4)
    t_dev = dev.timed(lambda: dev.backend.sum_squares(dg, dw, 1e-4), repeat)
    start = time.perf_counter()
    (terms * terms).sum()
    return abs(got - want) / want, t_dev, time.perf_counter() - start


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 22, help="elements per array")
    parser.add_argument("--repeat", type=int, default=50, help="timed updates per kernel")
    parser.add_argument("--tolerance", type=float, default=4.0,
                        help="max allowed error, in eps * max|array| (default 4)")
    parser.add_argument("--fake", action="store_true",
                        help="run the kernels in the CPU harness instead of on a GPU")
    opts = parser.parse_args(argv)
    try:
        dev = Device(opts.fake)
    except ImportError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"device: {dev.name}; {opts.size} elements per array")
    header = (f"{'kernel':<26}{'dtype':<9}{'max abs err':>13}{'err/eps':>9}"
              f"{'device us':>11}{'host us':>11}{'GB/s':>8}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for dtype in (numpy.float32, numpy.float64):
        itemsize = numpy.dtype(dtype).itemsize
        for name in kc.KERNELS:
            err, rel, t_dev, t_host = check_kernel(dev, name, dtype, opts.size, opts.repeat)
            worst = max(worst, rel)
            moved = 2 * len(kc.KERNELS[name].arrays) * itemsize * opts.size
            print(f"{name:<26}{numpy.dtype(dtype).name:<9}{err:>13.3g}{rel:>9.2f}"
                  f"{t_dev * 1e6:>11.1f}{t_host * 1e6:>11.1f}{moved / t_dev / 1e9:>8.1f}")
        rerr, t_dev, t_host = check_reduction(dev, dtype, opts.size, opts.repeat)
        print(f"{kc.REDUCTION.name:<26}{numpy.dtype(dtype).name:<9}{rerr:>13.3g}{'(rel)':>9}"
              f"{t_dev * 1e6:>11.1f}{t_host * 1e6:>11.1f}"
              f"{2 * itemsize * opts.size / t_dev / 1e9:>8.1f}")
        if rerr > 1e-10:
            worst = max(worst, float("inf"))
    ok = worst <= opts.tolerance
    print(f"\n{'OK' if ok else 'FAIL'}: worst error {worst:.2f} eps * max|array| "
          f"(tolerance {opts.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
