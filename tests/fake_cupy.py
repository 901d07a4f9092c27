"""A fake CuPy device for the tests: optim's real GPU backend (`CupyBackend`) running
on the CPU, the kernels executed by tests/cuda_harness.py.

`FakeCupy` / `HarnessBackend`: the slice of CuPy's API that `CupyBackend` uses, with
`FakeDeviceArray`s (NumPy arrays of a type the host path rejects) as device memory
and the harness as the GPU, so the optimizer's real GPU backend runs end to end on
the CPU. It records every launch (kernel name and stream) and counts host transfers:
reads (device -> host) and writes (host -> device). It can also have several devices,
per-thread default streams, deferred (interleavable) per-stream queues and graph
capture (tests/gpu/test_gpu_concurrency.py).
"""
import ctypes
import itertools
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy

from optim import _kernels_cuda as kc
from optim.cuda import cupy as cupy_backend

from cuda_harness import Harness, harness, source_dtype


class _Transfers:
    reads = 0  # device -> host copies
    writes = 0  # host -> device copies


class _Pointer:
    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr: int, device_id: int = 0) -> None:
        self.ptr = ptr
        self.device_id = device_id


class FakeDeviceArray(numpy.ndarray):
    """An array 'on the fake device': a NumPy array the NumPy backend must not accept.

    Like a CuPy array it has `.data.ptr` / `.data.device_id`, `.set(host)` and `.get()`;
    the last two count as host transfers. Views keep their base's device.
    """

    _device_id = 0

    def __array_finalize__(self, obj: Any) -> None:
        self._device_id = getattr(obj, "_device_id", 0)

    @property
    def data(self) -> _Pointer:  # type: ignore[override]
        return _Pointer(self.__array_interface__["data"][0], self._device_id)

    @property
    def _c_contiguous(self) -> bool:  # CuPy's attribute
        return self.flags.c_contiguous

    def set(self, host: numpy.ndarray) -> None:
        if type(host) is not numpy.ndarray or host.shape != self.shape:
            raise TypeError("set() takes a host array of the same shape")
        _Transfers.writes += 1
        self.view(numpy.ndarray)[...] = host

    def get(self) -> numpy.ndarray:
        _Transfers.reads += 1
        return numpy.array(self, copy=True, subok=False)


def to_fake_device(x: numpy.ndarray, device: int = 0) -> FakeDeviceArray:
    out = numpy.array(x, copy=True, order="C").view(FakeDeviceArray)
    out._device_id = device
    return out


def memory_owner(x: numpy.ndarray) -> numpy.ndarray:
    """The array that owns `x`'s memory (its allocation)."""
    while isinstance(x.base, numpy.ndarray):
        x = x.base
    return x


class FakeGraph:
    """A captured CUDA graph: the launches recorded on a capturing stream.

    It holds its arrays' memory weakly, by address, as a real graph holds bare
    pointers: a replay after one of them was freed raises (a GPU would write into freed
    memory)."""

    def __init__(self, stream: "FakeStream") -> None:
        self.stream = stream
        self.ops: List[Tuple["FakeFunction", Tuple[int, ...], List[Any]]] = []

    def record(self, func: "FakeFunction", grid: Tuple[int, ...], args: Sequence[Any]
               ) -> None:
        kept = []
        for a in args:
            if isinstance(a, numpy.ndarray):
                owner = memory_owner(a)
                offset = a.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
                kept.append((weakref.ref(owner), offset, a.shape, a.dtype, a.strides,
                             a._device_id))
            else:
                kept.append(a)
        self.ops.append((func, grid, kept))

    def launch(self, stream: Optional["FakeStream"] = None) -> None:
        replays = []
        for func, grid, kept in self.ops:
            args = []
            for a in kept:
                if isinstance(a, tuple):
                    ref, offset, shape, dtype, strides, device = a
                    owner = ref()
                    if owner is None:
                        raise RuntimeError(f"fake device: a graph replay of {func.name} "
                                           "uses device memory freed after the capture")
                    view = numpy.ndarray(shape, dtype, buffer=owner, offset=offset,
                                         strides=strides).view(FakeDeviceArray)
                    view._device_id = device
                    a = view
                args.append(a)
            replays.append((func, grid, args))
        for func, grid, args in replays:
            func.submit(stream or self.stream, grid, args)


class FakeStream:
    """A CUDA stream stand-in: `with stream:` makes it current (in this host thread),
    as in CuPy; it can capture a graph."""

    _ptrs = itertools.count(0x1000, 0x10)

    def __init__(self, cuda: "FakeCuda", ptr: Optional[int] = None) -> None:
        self.cuda = cuda
        self.ptr = next(self._ptrs) if ptr is None else ptr
        self.graph: Optional[FakeGraph] = None

    def __enter__(self) -> "FakeStream":
        self.cuda._state().streams.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cuda._state().streams.pop()

    def begin_capture(self) -> None:
        if self.graph is not None:
            raise RuntimeError("fake device: the stream is already capturing")
        self.graph = FakeGraph(self)

    def end_capture(self) -> FakeGraph:
        graph, self.graph = self.graph, None
        if graph is None:
            raise RuntimeError("fake device: the stream is not capturing")
        return graph

    def is_capturing(self) -> bool:
        return self.graph is not None

    def synchronize(self) -> None:
        self.cuda.cupy.run(streams=[self])


class _Runtime:
    memcpyDeviceToHost = 2  # noqa: N815 - CUDA's name

    def __init__(self, cuda: "FakeCuda") -> None:
        self.cuda = cuda

    def memcpyAsync(self, dst: int, src: int, size: int, kind: int,  # noqa: N802
                    stream: int) -> None:
        """An asynchronous copy on `stream` (the current one, which optim passes): queued
        like a launch; counted in `async_reads` (device -> host into pinned memory)."""
        current = self.cuda.get_current_stream()
        if current.ptr != stream:
            raise RuntimeError("fake device: memcpyAsync on a stream that is not current")
        if kind != self.memcpyDeviceToHost:
            raise NotImplementedError("fake device: only device -> host async copies")
        cupy = self.cuda.cupy
        cupy.async_reads += 1

        def run() -> None:
            ctypes.memmove(dst, src, size)

        cupy.submit(current, run)

    def getDevice(self) -> int:  # noqa: N802 - CuPy's name
        return self.cuda._state().device

    def getDeviceCount(self) -> int:  # noqa: N802
        return self.cuda.devices

    @staticmethod
    def getDeviceProperties(device: int) -> Dict[str, Any]:  # noqa: N802
        return {"name": b"fake device (CPU harness)"}


class FakeEvent:
    """`cupy.cuda.Event`: `record(stream)` queues a marker on the stream; `done` says
    (without waiting) whether the work before it has run; `synchronize()` runs it."""

    def __init__(self, cuda: "FakeCuda") -> None:
        self.cuda, self.stream, self._done = cuda, None, True

    def record(self, stream: Optional["FakeStream"] = None) -> None:
        self.stream = stream or self.cuda.get_current_stream()
        self._done = False
        self.cuda.cupy.events += 1

        def run() -> None:
            self._done = True

        self.cuda.cupy.submit(self.stream, run)

    @property
    def done(self) -> bool:
        return self._done

    def synchronize(self) -> None:
        if not self._done:
            self.cuda.cupy.syncs += 1
            self.cuda.cupy.run(streams=[self.stream])


class _FakeDevice:
    """`cupy.cuda.Device(i)`: `with` makes it current in this host thread."""

    def __init__(self, cuda: "FakeCuda", device: int) -> None:
        if not 0 <= device < cuda.devices:
            raise ValueError(f"fake device: no device {device}")
        self.cuda, self.id = cuda, device
        self._previous: List[int] = []

    def __enter__(self) -> "_FakeDevice":
        state = self.cuda._state()
        self._previous.append(state.device)
        state.device = self.id
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cuda._state().device = self._previous.pop()

    def synchronize(self) -> None:
        self.cuda.cupy.run()


class FakeCuda:
    """`cupy.cuda`: devices, streams and the current ones, per host thread as in CUDA.

    With `per_thread_default_stream` (CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1) each host
    thread's default stream is its own, but its `ptr` is the same in every thread (2,
    CUDA's cudaStreamPerThread handle); otherwise all threads share the null stream."""

    PER_THREAD = 2

    def __init__(self, cupy: "FakeCupy", devices: int = 1,
                 per_thread_default_stream: bool = False) -> None:
        self.cupy, self.devices = cupy, devices
        self.per_thread_default_stream = per_thread_default_stream
        self.runtime = _Runtime(self)
        self.null = FakeStream(self, 0)
        self._local = threading.local()

    def _state(self) -> Any:
        state = self._local
        if not hasattr(state, "streams"):
            default = (FakeStream(self, self.PER_THREAD) if self.per_thread_default_stream
                       else self.null)
            state.streams, state.device, state.default = [default], 0, default
        return state

    def Device(self, device: Optional[int] = None) -> _FakeDevice:  # noqa: N802
        return _FakeDevice(self, self._state().device if device is None else device)

    def get_current_stream(self) -> FakeStream:
        return self._state().streams[-1]

    def Stream(self, non_blocking: bool = False) -> FakeStream:  # noqa: N802
        return FakeStream(self)

    def ExternalStream(self, ptr: int) -> FakeStream:  # noqa: N802
        return FakeStream(self, ptr)

    def Event(self, block: bool = False, disable_timing: bool = False,  # noqa: N802
              interprocess: bool = False) -> FakeEvent:
        return FakeEvent(self)

    @staticmethod
    def alloc_pinned_memory(size: int) -> bytearray:
        """Pinned host memory: here any host memory (numpy.frombuffer reads it)."""
        return bytearray(max(size, 1))


class FakeFunction:
    """A RawModule function whose launches run in the harness (on a small grid: every
    kernel is grid-stride, so the grid never changes a result). Like CUDA, it launches
    only on the device its module was loaded on, with arrays on that device."""

    def __init__(self, cupy: "FakeCupy", harness: Harness, name: str, device: int) -> None:
        self.cupy, self.harness, self.name, self.device = cupy, harness, name, device

    def __call__(self, grid: Tuple[int, ...], block: Tuple[int, ...], args: Sequence[Any],
                 shared_mem: int = 0) -> None:
        cupy = self.cupy
        current = cupy.cuda.runtime.getDevice()
        if current != self.device:
            raise RuntimeError(f"fake device: {self.name} was loaded on device "
                               f"{self.device} but launched on device {current} "
                               "(CUDA: invalid resource handle)")
        arrays = [a for a in args if isinstance(a, numpy.ndarray)]
        for a in arrays:
            if not isinstance(a, FakeDeviceArray):
                raise TypeError(f"{self.name}: a host array was passed to a kernel")
            if a._device_id != current:
                raise RuntimeError(f"fake device: {self.name} on device {current} was "
                                   f"given an array on device {a._device_id}")
        stream = cupy.cuda.get_current_stream()
        cupy.launches.append((self.name, stream))
        args = list(args)
        # addresses, not the arrays: holding them would keep freed memory alive
        cupy.launch_args.append((self.name, [a.data.ptr if isinstance(a, FakeDeviceArray)
                                             else a for a in args]))
        if stream.graph is not None:
            stream.graph.record(self, grid, args)
        else:
            self.submit(stream, grid, args)

    def submit(self, stream: "FakeStream", grid: Tuple[int, ...], args: List[Any]) -> None:
        cupy = self.cupy

        def run() -> None:
            self.harness.launch(self.name, min(grid[0], cupy.max_grid), cupy.block, args)

        cupy.submit(stream, run)


class FakeModule:
    """A RawModule: optim's `cuda_source` or any other source, run by the harness,
    loaded on the device current when it is made."""

    def __init__(self, cupy: "FakeCupy", code: str, options: Sequence[str]) -> None:
        dtype = source_dtype(code)
        ours = code == kc.cuda_source(dtype)
        if ours:
            assert tuple(options) == kc.NVRTC_OPTIONS
        self.harness = harness(dtype, None if ours else code)
        self.cupy = cupy
        self.device = cupy.cuda.runtime.getDevice()

    def get_function(self, name: str) -> FakeFunction:
        if name not in self.harness.entry_points:
            raise KeyError(name)
        return FakeFunction(self.cupy, self.harness, name, self.device)


class FakeCupy:
    """What `CupyBackend` uses of CuPy, on `FakeDeviceArray`s and the harness.

    `block` replaces the block size of every launch (a multiple of 32) and `max_grid`
    caps the grid, to keep the emulation small; results must not depend on either.
    `devices`: how many devices there are (arrays carry theirs; `cuda.Device(i)` makes
    one current). `deferred`: launches and fills (what CUDA runs asynchronously) wait in
    per-stream queues until `run()`, which may interleave the streams as a GPU may run
    them, and `ones`/`zeros` read as garbage until their fill runs. Allocations, host
    copies (`asarray`) and device copies (`array`) are immediate. `fills` counts the
    device operations other than launches (memsets and fills). A capturing stream
    (`begin_capture`) records launches into a `FakeGraph` and refuses allocations.
    """

    ndarray = FakeDeviceArray

    def __init__(self, block: int = 64, max_grid: int = 2, devices: int = 1,
                 deferred: bool = False, per_thread_default_stream: bool = False) -> None:
        self.block, self.max_grid, self.deferred = block, max_grid, deferred
        self.cuda = FakeCuda(self, devices, per_thread_default_stream)
        self.launches: List[Tuple[str, FakeStream]] = []
        self.launch_args: List[Tuple[str, List[Any]]] = []
        self.fills = 0
        self.async_reads = 0  # device -> host copies into pinned memory, queued
        self.events = 0  # events recorded
        self.syncs = 0  # waits on an event whose work had not run
        self.queue: List[Tuple[FakeStream, Any]] = []
        self._lock = threading.Lock()
        self._reads0, self._writes0 = _Transfers.reads, _Transfers.writes

    @property
    def reads(self) -> int:
        return _Transfers.reads - self._reads0

    @property
    def writes(self) -> int:
        return _Transfers.writes - self._writes0

    # ---- the device's work: run now, queue (deferred), or record (graph capture)

    def submit(self, stream: FakeStream, run: Any) -> None:
        if stream.graph is not None:
            raise RuntimeError("fake device: only kernel launches can be captured here")
        if self.deferred:
            with self._lock:
                self.queue.append((stream, run))
        else:
            run()

    def run(self, order: str = "fifo", streams: Optional[Sequence[FakeStream]] = None
            ) -> None:
        """Run the queued work (of `streams`, default all), each stream's in its order.
        `order`: "fifo" (as submitted), "interleave" (one op of each stream in turn,
        streams by first submission), "reverse" (streams in reverse of that, each
        drained in turn): schedules a GPU may choose for unordered streams."""
        with self._lock:
            mine = [(s, r) for s, r in self.queue if streams is None or s in streams]
            self.queue = [(s, r) for s, r in self.queue if not (streams is None or s in streams)]
        per_stream: Dict[int, List[Any]] = {}
        for s, r in mine:
            per_stream.setdefault(id(s), []).append(r)
        lanes = list(per_stream.values())
        if order == "fifo":
            runs = [r for _, r in mine]
        elif order == "interleave":
            runs = [r for group in itertools.zip_longest(*lanes) for r in group if r]
        elif order == "reverse":
            runs = [r for lane in reversed(lanes) for r in lane]
        else:
            raise ValueError(f"unknown order {order!r}")
        for r in runs:
            r()

    def _allocating(self) -> int:
        stream = self.cuda.get_current_stream()
        if stream.graph is not None:
            raise RuntimeError("fake device: allocation on a capturing stream (CUDA: "
                               "operation not permitted when stream is capturing)")
        return self.cuda.runtime.getDevice()

    def _fill(self, out: FakeDeviceArray, value: Any) -> FakeDeviceArray:
        self.fills += 1
        view = out.view(numpy.ndarray)
        if not self.deferred:
            view[...] = value
            return out

        def run() -> None:
            view[...] = value

        self.submit(self.cuda.get_current_stream(), run)
        return out

    @staticmethod
    def _device(x: Any) -> None:
        if not isinstance(x, FakeDeviceArray):
            raise TypeError(f"fake device got a host array ({type(x).__name__})")

    def empty(self, shape: Any, dtype: Any) -> FakeDeviceArray:
        device = self._allocating()
        out = numpy.empty(shape, dtype=dtype)
        out.view(numpy.uint8)[...] = 0xFF  # never reads as zero or a number
        out = out.view(FakeDeviceArray)
        out._device_id = device
        return out

    def zeros(self, shape: Any, dtype: Any) -> FakeDeviceArray:
        return self._fill(self.empty(shape, dtype), 0)

    def ones(self, shape: Any, dtype: Any) -> FakeDeviceArray:
        return self._fill(self.empty(shape, dtype), 1)

    def zeros_like(self, x: Any) -> FakeDeviceArray:
        self._device(x)
        return self.zeros(x.shape, x.dtype)

    def array(self, x: Any, copy: bool = True) -> FakeDeviceArray:
        self._device(x)
        out = numpy.array(x, copy=True).view(FakeDeviceArray)
        out._device_id = self._allocating()
        return out

    def asarray(self, x: Any) -> FakeDeviceArray:
        if isinstance(x, FakeDeviceArray):
            return x
        device = self._allocating()
        _Transfers.writes += 1
        return to_fake_device(numpy.asarray(x), device)

    def ascontiguousarray(self, x: Any) -> FakeDeviceArray:
        self._device(x)
        return x if x.flags.c_contiguous else numpy.ascontiguousarray(x).view(FakeDeviceArray)

    def asnumpy(self, x: Any) -> numpy.ndarray:
        self._device(x)
        return x.get()

    def RawModule(self, code: str, options: Sequence[str] = ()) -> FakeModule:  # noqa: N802
        return FakeModule(self, code, options)

    def RawKernel(self, code: str, name: str, options: Sequence[str] = ()  # noqa: N802
                  ) -> FakeFunction:
        return FakeModule(self, code, options).get_function(name)


class HarnessBackend(cupy_backend.CupyBackend):
    """optim's real GPU backend (`CupyBackend`) running on `FakeCupy`.

    `launches`: kernel names in launch order; `moved_to_host` / `moved_to_device`:
    device -> host reads and host -> device writes since it was made.
    """

    name = "fake-device"

    def __init__(self, block: int = 64, max_grid: int = 2, **fake: Any) -> None:
        super().__init__(cupy=FakeCupy(block, max_grid, **fake))

    @property
    def launches(self) -> List[str]:
        return [name for name, _ in self.cupy.launches]

    @property
    def moved_to_host(self) -> int:
        return self.cupy.reads

    @property
    def moved_to_device(self) -> int:
        return self.cupy.writes

    @property
    def async_to_host(self) -> int:
        """Queued device -> host copies into pinned memory (skip mode's verdicts)."""
        return self.cupy.async_reads
