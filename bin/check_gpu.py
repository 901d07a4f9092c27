#!/usr/bin/env python
"""Check optim's GPU kernels on a real GPU against the CPU (Cython) kernels.

For every update kernel (sgd / adam / radam rectified and un-rectified, with averages
and lookahead sync on and off) and float32 / float64, this runs one clipped update on
the same random arrays on the device (the clip norm kernel, then the update: the
optimizer's own launch path) and on the host, prints the largest difference (absolute,
and in units of the float's epsilon times the array's magnitude; 0 is expected: the
two are bitwise equal) and times an update on each side. Then:

* `optim_clip_norm`: the device clip factor against the CPU's (bitwise), and its speed;
* `step_many`: many tensors of mixed sizes in one launch per group (+ the norm) against
  the CPU's step_many, bitwise;
* `host reads`: no update reads anything back from the device (CuPy's device-to-host
  copies are counted while updates run);
* `stream`: updates launched under `cupy.cuda.ExternalStream(<torch's current stream>)`
  are ordered after torch's work on that stream (needs torch with CUDA; skipped
  otherwise);
* `graph`: a clipped update captured in a CUDA graph and replayed gives the same bits
  (nothing in an update synchronises);
* `groups`: one step_many launch whose tensors each have their own Hyper (learning
  rate, betas, eps, L2, grad_clip, decay; SGD, Adam and RAdam rows; frozen rows)
  against the CPU kernels with each tensor's Hyper, bitwise;
* `skip`: Adam with clipping and averages in nonfinite="skip" mode, per call and
  step_many, a NaN and an inf put in two gradients: bitwise the run without those two
  calls, and after sync() the update and skip counts; `raise`: nothing written;
* concurrency (bin/check_gpu_concurrency.py): two host threads on per-thread default
  streams doing clipped updates at once; a graph captured, a key with more chunks
  updated eagerly, the graph replayed; a disturbed clip-norm ticket followed by
  updates: each the CPU's bits.

    pip install "thinc-optim[cuda12x]"      # or cuda11x / cuda13x
    python bin/check_gpu.py [--size 4194304] [--repeat 50]

`--fake` runs the same checks with the CUDA source executed on the CPU by the tests'
harness (tests/fake_cupy.py: the real CupyBackend on an emulated device): a dry run
of this script on a machine without a GPU. Exit status 1 when any check fails.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy

ROOT = Path(__file__).resolve().parents[1]
try:  # the installed optim (a wheel, or a checkout's editable install)
    import optim  # noqa: F401
except ImportError:  # a checkout built in place but not installed; never ahead of a wheel
    sys.path.insert(0, str(ROOT))

from optim import _kernels  # noqa: E402
from optim import _kernels_cuda as kc  # noqa: E402
from optim.cuda import cupy as cupy_backend  # noqa: E402
from optim.cuda.workspace import Workspace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_gpu_concurrency  # noqa: E402

STATE = ("w", "g", "m", "v", "avg", "slow")


class Device:
    """What the check needs from a device: a backend, moves, and a timer."""

    def __init__(self, fake: bool) -> None:
        self.fake = fake
        if fake:
            sys.path.insert(0, str(ROOT / "tests"))
            import fake_cupy

            self.backend: Any = fake_cupy.HarnessBackend()
            self.name = "CPU harness (g++, emulated warps), --fake"
            self.sync: Callable[[], None] = lambda: None
            return
        cupy = cupy_backend._import_cupy()
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise SystemExit("no CUDA device visible to CuPy")
        self.backend = cupy_backend.CupyBackend()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = f"{props['name'].decode()} (CuPy {cupy.__version__})"
        self.sync = lambda: cupy.cuda.get_current_stream().synchronize()

    @property
    def cupy(self) -> Any:
        return self.backend.cupy

    def timed(self, fn: Callable[[], Any], repeat: int) -> float:
        """Seconds per call, after a warm-up call (which compiles the kernel)."""
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeat


def hyper_for(name: str, grad_clip: float) -> Tuple[Any, int]:
    """Hyperparameters and update count t that select kernel `name`."""
    base = name[len("optim_"):].replace("_avg", "").replace("_la", "")
    h = _kernels.Hyper()
    h.learn_rate, h.eps, h.L2, h.grad_clip = 0.001, 1e-8, 1e-4, grad_clip
    h.L2_is_weight_decay = False  # coupled L2: the clip norm reads the weights too
    h.beta1, h.beta2 = (0.0, 0.0) if base == "sgd" else (0.9, 0.999)
    h.use_radam = base.startswith("radam")
    h.weight_decay = 0.01 if h.use_radam else 0.0
    h.lookahead_k, h.lookahead_alpha = (1 if name.endswith("_la") else 0), 0.5
    t = 1 if base == "radam_unrect" else 100
    return h, t


def kind_of(name: str) -> str:
    return name[len("optim_"):].split("_")[0]


def random_state(name: str, dtype: Any, size: int, seed: int) -> Dict[str, numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    host = {a: rng.standard_normal(size).astype(dtype) for a in kc.KERNELS[name].arrays}
    if "v" in host:
        host["v"] = host["v"] ** 2
    return host


def compare(dev: Device, got: Dict[str, Any], want: Dict[str, numpy.ndarray],
            dtype: Any) -> Tuple[float, float]:
    """(max abs difference, in eps * magnitude) over the arrays; NaNs must be at the
    same places (their payloads may differ: docs/numerics.md), else the error is inf."""
    err = rel = 0.0
    eps = float(numpy.finfo(dtype).eps)
    for a, x in want.items():
        host = dev.backend.to_host(got[a])
        nan = numpy.isnan(x)
        if not numpy.array_equal(numpy.isnan(host), nan):
            return float("inf"), float("inf")
        diff = float(numpy.abs(host[~nan].astype(numpy.float64)
                               - x[~nan].astype(numpy.float64)).max(initial=0.0))
        err = max(err, diff)
        rel = max(rel, diff / (eps * max(float(numpy.abs(x).max(initial=0.0)), 1e-300)))
    return err, rel


def plan_for(dev: Device, name: str, key: Any, arrays: Dict[str, Any]) -> Any:
    return dev.backend.plan(key, kind_of(name), "avg" in arrays, arrays["w"], arrays.get("m"),
                            arrays.get("v"), arrays.get("avg"), arrays.get("slow"))


def check_kernel(dev: Device, name: str, dtype: Any, size: int, repeat: int
                 ) -> Tuple[float, float, float, float]:
    """(max abs error, error in eps * magnitude, device s/update, host s/update) of one
    clipped update through the backend's launch path (norm + update)."""
    hyper, t = hyper_for(name, grad_clip=1.0)
    host = random_state(name, dtype, size, 0)
    arrays = {a: dev.backend.from_host(x) for a, x in host.items()}
    coefs = _kernels.coefs(hyper, t, 1.0)
    assert kc.kernel_name(coefs["kind"], coefs["rectified"], "avg" in host,
                          coefs["lookahead_sync"]) == name
    args = [host.get(a) for a in STATE]
    _kernels.step(hyper, "check", *args, t, 1.0)
    plan = plan_for(dev, name, "check", arrays)
    w, g = arrays["w"], arrays["g"]
    dev.backend.launch(plan, hyper, "check", w, g, t, 1.0)
    dev.sync()
    err, rel = compare(dev, arrays, host, dtype)
    t_dev = dev.timed(lambda: dev.backend.launch(plan, hyper, "check", w, g, t, 1.0), repeat)
    t_host = dev.timed(lambda: _kernels.step(hyper, "check", *args, t, 1.0),
                       max(1, repeat // 10))
    return err, rel, t_dev, t_host


def check_norm(dev: Device, dtype: Any, size: int, repeat: int) -> Tuple[bool, float, float]:
    """(device clip factors == CPU's, coupled L2 and l2 == 0; device s/call and host
    s/call with coupled L2)."""
    rng = numpy.random.default_rng(1)
    g, w = (rng.standard_normal(size).astype(dtype) for _ in range(2))
    dg, dw = dev.backend.from_host(g), dev.backend.from_host(w)
    want = _kernels.clip_scale(_kernels.clip_sum_squares(g, w, 1e-4), 1.0)
    ws = Workspace(dev.cupy, kc.n_chunks(size))
    norm = dev.backend.function(dtype, "optim_clip_norm")

    def launch() -> None:
        norm((kc.norm_grid(kc.n_chunks(size)),), (kc.BLOCK,),
             (dg, dw, 1e-4, 1.0, size, ws.partials, ws.tickets, ws.next_epoch(), ws.clip))

    launch()
    got = float(dev.backend.to_host(ws.clip)[0])
    t_dev = dev.timed(launch, repeat)
    t_host = dev.timed(lambda: _kernels.clip_sum_squares(g, w, 1e-4), max(1, repeat // 10))
    # l2 == 0: the terms are g alone, so weights full of NaN give the CPU's factor of g
    nan_w = dev.backend.from_host(numpy.full(size, numpy.nan, dtype=dtype))
    norm((kc.norm_grid(kc.n_chunks(size)),), (kc.BLOCK,),
         (dg, nan_w, 0.0, 1.0, size, ws.partials, ws.tickets, ws.next_epoch(), ws.clip))
    got_g = float(dev.backend.to_host(ws.clip)[0])
    want_g = _kernels.clip_scale(_kernels.clip_sum_squares(g, w, 0.0), 1.0)
    return got == want and got_g == want_g, t_dev, t_host


def check_step_many(dev: Device, dtype: Any, size: int, repeat: int
                    ) -> Tuple[float, float, float, int]:
    """step_many over tensors of mixed sizes (size split unevenly), Adam with Thinc's
    defaults: (error in eps units, device s/step, host s/step, tensors)."""
    import optim

    sizes = [max(1, size // 64 + (i * 997) % 5000) for i in range(48)]
    rng = numpy.random.default_rng(2)
    cpu, gpu = optim.Adam(0.001), optim.Adam(0.001)
    keys = list(range(len(sizes)))
    w_host = [rng.standard_normal(n).astype(dtype) for n in sizes]
    w_dev = [dev.backend.from_host(w) for w in w_host]
    worst = 0.0
    previous = optim.backends.set_gpu_backend(dev.backend)
    try:
        for _ in range(3):
            grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
            cpu.step_many(keys, w_host, [g.copy() for g in grads])
            gpu.step_many(keys, w_dev, [dev.backend.from_host(g) for g in grads])
            dev.sync()
            worst = max(worst, compare(dev, dict(enumerate(w_dev)), dict(enumerate(w_host)),
                                       dtype)[1])
        g_dev = [dev.backend.from_host(numpy.ones(n, dtype)) for n in sizes]
        g_host = [numpy.ones(n, dtype) for n in sizes]
        t_dev = dev.timed(lambda: gpu.step_many(keys, w_dev, g_dev), repeat)
        t_host = dev.timed(lambda: cpu.step_many(keys, w_host, g_host), max(1, repeat // 10))
    finally:
        optim.backends.set_gpu_backend(previous)
    return worst, t_dev, t_host, len(sizes)


def check_no_sync(dev: Device, dtype: Any) -> str:
    """A clipped per-call update and a clipped step_many must neither read from the
    device nor wait for it. Fake: host reads are counted. GPU: the updates are queued
    behind ~0.1 s of matrix products; enqueueing them must return long before those
    finish (any synchronisation or device-to-host copy would wait for them)."""
    import optim

    previous = optim.backends.set_gpu_backend(dev.backend)
    try:
        opt = optim.Adam(0.001)
        w = [dev.backend.from_host(numpy.ones(5000, dtype)) for _ in range(3)]
        g = [dev.backend.from_host(numpy.full(5000, 0.5, dtype)) for _ in range(3)]
        for i in range(3):  # first updates allocate state
            opt(i, w[i], g[i])
        opt.step_many([1, 2], w[1:], g[1:])  # builds the tables
        dev.sync()
        if dev.fake:
            before = dev.backend.moved_to_host
            opt(0, w[0], g[0])
            opt.step_many([1, 2], w[1:], g[1:])
            reads = dev.backend.moved_to_host - before
            return "ok (0 host reads)" if reads == 0 else f"FAIL: {reads} host reads"
        cupy = dev.cupy
        big = cupy.ones((4096, 4096), dtype=numpy.float32) / 4096
        busy_start = time.perf_counter()
        for _ in range(40):
            big = big @ big
        queued = time.perf_counter()
        opt(0, w[0], g[0])
        opt.step_many([1, 2], w[1:], g[1:])
        enqueued = time.perf_counter() - queued
        dev.sync()
        busy = time.perf_counter() - busy_start
        if enqueued < 0.5 * busy:
            return f"ok (queued in {enqueued * 1e6:.0f} us behind {busy * 1e3:.0f} ms of work)"
        return f"FAIL: the updates waited for the device ({enqueued * 1e3:.1f} ms)"
    finally:
        optim.backends.set_gpu_backend(previous)


def check_stream(dev: Device, dtype: Any) -> str:
    """Updates on torch's current (non-default) stream, queued behind torch work that
    writes the gradient, with no synchronisation in between: the result must be the
    CPU's. Returns 'ok', 'FAIL ...' or 'skipped ...'."""
    hyper, t = hyper_for("optim_adam_avg", grad_clip=1.0)
    host = random_state("optim_adam_avg", dtype, 1 << 20, 3)
    want = {a: x.copy() for a, x in host.items()}
    _kernels.step(hyper, "s", *[want.get(a) for a in STATE], t, 1.0)
    if dev.fake:
        cuda = dev.cupy.cuda
        arrays = {a: dev.backend.from_host(x) for a, x in host.items()}
        stream = cuda.ExternalStream(0x5EED0)
        with stream:
            plan = plan_for(dev, "optim_adam_avg", "s", arrays)
            before = len(dev.cupy.launches)
            dev.backend.launch(plan, hyper, "s", arrays["w"], arrays["g"], t, 1.0)
            used = {s for _, s in dev.cupy.launches[before:]}
        ok = used == {stream} and compare(dev, arrays, want, dtype)[0] == 0.0
        return "ok (fake stream)" if ok else "FAIL"
    try:
        import torch
    except ImportError:
        return "skipped (no torch)"
    if not torch.cuda.is_available():
        return "skipped (torch has no CUDA)"
    cupy = dev.cupy
    tdtype = torch.float32 if dtype == numpy.float32 else torch.float64
    tensors = {a: torch.from_numpy(x).cuda() for a, x in host.items()}
    g_source = tensors["g"].clone()
    tensors["g"].zero_()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        big = torch.full((4096, 4096), 1.0 / 4096, device="cuda", dtype=tdtype)
        for _ in range(20):  # ~ms of work queued before the gradient exists
            big = big @ big
        tensors["g"].add_(g_source + 0.0 * big[0, 0])
        arrays = {a: cupy.from_dlpack(x) for a, x in tensors.items()}
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            plan = plan_for(dev, "optim_adam_avg", "s", arrays)
            dev.backend.launch(plan, hyper, "s", arrays["w"], arrays["g"], t, 1.0)
        side.synchronize()
    got = {a: x.cpu().numpy() for a, x in tensors.items()}
    same = all(numpy.array_equal(got[a], want[a]) for a in want)
    return "ok (torch side stream)" if same else "FAIL: results differ (stream order?)"


def check_graph(dev: Device, dtype: Any) -> str:
    """Capture one clipped update in a CUDA graph, replay it once: the CPU's bits."""
    cupy = dev.cupy
    hyper, t = hyper_for("optim_radam_rect_avg", grad_clip=1.0)
    host = random_state("optim_radam_rect_avg", dtype, 1 << 20, 4)
    want = {a: x.copy() for a, x in host.items()}
    _kernels.step(hyper, "c", *[want.get(a) for a in STATE], t, 1.0)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        arrays = {a: dev.backend.from_host(x) for a, x in host.items()}
        plan = plan_for(dev, "optim_radam_rect_avg", "c", arrays)  # allocates, so not
        stream.synchronize()  # under capture: the key's scratch memory is made here
        try:
            stream.begin_capture()
            dev.backend.launch(plan, hyper, "c", arrays["w"], arrays["g"], t, 1.0)
            graph = stream.end_capture()
        except Exception as err:  # noqa: BLE001 - report whatever capture refused
            return f"FAIL: capture: {err}"
        graph.launch()
        stream.synchronize()
    err = compare(dev, arrays, want, dtype)[0]
    return "ok" if err == 0.0 else f"FAIL: max error {err:g}"


def check_groups(dev: Device, dtype: Any) -> str:
    """step_many's launch with a Hyper per tensor (every value different, three kinds,
    two frozen tensors) against the CPU kernels with each tensor's Hyper."""
    base = _kernels.Hyper()
    base.learn_rate, base.beta1, base.beta2, base.eps, base.grad_clip = 0.01, 0.9, 0.999, 1e-8, 1.0

    def varied(**values: Any) -> Any:
        h = base.copy()
        for name, value in values.items():
            setattr(h, name, value)
        return h

    hypers = [base, varied(learn_rate=0.003, beta1=0.8, beta2=0.99, eps=1e-6, grad_clip=0.5),
              varied(L2=0.01, grad_clip=0.0), varied(L2=0.02, L2_is_weight_decay=True),
              varied(beta1=0.0, beta2=0.0, learn_rate=0.1), varied(use_radam=True, beta2=0.9,
                                                                    weight_decay=0.01),
              varied(frozen=True), varied(beta1=0.0, beta2=0.0, frozen=True)]
    rng = numpy.random.default_rng(21)
    sizes = [300, 4097, 17, 2 * 4096 + 5, 5000, 700, 4096, 33]
    counts = [3, 1, 7, 2, 4, 8, 1, 1]
    host = [{a: rng.standard_normal(n).astype(dtype) for a in ("w", "g", "m", "v", "avg")}
            for n in sizes]
    for h in host:
        h["v"] = h["v"] ** 2
    arrays = [{a: dev.backend.from_host(x) for a, x in h.items()} for h in host]
    before = [{a: x.copy() for a, x in h.items()} for h in host]
    plans = [dev.backend.plan(("g", i), h.kind, True, d["w"], d["m"], d["v"], d["avg"], None,
                              frozen=h.frozen) for i, (h, d) in enumerate(zip(hypers, arrays))]
    dev.backend.launch_many({}, hypers, [("g", i) for i in range(len(sizes))],
                            [d["w"] for d in arrays], [d["g"] for d in arrays], plans, counts,
                            0.7)
    dev.sync()
    for i, (h, x, t) in enumerate(zip(hypers, host, counts)):
        if h.frozen:
            want = dict(before[i], g=numpy.zeros_like(x["g"]))
        else:
            _kernels.step(h, "g", x["w"], x["g"], x["m"], x["v"], x["avg"], None, t, 0.7)
            want = x
        if compare(dev, arrays[i], want, dtype)[0] != 0.0:
            return f"FAIL: tensor {i} ({h.kind}{', frozen' if h.frozen else ''}) differs"
    return f"ok ({len(sizes)} tensors, 3 kinds, 2 frozen: the CPU's bits)"


def check_skip(dev: Device, dtype: Any) -> str:
    """nonfinite="skip": a NaN and an inf in two calls leave the run that omitted them,
    per call and step_many; sync() brings the counts; no host read (fake: counted)."""
    import optim

    previous = optim.backends.set_gpu_backend(dev.backend)
    try:
        sizes = [4097, 300, 2 * 4096, 33]
        bad = {(2, 1): numpy.nan, (5, 2): numpy.inf}
        for how in ("call", "step_many"):
            rng = numpy.random.default_rng(22)
            cpu, gpu = optim.Adam(0.01), optim.Adam(0.01, nonfinite="skip")
            w_cpu = [rng.standard_normal(n).astype(dtype) for n in sizes]
            w_dev = [dev.backend.from_host(w) for w in w_cpu]
            reads = dev.backend.moved_to_host if dev.fake else 0
            for step in range(7):
                grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
                g_dev = []
                for k, g in enumerate(grads):
                    if (step, k) in bad:
                        g = g.copy()
                        g[n_half(g)] = bad[step, k]
                    else:
                        cpu(k, w_cpu[k], g.copy())
                    g_dev.append(dev.backend.from_host(g))
                if how == "call":
                    for k in range(len(sizes)):
                        gpu(k, w_dev[k], g_dev[k])
                else:
                    gpu.step_many(list(range(len(sizes))), w_dev, g_dev)
            if dev.fake and dev.backend.moved_to_host != reads:
                return f"FAIL: {how}: skip mode read from the device"
            dev.sync()
            for k in range(len(sizes)):
                want = {"w": w_cpu[k], "m": cpu.mom1[k], "v": cpu.mom2[k], "a": cpu.averages[k]}
                got = {"w": w_dev[k], "m": gpu.mom1[k], "v": gpu.mom2[k], "a": gpu.averages[k]}
                if compare(dev, got, want, dtype)[0] != 0.0:
                    return f"FAIL: {how}: key {k} differs from the run without the bad calls"
            if gpu.skipped != {1: 1, 2: 1} or dict(gpu.nr_update) != dict(cpu.nr_update):
                return f"FAIL: {how}: counts {dict(gpu.nr_update)}, skipped {gpu.skipped}"
        # raise mode: refused before anything is written
        gpu = optim.Adam(0.01, nonfinite="raise")
        w = dev.backend.from_host(numpy.ones(5000, dtype))
        gpu(0, w, dev.backend.from_host(numpy.full(5000, 0.5, dtype)))
        g = numpy.full(5000, 0.5, dtype)
        g[4999] = numpy.nan
        g_dev = dev.backend.from_host(g)
        w_before = dev.backend.to_host(w).copy()
        try:
            gpu.step_many([0], [w], [g_dev])
            return "FAIL: raise mode did not raise"
        except FloatingPointError:
            pass
        if not (numpy.array_equal(dev.backend.to_host(w), w_before)
                and numpy.isnan(dev.backend.to_host(g_dev)[4999])):
            return "FAIL: raise mode wrote"
        return "ok (per call and step_many: the run without the bad calls; raise wrote nothing)"
    finally:
        optim.backends.set_gpu_backend(previous)


def n_half(x: numpy.ndarray) -> int:
    return x.size // 2


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 22, help="elements per array")
    parser.add_argument("--repeat", type=int, default=50, help="timed updates per kernel")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="max allowed error, in eps * max|array| (default 0: bitwise)")
    parser.add_argument("--fake", action="store_true",
                        help="run the kernels in the CPU harness instead of on a GPU")
    opts = parser.parse_args(argv)
    try:
        dev = Device(opts.fake)
    except ImportError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"device: {dev.name}; {opts.size} elements per array; clipping on")
    header = (f"{'kernel':<28}{'dtype':<9}{'max abs err':>13}{'err/eps':>9}"
              f"{'device us':>11}{'host us':>11}{'GB/s':>8}")
    print(header)
    print("-" * len(header))
    worst, failures = 0.0, []
    for dtype in (numpy.float32, numpy.float64):
        itemsize = numpy.dtype(dtype).itemsize
        dname = numpy.dtype(dtype).name
        for name in kc.KERNELS:
            err, rel, t_dev, t_host = check_kernel(dev, name, dtype, opts.size, opts.repeat)
            worst = max(worst, rel)
            # the update reads and writes each array; the norm reads g and w again
            moved = (2 * len(kc.KERNELS[name].arrays) + 2) * itemsize * opts.size
            print(f"{name:<28}{dname:<9}{err:>13.3g}{rel:>9.2f}"
                  f"{t_dev * 1e6:>11.1f}{t_host * 1e6:>11.1f}{moved / t_dev / 1e9:>8.1f}")
        same, t_dev, t_host = check_norm(dev, dtype, opts.size, opts.repeat)
        print(f"{'optim_clip_norm':<28}{dname:<9}{'bitwise' if same else 'DIFFERS':>13}"
              f"{'':>9}{t_dev * 1e6:>11.1f}{t_host * 1e6:>11.1f}"
              f"{2 * itemsize * opts.size / t_dev / 1e9:>8.1f}")
        if not same:
            failures.append(f"optim_clip_norm {dname}")
        rel, t_dev, t_host, n = check_step_many(dev, dtype, opts.size, max(1, opts.repeat // 5))
        worst = max(worst, rel)
        print(f"{f'step_many ({n} tensors)':<28}{dname:<9}{'':>13}{rel:>9.2f}"
              f"{t_dev * 1e6:>11.1f}{t_host * 1e6:>11.1f}{'':>8}")
        checks = [("no sync, no host read", check_no_sync), ("stream", check_stream),
                  ("graph", check_graph), ("groups", check_groups),
                  ("skip (and raise)", check_skip), *check_gpu_concurrency.CHECKS]
        for what, check in checks:
            result = check(dev, dtype)
            print(f"{what:<28}{dname:<9}  {result}")
            if result.startswith("FAIL"):
                failures.append(f"{what} {dname}: {result}")
    if worst > opts.tolerance:
        failures.append(f"worst error {worst:.2f} eps * max|array|")
    ok = not failures
    print(f"\n{'OK' if ok else 'FAIL'}: worst error {worst:.2f} eps * max|array| "
          f"(tolerance {opts.tolerance}){'' if ok else '; ' + '; '.join(failures)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
