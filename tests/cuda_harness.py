"""Run optim's GPU kernels without a GPU.

Three tools for the tests (and anyone checking the CUDA kernels on a machine without one):

* `cuda_module(dtype)`: the RawModule source `optim._kernels_cuda.cuda_source` builds,
  for `nvcc -c` (every warning an error).
* `Harness(dtype)`: the *same source* compiled for the host by g++ with a prelude that
  emulates CUDA's execution model: each launch runs grid x block host threads
  (`threadIdx` / `blockIdx` / `blockDim` / `gridDim` are thread-locals), the 32 lanes of
  a warp meet at a barrier for `__shfl_down_sync` / `__shfl_sync` / `__syncwarp`,
  `atomicAdd` is a `std::atomic_ref` add and `__threadfence` a full fence. Kernel
  arguments are packed as `cuLaunchKernel` takes them (an array of pointers to the
  values), checked against the entry point's parameter types the way CuPy's RawKernel
  converts them (Python float -> double, int -> long long, arrays -> pointers).
* `FakeCupy` / `HarnessBackend`: the slice of CuPy's API that `CupyBackend` uses, with
  `FakeDeviceArray`s (NumPy arrays of a type the host path rejects) as device memory
  and the harness as the GPU, so the optimizer's real GPU backend runs end to end on
  the CPU. It records every launch (kernel name and stream) and counts host transfers:
  reads (device -> host) and writes (host -> device). It can also have several devices,
  per-thread default streams, deferred (interleavable) per-stream queues and graph
  capture (tests/test_gpu_concurrency.py).

Compiled libraries are cached by source hash in `$OPTIM_HARNESS_CACHE` (default: a
per-user directory under the system temp dir).
"""
import ctypes
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy

from optim import _kernels_cuda as kc

from optim.backends import cupy as cupy_backend

DTYPES = (numpy.float32, numpy.float64)
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def cuda_module(dtype: Any) -> str:
    """The CUDA source of every kernel for `dtype`, as CuPy's RawModule compiles it."""
    return kc.cuda_source(dtype)


def nvcc_command(source: Path, output: Path, archs: Sequence[int]) -> List[str]:
    """nvcc invocation that turns every warning into an error; same FMA policy as CuPy's."""
    cmd = ["nvcc", "-c", "-std=c++17", *kc.NVRTC_OPTIONS, "-Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra,-Werror"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd + ["-o", str(output), str(source)]


# ---------------------------------------------------------------- CUDA on the host

CPP_PRELUDE = r"""
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's spellings, for the host.
#define __global__
#define __device__
#define __forceinline__ inline
using std::sqrt;

struct optim_uint3 { unsigned int x = 0, y = 0, z = 0; };
thread_local optim_uint3 threadIdx, blockIdx, blockDim, gridDim;

// A warp's 32 lanes (host threads) meet here at every shuffle and __syncwarp (a
// yielding spin barrier). Lanes that diverge around a shuffle would hang on a GPU;
// here they abort with a message.
class OptimWarp {
 public:
  void sync() {
    const unsigned int generation = generation_.load();
    if (arrived_.fetch_add(1) == 31) {
      arrived_.store(0);
      generation_.fetch_add(1);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (unsigned long spins = 1; generation_.load() == generation; ++spins) {
      std::this_thread::yield();
      if (spins % 4096 == 0 &&
          std::chrono::steady_clock::now() - start > std::chrono::seconds(120)) {
        std::fprintf(stderr, "cuda harness: a warp's lanes diverged at a shuffle\n");
        std::abort();
      }
    }
  }
  unsigned long long slot[32];

 private:
  std::atomic<unsigned int> arrived_{0};
  std::atomic<unsigned int> generation_{0};
};
thread_local OptimWarp* optim_this_warp = nullptr;

inline void optim_check_mask(unsigned int mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda harness: only full-warp shuffles are emulated\n");
    std::abort();
  }
}

template <typename V>
V optim_shuffle(V value, unsigned int source, bool in_range) {
  static_assert(sizeof(V) <= sizeof(unsigned long long), "shuffle of a wide type");
  OptimWarp& warp = *optim_this_warp;
  std::memcpy(&warp.slot[threadIdx.x % 32], &value, sizeof(V));
  warp.sync();
  V out = value;
  if (in_range) {
    std::memcpy(&out, &warp.slot[source], sizeof(V));
  }
  warp.sync();  // nobody overwrites a slot before every lane has read
  return out;
}

template <typename V>
V __shfl_down_sync(unsigned int mask, V value, unsigned int delta) {
  optim_check_mask(mask);
  const unsigned int lane = threadIdx.x % 32;
  return optim_shuffle(value, lane + delta, lane + delta < 32);
}

template <typename V>
V __shfl_sync(unsigned int mask, V value, int source) {
  optim_check_mask(mask);
  return optim_shuffle(value, static_cast<unsigned int>(source) % 32, true);
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  optim_check_mask(mask);
  optim_this_warp->sync();
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value);
}

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
  std::atomic_ref<unsigned long long>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value, whether or not it was replaced
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename V>
V __ldcg(const V* address) {
  V out;
  __atomic_load(const_cast<V*>(address), &out, __ATOMIC_SEQ_CST);
  return out;
}
"""

CPP_LAUNCHER = r"""
// cuLaunchKernel's convention: `args` holds one pointer per kernel parameter.
template <typename... A, std::size_t... I>
void optim_invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// The host threads that play a launch's GPU threads, kept between launches (creating
// a thread costs more than most emulated kernels). run(count, job) calls job(i) for
// every i < count, each on its own thread, all at once (a warp's lanes must meet).
class OptimPool {
 public:
  void run(unsigned int count, const std::function<void(unsigned int)>& job) {
    std::lock_guard<std::mutex> one_launch_at_a_time(launch_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_ < count) {
      std::thread(&OptimPool::work, this, workers_++, generation_).detach();
    }
    job_ = &job;
    count_ = count;
    remaining_ = count;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(unsigned int index, unsigned long seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= count_) {
        continue;
      }
      const std::function<void(unsigned int)>* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--remaining_ == 0) {
        done_.notify_all();
      }
    }
  }

  std::mutex launch_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(unsigned int)>* job_ = nullptr;
  unsigned int workers_ = 0, count_ = 0, remaining_ = 0;
  unsigned long generation_ = 0;
};

OptimPool& optim_pool() {
  static OptimPool* pool = new OptimPool();  // never destroyed: its threads outlive exit
  return *pool;
}

template <typename... A>
int optim_launch(void (*kernel)(A...), unsigned int grid, unsigned int block, void** args) {
  if (grid == 0 || block == 0 || block % 32 != 0) {
    return 1;
  }
  const unsigned int threads = grid * block;
  std::vector<std::unique_ptr<OptimWarp>> warps;
  for (unsigned int i = 0; i < threads / 32; ++i) {
    warps.push_back(std::make_unique<OptimWarp>());
  }
  optim_pool().run(threads, [&](unsigned int i) {
    blockIdx.x = i / block;
    threadIdx.x = i % block;
    blockDim.x = block;
    gridDim.x = grid;
    optim_this_warp = warps[i / 32].get();
    optim_invoke(kernel, args, std::index_sequence_for<A...>{});
  });
  return 0;
}
"""


SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def entry_points(source: str) -> Dict[str, Tuple[Tuple[str, str], ...]]:
    """The `extern "C" __global__` kernels of a CUDA source: name -> (C type, name)s."""
    out = {}
    for name, params in SIGNATURE.findall(source):
        parsed = []
        for param in filter(None, (p.strip() for p in params.split(","))):
            words = param.replace("__restrict__", "").split()
            parsed.append((" ".join(words[:-1]).replace(" *", "*"), words[-1]))
        out[name] = tuple(parsed)
    return out


def cpp_module(source: str) -> str:
    """A CUDA source between the emulation prelude and one launcher per entry point
    (`extern "C" int launch_<name>(grid, block, args)`)."""
    launchers = "".join(
        f'extern "C" int launch_{name}(unsigned int grid, unsigned int block, void** args) '
        f"{{ return optim_launch({name}, grid, block, args); }}\n"
        for name in entry_points(source))
    return "\n".join([CPP_PRELUDE, source, CPP_LAUNCHER, launchers])


# Same floating-point policy as the Cython kernels (setup.py: -ffp-contract=off).
GXX_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++20", "-pthread", "-ffp-contract=off",
             "-Wall", "-Wextra", "-Werror"]


def cache_dir() -> Path:
    path = os.environ.get("OPTIM_HARNESS_CACHE") or os.path.join(
        tempfile.gettempdir(), f"optim-harness-{os.getuid()}"
    )
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def compile_shared(source: str) -> Path:
    """g++ `source` into a shared library, cached by content hash."""
    if shutil.which("g++") is None:
        raise RuntimeError("g++ is not on PATH")
    digest = hashlib.sha256((source + " ".join(GXX_FLAGS)).encode()).hexdigest()[:20]
    target = cache_dir() / f"kernels-{digest}.so"
    if not target.exists():
        work = Path(tempfile.mkdtemp(dir=cache_dir()))
        try:
            (work / "k.cpp").write_text(source)
            subprocess.run(["g++", *GXX_FLAGS, "-o", str(work / "k.so"), str(work / "k.cpp")],
                           check=True, capture_output=True, text=True)
            os.replace(work / "k.so", target)  # atomic: concurrent sessions can share
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"g++ failed on the CUDA source:\n{err.stderr}") from err
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


# C parameter type -> the NumPy dtype of the array it points to ("T": the module's).
POINTEES = {"T": None, "double": numpy.float64, "unsigned int": numpy.uint32,
            "unsigned long long": numpy.uint64, "long long": numpy.int64, "int": numpy.int32}


def _pointee(ctype: str, dtype: numpy.dtype) -> numpy.dtype:
    base = ctype.replace("const ", "").rstrip("*").strip()
    return dtype if base == "T" else numpy.dtype(POINTEES[base])


def source_dtype(source: str) -> numpy.dtype:
    """The `T` of a source (`typedef float T;` or `typedef double T;`)."""
    match = re.search(r"^typedef (float|double) T;", source, re.M)
    if match is None:
        raise ValueError("the CUDA source has no `typedef float|double T;`")
    return numpy.dtype({"float": numpy.float32, "double": numpy.float64}[match.group(1)])


class Harness:
    """Every entry point of a CUDA source (default: optim's `cuda_source(dtype)`),
    executed on the host."""

    def __init__(self, dtype: Any, source: Optional[str] = None) -> None:
        source = cuda_module(dtype) if source is None else source
        self.dtype = source_dtype(source)
        self.entry_points = entry_points(source)
        self.lib = ctypes.CDLL(str(compile_shared(cpp_module(source))))

    def launch(self, name: str, grid: int, block: int, args: Sequence[Any]) -> None:
        """Launch kernel `name` with grid x block threads. Arguments follow CuPy's
        RawKernel conversion, checked strictly against the kernel's parameter types:
        a `double` takes a Python float, a `long long` a Python int, a pointer a
        C-contiguous NumPy array (any subclass) of the pointee's dtype."""
        params = self.entry_points[name]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        values: list = []
        for (ctype, pname), arg in zip(params, args):
            if ctype == "double":
                if not isinstance(arg, float):
                    raise TypeError(f"{name}: {pname} is a double; CuPy passes a "
                                    f"{type(arg).__name__} as something else")
                values.append(ctypes.c_double(arg))
            elif ctype == "long long":
                if isinstance(arg, bool) or not isinstance(arg, (int, numpy.int64)):
                    raise TypeError(f"{name}: {pname} is a long long, got "
                                    f"{type(arg).__name__}")
                values.append(ctypes.c_longlong(int(arg)))
            elif ctype.endswith("*"):
                want = _pointee(ctype, self.dtype)
                if not isinstance(arg, numpy.ndarray) or not arg.flags.c_contiguous:
                    raise TypeError(f"{name}: {pname} must be a contiguous array, got "
                                    f"{type(arg).__name__}")
                if arg.dtype != want:
                    raise TypeError(f"{name}: {pname} points to {want}, got {arg.dtype}")
                values.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                raise TypeError(f"{name}: unsupported parameter type {ctype}")
        pointers = (ctypes.c_void_p * max(len(values), 1))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        status = getattr(self.lib, f"launch_{name}")(
            ctypes.c_uint(grid), ctypes.c_uint(block), pointers)
        if status != 0:
            raise ValueError(f"{name}: bad launch geometry {grid} x {block}")


_harnesses: Dict[str, Harness] = {}
_lock = threading.Lock()


def harness(dtype: Any, source: Optional[str] = None) -> Harness:
    """The (cached) harness for optim's kernels of `dtype`, or for another `source`."""
    key = numpy.dtype(dtype).name if source is None else source
    with _lock:
        if key not in _harnesses:
            _harnesses[key] = Harness(dtype, source)
        return _harnesses[key]


# ---------------------------------------------------------------- a fake device


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
