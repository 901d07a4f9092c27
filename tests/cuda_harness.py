"""Run optim's GPU kernels without a GPU: the host CUDA runner.

Two tools for the tests (and anyone checking the CUDA kernels on a machine without one):

* `cuda_module(dtype)`: the RawModule source `optim._kernels_cuda.cuda_source` builds,
  for `nvcc -c` (every warning an error).
* `Harness(dtype)`: the *same source* compiled for the host by g++ after `cuda_host.h`
  (next to this file), which emulates CUDA's execution model: each launch runs grid x
  block host threads (`threadIdx` / `blockIdx` / `blockDim` / `gridDim` are
  thread-locals), the 32 lanes of a warp meet at a barrier for `__shfl_down_sync` /
  `__shfl_sync` / `__syncwarp`, `atomicAdd` is a `std::atomic_ref` add and
  `__threadfence` a full fence. Kernel arguments are packed as `cuLaunchKernel` takes
  them (an array of pointers to the values), checked against the entry point's
  parameter types the way CuPy's RawKernel converts them (Python float -> double, int
  -> long long, arrays -> pointers).

The fake CuPy device that runs optim's real GPU backend on a `Harness` is
tests/fake_cupy.py. Compiled libraries are cached by source hash in
`$OPTIM_HARNESS_CACHE` (default: a per-user directory under the system temp dir).
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy

from optim import _kernels_cuda as kc

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

# CUDA's execution model for g++ (threads, warps, shuffles, atomics) and the launcher:
# the start of every host module, before the CUDA source.
HOST_HEADER = Path(__file__).with_name("cuda_host.h")


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
    """A CUDA source after the host header (`cuda_host.h`: the emulation and the
    launcher), then one launcher per entry point
    (`extern "C" int launch_<name>(grid, block, args)`)."""
    launchers = "".join(
        f'extern "C" int launch_{name}(unsigned int grid, unsigned int block, void** args) '
        f"{{ return optim_launch({name}, grid, block, args); }}\n"
        for name in entry_points(source))
    return "\n".join([HOST_HEADER.read_text(), source, launchers])


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
