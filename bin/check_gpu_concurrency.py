"""bin/check_gpu.py's concurrency checks (docs/gpu.md, "Concurrency"): threads with
per-thread default streams, a CUDA graph replayed after a bigger key was updated, a
disturbed clip-norm ticket. Each returns "ok ...", "FAIL ..." or "skipped ...".

On `--fake` each runs on its own emulated device (tests/fake_cupy.py): launches
wait in per-stream queues and run interleaved (as a GPU may run unordered streams),
graphs replay what they captured and refuse memory freed since, so a sharing or a
use-after-free shows up as wrong bits or an error, deterministically.
"""
import threading
from typing import Any, Callable, Dict, List, Sequence

import numpy

import optim
from optim import backends

THREAD_SIZES = ((3 * 4096 + 5, 1 << 14), (2 * 4096 + 1, 4096 * 5 + 7))  # per thread
STEPS = 6


def _cpu_run(sizes: Sequence[int], grads: List[List[numpy.ndarray]],
             w0: List[numpy.ndarray]) -> List[numpy.ndarray]:
    cpu = optim.Adam(0.001)  # Thinc's defaults: clipping at 1.0, averages
    ws = [w.copy() for w in w0]
    for step in grads:
        for i, g in enumerate(step):
            cpu(i, ws[i], g.copy())
    return ws


def _inputs(sizes: Sequence[int], dtype: Any, seed: int) -> Any:
    rng = numpy.random.default_rng(seed)
    w0 = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [[(rng.standard_normal(n) * 2.0).astype(dtype) for n in sizes]
             for _ in range(STEPS)]
    return w0, grads


def _same(backend: Any, got: Sequence[Any], want: Sequence[numpy.ndarray]) -> bool:
    """Bitwise, NaN-aware (docs/numerics.md: finite results are the same bits)."""
    return all(same_bits(backend.to_host(g), w) for g, w in zip(got, want))


def same_bits(got: numpy.ndarray, want: numpy.ndarray) -> bool:
    """True when every finite (or infinite) element has the same bits and the NaNs are
    at the same places; a NaN's sign and payload are not compared (a GPU makes
    canonical NaNs, x86 keeps payloads: docs/numerics.md)."""
    got, want = numpy.asarray(got), numpy.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    nan = numpy.isnan(want)
    if not numpy.array_equal(numpy.isnan(got), nan):
        return False
    bits = numpy.dtype(f"u{want.dtype.itemsize}")
    return bool(numpy.array_equal(got[~nan].view(bits), want[~nan].view(bits)))


def _with_backend(backend: Any, fn: Callable[[], str]) -> str:
    previous = backends.set_gpu_backend(backend)
    try:
        return fn()
    finally:
        backends.set_gpu_backend(previous)


def check_threads(dev: Any, dtype: Any) -> str:
    """Two host threads, each on its per-thread default stream (same stream handle in
    both, as with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1), each with its optimizer and
    keys, doing clipped updates at the same time: each thread's results are the CPU's."""
    inputs = [_inputs(sizes, dtype, 10 + i) for i, sizes in enumerate(THREAD_SIZES)]
    wants = [_cpu_run(sizes, grads, w0) for sizes, (w0, grads) in zip(THREAD_SIZES, inputs)]
    if dev.fake:
        import fake_cupy

        backend = fake_cupy.HarnessBackend(deferred=True, per_thread_default_stream=True)
        stream_for: Callable[[], Any] = lambda: backend.cupy.cuda.get_current_stream()
    else:
        backend = dev.backend
        ptds = getattr(backend.cupy.cuda.Stream, "ptds", None)
        if ptds is None:
            return "skipped (this CuPy has no Stream.ptds)"
        stream_for = lambda: ptds  # noqa: E731
    results: List[Any] = [None, None]
    errors: List[BaseException] = []
    start = threading.Barrier(2)

    def worker(i: int) -> None:
        try:
            w0, grads = inputs[i]
            with stream_for() as stream:
                opt = optim.Adam(0.001)
                ws = [backend.from_host(w) for w in w0]
                start.wait()
                for step in grads:
                    for k, g in enumerate(step):
                        opt(k, ws[k], backend.from_host(g))
                if not dev.fake:
                    stream.synchronize()
            results[i] = ws
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            start.abort()

    def run() -> str:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            return f"FAIL: {type(errors[0]).__name__}: {errors[0]}"
        if dev.fake:
            backend.cupy.run("interleave")  # the two streams' work, interleaved
        same = all(_same(backend, results[i], wants[i]) for i in range(2))
        return "ok (2 threads, the CPU's bits)" if same else "FAIL: results differ from the CPU's"

    return _with_backend(backend, run)


def check_graph_then_bigger_key(dev: Any, dtype: Any) -> str:
    """Capture a clipped update of a small key, update a key with more chunks eagerly,
    then replay the graph: the small key must get the CPU's bits (or a clear error)."""
    sizes = (4096 + 3, 40 * 4096 + 1)
    w0, grads = _inputs(sizes, dtype, 20)
    cpu = optim.Adam(0.001)
    want = [w.copy() for w in w0]
    cpu(0, want[0], grads[0][0].copy())
    cpu(0, want[0], grads[1][0].copy())
    cpu(1, want[1], grads[0][1].copy())
    if dev.fake:
        import fake_cupy

        backend = fake_cupy.HarnessBackend()
    else:
        backend = dev.backend
    cupy = backend.cupy

    def run() -> str:
        opt = optim.Adam(0.001)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            ws = [backend.from_host(w) for w in w0]
            g_small = backend.from_host(grads[0][0])
            opt(0, ws[0], g_small)  # the key's first update: its state and scratch memory
            g_small[...] = backend.from_host(grads[1][0])  # the next gradient, same memory
            stream.synchronize()
            stream.begin_capture()
            try:
                opt(0, ws[0], g_small)
            finally:
                graph = stream.end_capture()
            opt(1, ws[1], backend.from_host(grads[0][1]))  # more chunks, eagerly
            try:
                graph.launch()
                stream.synchronize()
            except Exception as err:  # noqa: BLE001 - reported
                return f"FAIL: replay: {type(err).__name__}: {err}"
        return ("ok (replayed after a bigger key: the CPU's bits)" if _same(backend, ws, want)
                else "FAIL: the replayed update differs from the CPU's")

    return _with_backend(backend, run)


def check_disturbed_ticket(dev: Any, dtype: Any) -> str:
    """Disturb a key's clip-norm ticket (stray increments, a half-counted earlier
    epoch, garbage), then update it clipped 3 times: every update is the CPU's."""
    size = 10 * 4096 + 17  # 11 chunks
    w0, grads = _inputs((size,), dtype, 30)
    if dev.fake:
        import fake_cupy

        backend = fake_cupy.HarnessBackend()
    else:
        backend = dev.backend

    def run() -> str:
        cpu, opt = optim.Adam(0.001), optim.Adam(0.001)
        want, w = w0[0].copy(), backend.from_host(w0[0])
        cpu(0, want, grads[0][0].copy())
        opt(0, w, backend.from_host(grads[0][0]))
        ws = opt._dev.plans[0].workspace
        disturbances: Dict[str, int] = {
            "3 stray increments": 3,
            "the last epoch, half counted": (ws.epoch << 32) | 5,
            "garbage": 0xFFFFFFFFFFFFFFFF,
        }
        step = 1
        for what, value in disturbances.items():
            ws.tickets[...] = backend.from_host(numpy.array([value], numpy.uint64))
            for _ in range(3):
                g = grads[step % STEPS][0]
                cpu(0, want, g.copy())
                opt(0, w, backend.from_host(g))
                step += 1
                if not _same(backend, [w], [want]):
                    return f"FAIL: after {what}, update {step} differs from the CPU's"
        return "ok (3 disturbances, 9 updates: the CPU's bits)"

    return _with_backend(backend, run)


CHECKS = (("threads: per-thread streams", check_threads),
          ("graph, then a bigger key", check_graph_then_bigger_key),
          ("disturbed ticket", check_disturbed_ticket))
