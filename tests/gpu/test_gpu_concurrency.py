"""The GPU path under threads, streams, CUDA graphs and several devices (issue 18), on
the emulated device of tests/fake_cupy.py.

With `deferred=True` the fake device queues launches and fills per stream and runs
them when told, interleaved or one stream before another: schedules a GPU may choose
for streams nothing orders. Each test would fail if scratch memory were shared between
two users, freed under a captured graph, filled on another stream than its reader's,
loaded on another device, or if a disturbed ticket spoiled later updates.
"""
import ctypes
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, List, Sequence

import numpy
import pytest

import cuda_harness as ch
import fake_cupy as fc
import optim
from optim import _kernels
from optim.cuda import workspace as _cuda_workspace
from optim import backends

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bin"))

NORM = "optim_clip_norm"
DTYPES = [numpy.float32, numpy.float64]

pytestmark = pytest.mark.skipif(
    not shutil.which("g++"), reason="g++ is not on PATH: cannot run the CUDA kernel "
    "strings on the host"
)


def inputs(sizes: Sequence[int], dtype: Any, steps: int, seed: int):
    rng = numpy.random.default_rng(seed)
    w0 = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [[(rng.standard_normal(n) * 2.0).astype(dtype) for n in sizes]
             for _ in range(steps)]
    return w0, grads


def cpu_result(w0, grads, **kwargs) -> List[numpy.ndarray]:
    cpu = optim.Adam(0.001, **kwargs)
    ws = [w.copy() for w in w0]
    for step in grads:
        for k, g in enumerate(step):
            cpu(k, ws[k], g.copy())
    return ws


def assert_bits(got: Any, want: numpy.ndarray, what: str) -> None:
    got = numpy.asarray(got).view(numpy.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bits = numpy.dtype(f"u{want.dtype.itemsize}")
    assert numpy.array_equal(got.view(bits), want.view(bits)), what


# ---------------------------------------------------------------- 1: threads and streams


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_threads_on_per_thread_default_streams_share_no_scratch_memory(use, dtype):
    """Two host threads, per-thread default streams (one stream handle, 2, in both),
    each with its own optimizer and keys, clipped updates; the device runs the two
    streams' work interleaved. Each thread gets the CPU's bits."""
    dev = use(fc.HarnessBackend(deferred=True, per_thread_default_stream=True))
    sizes = [(3 * 4096 + 5, 4096 + 1), (2 * 4096 + 9, 5 * 4096)]
    data = [inputs(s, dtype, 4, 40 + i) for i, s in enumerate(sizes)]
    out: List[Any] = [None, None]
    streams: List[Any] = [None, None]
    errors: List[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        try:
            w0, grads = data[i]
            opt = optim.Adam(0.001)  # clipping at 1.0, averages: Thinc's defaults
            ws = [fc.to_fake_device(w) for w in w0]
            streams[i] = dev.cupy.cuda.get_current_stream()
            barrier.wait()
            for step in grads:
                for k, g in enumerate(step):
                    opt(k, ws[k], fc.to_fake_device(g))
            out[i] = ws
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert streams[0] is not streams[1] and streams[0].ptr == streams[1].ptr == 2
    assert dev.cupy.queue, "the work is still queued"
    dev.cupy.run("interleave")
    for i in range(2):
        want = cpu_result(*data[i])
        for k in range(2):
            assert_bits(out[i][k], want[k], f"thread {i} key {k}")
    assert dev.moved_to_host == 0


def test_a_reused_stream_handle_shares_no_scratch_memory(use):
    """Two streams with one handle (a destroyed stream's handle reused while its work
    is queued), work interleaved: the CPU's bits."""
    dev = use(fc.HarnessBackend(deferred=True))
    dtype = numpy.float32
    w0, grads = inputs([2 * 4096 + 3, 4096 + 7], dtype, 3, 5)
    opt = optim.Adam(0.001)
    ws = [fc.to_fake_device(w) for w in w0]
    first, second = dev.cupy.cuda.ExternalStream(0x7000), dev.cupy.cuda.ExternalStream(0x7000)
    for step in grads:
        for k, stream in enumerate((first, second)):
            with stream:
                opt(k, ws[k], fc.to_fake_device(step[k]))
    dev.cupy.run("interleave")
    want = cpu_result(w0, grads)
    for k in range(2):
        assert_bits(ws[k], want[k], f"key {k}")


# ---------------------------------------------------------------- 2: CUDA graphs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_graph_replay_after_an_eager_update_of_a_bigger_key(use, dtype):
    """A clipped update captured, then a key with more chunks updated eagerly on the
    same stream, then the graph replayed: the replay finds its scratch memory alive
    and gives the CPU's bits."""
    dev = use(fc.HarnessBackend())
    w0, grads = inputs([4096 + 3, 40 * 4096 + 1], dtype, 2, 7)
    want = cpu_result(w0, grads)
    opt = optim.Adam(0.001)
    ws = [fc.to_fake_device(w) for w in w0]
    stream = dev.cupy.cuda.Stream(non_blocking=True)
    with stream:
        g = fc.to_fake_device(grads[0][0])
        opt(0, ws[0], g)
        g.view(numpy.ndarray)[...] = grads[1][0]
        stream.begin_capture()
        opt(0, ws[0], g)
        graph = stream.end_capture()
        opt(1, ws[1], fc.to_fake_device(grads[0][1]))
        opt(1, ws[1], fc.to_fake_device(grads[1][1]))
        assert_bits(ws[0], cpu_result([w0[0]], [grads[0][:1]])[0], "not replayed yet")
        graph.launch()
    for k in range(2):
        assert_bits(ws[k], want[k], f"key {k}")


def test_what_cannot_be_captured_raises_a_clear_error(use):
    """A key's first update allocates and step_many uploads: under capture both raise
    a RuntimeError saying what to capture instead, and nothing is recorded."""
    dev = use(fc.HarnessBackend())
    opt = optim.Adam(0.001)
    w = fc.to_fake_device(numpy.ones(100, numpy.float32))
    stream = dev.cupy.cuda.Stream()
    with stream:
        stream.begin_capture()
        with pytest.raises(RuntimeError, match=r"key .new.: this update prepares .* cannot be "
                                               r"captured in a CUDA graph"):
            opt("new", w, fc.to_fake_device(numpy.ones(100, numpy.float32)))
        graph = stream.end_capture()
        opt("k", w, fc.to_fake_device(numpy.ones(100, numpy.float32)))
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="step_many cannot be captured"):
            opt.step_many(["k"], [w], [fc.to_fake_device(numpy.ones(100, numpy.float32))])
        assert stream.end_capture().ops == []
    assert graph.ops == [] and "new" not in opt.nr_update and opt.nr_update["k"] == 1


# ---------------------------------------------------------------- 3: a disturbed ticket


def launch_norm(dtype, g, partials, ticket, epoch, grid=2, block=64) -> float:
    clip = numpy.full(1, numpy.nan)
    ch.harness(dtype).launch(NORM, grid, block, [g, g, 0.0, 1.0, g.size, partials, ticket,
                                                 epoch, clip])
    return float(clip[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_a_disturbed_ticket_spoils_no_later_launch(dtype):
    """The issue's case (a 10-chunk tensor; stray increments; a half-counted earlier
    launch; garbage), each followed by 3 launches with new epochs: every clip factor
    is the CPU's, and the ticket is left idle (0). (The kernel's epoch argument is
    new; test_a_disturbed_ticket_recovers_in_the_optimizer shows the same through the
    optimizer's API.)"""
    rng = numpy.random.default_rng(18)
    partials = numpy.full(10, numpy.nan)
    ticket = numpy.zeros(1, numpy.uint64)
    epoch = 0
    for disturb in (lambda e: 1, lambda e: 3, lambda e: (e << 32) | 4,
                    lambda e: (e << 32) | 9, lambda e: 0xFFFFFFFFFFFFFFFF):
        disturbance = ticket[0] = disturb(epoch)  # the last launch's epoch, half counted
        for _ in range(3):
            g = (rng.standard_normal(10 * 4096) * 0.1).astype(dtype)
            epoch = _cuda_workspace.next_epoch(epoch)
            want = _kernels.clip_scale(_kernels.clip_sum_squares(g, g, 0.0), 1.0)
            assert want < 1.0
            assert launch_norm(dtype, g, partials, ticket, epoch) == want, disturbance
            assert ticket[0] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_a_disturbed_ticket_recovers_in_the_optimizer(use, dtype):
    """End to end: after every step, stray increments of the ticket the last clip norm
    launch used (per call, then step_many's), found by its address; every update is
    still the CPU's."""
    dev = use(fc.HarnessBackend())
    w0, grads = inputs([10 * 4096 + 3, 3 * 4096], dtype, 7, 9)
    cpu, opt = optim.Adam(0.001), optim.Adam(0.001)
    want, ws = [w.copy() for w in w0], [fc.to_fake_device(w) for w in w0]
    for step, gs in enumerate(grads):
        if step < 4:
            for k, g in enumerate(gs):
                opt(k, ws[k], fc.to_fake_device(g))
        else:
            opt.step_many([0, 1], ws, [fc.to_fake_device(g) for g in gs])
        for k, g in enumerate(gs):
            cpu(k, want[k], g.copy())
            assert_bits(ws[k], want[k], f"step {step} key {k}")
        name, args = [x for x in dev.cupy.launch_args if x[0].startswith(NORM)][-1]
        ticket = ctypes.c_uint32.from_address(args[6])  # the count: the low 32 bits
        ticket.value += 3


def test_costs_of_a_clipped_update_are_counted(use):
    """A clipped update after the key's first: 2 launches, no host read or write, no
    memset or fill; the first: + the state and the key's scratch memory (2 fills)."""
    dev = use(fc.HarnessBackend())
    opt = optim.Adam(0.001)
    w = fc.to_fake_device(numpy.ones(3 * 4096, numpy.float32))
    fills = dev.cupy.fills
    opt("k", w, fc.to_fake_device(numpy.full(3 * 4096, 0.5, numpy.float32)))
    assert dev.cupy.fills - fills == 3 + 2 and len(dev.launches) == 2
    before = (len(dev.launches), dev.moved_to_host, dev.moved_to_device, dev.cupy.fills)
    for _ in range(5):
        opt("k", w, fc.to_fake_device(numpy.full(3 * 4096, 0.5, numpy.float32)))
    after = (len(dev.launches), dev.moved_to_host, dev.moved_to_device, dev.cupy.fills)
    assert [a - b for a, b in zip(after, before)] == [10, 0, 0, 0]
    assert opt._dev.plans["k"].workspace.epoch == 6


# ---------------------------------------------------------------- 4: the unclipped factor


@pytest.mark.parametrize("order", ["reverse", "interleave"])
def test_unclipped_updates_on_two_streams_read_a_ready_factor(use, order):
    """Unclipped updates of two keys, first made on two non-blocking streams; the
    second stream's work runs first (or interleaved): the factor each reads is 1.0
    already, as each key's is filled on its own stream before its launch."""
    dev = use(fc.HarnessBackend(deferred=True))
    dtype = numpy.float32
    w0, grads = inputs([300, 5000], dtype, 2, 3)
    opt = optim.Adam(0.001, grad_clip=0.0)
    ws = [fc.to_fake_device(w) for w in w0]
    streams = [dev.cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    for step in grads:
        for k, stream in enumerate(streams):
            with stream:
                opt(k, ws[k], fc.to_fake_device(step[k]))
    dev.cupy.run(order)
    want = cpu_result(w0, grads, grad_clip=0.0)
    for k in range(2):
        assert_bits(ws[k], want[k], f"key {k}")


# ---------------------------------------------------------------- 5: devices


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_two_devices_each_launch_their_own_modules(use, dtype):
    """Keys on device 0 and device 1 (per call and step_many): each launches functions
    of a module loaded on its device (the fake device refuses others, as CUDA does),
    with the CPU's bits; a key's state stays on its device."""
    dev = use(fc.HarnessBackend(devices=2))
    cuda = dev.cupy.cuda
    w0, grads = inputs([5000, 4096 * 2 + 1], dtype, 3, 11)
    want = cpu_result(w0, grads)
    opt = optim.Adam(0.001)
    ws = [fc.to_fake_device(w0[0], 0), fc.to_fake_device(w0[1], 1)]
    for step, gs in enumerate(grads):
        opt(0, ws[0], fc.to_fake_device(gs[0], 0))
        with cuda.Device(1):
            if step < 2:
                opt(1, ws[1], fc.to_fake_device(gs[1], 1))
            else:
                opt.step_many([1], [ws[1]], [fc.to_fake_device(gs[1], 1)])
    for k in range(2):
        assert_bits(ws[k], want[k], f"key {k}")
    assert {device for device, _ in dev._modules} == {0, 1}
    assert opt.mom1[1]._device_id == 1 and opt._dev.plans[1].device == 1
    with pytest.raises(ValueError, match=r"key 1: .*device 1 .*current device is 0"):
        opt(1, ws[1], fc.to_fake_device(grads[0][1], 1))
    with cuda.Device(1), pytest.raises(ValueError, match=r"key 0: its state is on device 0"):
        opt(0, fc.to_fake_device(w0[0], 1), fc.to_fake_device(grads[0][0], 1))
    assert_bits(ws[0], want[0], "untouched by the refused calls")


# ---------------------------------------------------------------- 6: NaN payloads


def test_nan_results_are_compared_by_place_not_by_payload():
    """docs/numerics.md: the same bits for every non-NaN result; a NaN is a NaN at the
    same element on both devices, but its payload may differ (a GPU makes canonical
    NaNs, x86 keeps payloads). The x86 CPU kernel keeps a gradient's payload; the GPU
    checks compare NaNs by place and everything else by bits."""
    import check_gpu
    import check_gpu_concurrency as cc

    dtype = numpy.float32
    payload = numpy.array([0x7FC01234], numpy.uint32).view(dtype)[0]
    w = numpy.ones(8, dtype)
    g = numpy.full(8, 0.5, dtype)
    g[3] = payload
    optim.SGD(0.1, grad_clip=0.0)("k", w, g)
    assert w.view(numpy.uint32)[3] in (0x7FC01234, 0xFFC01234), hex(w.view(numpy.uint32)[3])
    canonical = w.copy()
    canonical.view(numpy.uint32)[3] = 0x7FFFFFFF  # what a GPU's float32 arithmetic makes
    assert not numpy.array_equal(canonical.view(numpy.uint32), w.view(numpy.uint32))
    assert cc.same_bits(canonical, w)
    last_bit = w.copy()
    last_bit.view(numpy.uint32)[0] ^= 1
    nan_for_number = w.copy()
    nan_for_number[0] = numpy.nan
    for bad in (last_bit, nan_for_number):
        assert not cc.same_bits(bad, w)

    class Dev:
        backend = backends.NUMPY

    assert check_gpu.compare(Dev(), {"w": canonical}, {"w": w}, dtype) == (0.0, 0.0)
    assert check_gpu.compare(Dev(), {"w": nan_for_number}, {"w": w}, dtype)[0] == numpy.inf
    assert check_gpu.compare(Dev(), {"w": w}, {"w": nan_for_number}, dtype)[0] == numpy.inf
