"""Run optim's GPU kernel strings without a GPU.

Three tools for the tests (and anyone checking the CUDA kernels on a machine without one):

* `cuda_module(dtype)`: the CUDA source CuPy would generate for every kernel in
  `optim._kernels_cuda` (CuPy's `ElementwiseKernel` / `ReductionKernel` templates, with a
  minimal stand-in for CuPy's `CArray` / `CIndexer` headers), for `nvcc -c`.
* `Harness(dtype)`: the *same operation strings* wrapped as host C++ (a loop over `i`
  with the parameters bound as CuPy binds them), compiled with g++ into a shared
  library, loaded with ctypes and run on NumPy arrays.
* `FakeDeviceArray` / `HarnessBackend`: a pretend device whose arrays are NumPy arrays of
  a distinct type and whose kernels run in the harness, so the optimizer's GPU dispatch
  path can be tested end to end.

Compiled libraries are cached by source hash in `$OPTIM_HARNESS_CACHE` (default: a
per-user directory under the system temp dir).
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
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy

from optim import _kernels_cuda as kc
from optim._kernels_cuda import KERNELS, REDUCTION, KernelSpec, ReductionSpec

CTYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
DTYPES = (numpy.float32, numpy.float64)
Spec = Union[KernelSpec, ReductionSpec]


def parse_params(params: str) -> List[Tuple[str, str]]:
    """CuPy's parameter list syntax ("T a, float64 b") as (C type, name) pairs."""
    out = []
    for p in params.split(","):
        words = p.split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"unsupported parameter {p!r}")
        typ, name = words
        out.append((typ if len(typ) == 1 else CTYPES[typ], name))
    return out


def ctype_of(dtype: Any) -> str:
    return CTYPES[numpy.dtype(dtype).name]


# ---------------------------------------------------------------- CUDA, as CuPy wraps it

# Stand-in for the parts of cupy/carray.cuh the generated code touches. The arrays reach
# the kernels as 1-d C-contiguous views (CuPy's reduce_dims on contiguous arguments).
CUDA_PRELUDE = r"""
#include <cstddef>
#define CUPY_FOR(i, n) \
    for (ptrdiff_t i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
         i < (n); i += static_cast<ptrdiff_t>(blockDim.x) * gridDim.x)
template <typename T, int ndim, bool c_contiguous = true, bool use_32bit = false,
          int core_ndim = 0>
class CArray {
 public:
  T* data_;
  ptrdiff_t size_;
  __device__ ptrdiff_t size() const { return size_; }
  __device__ T& operator[](ptrdiff_t i) { return data_[i]; }
  __device__ const T& operator[](ptrdiff_t i) const { return data_[i]; }
};
template <int ndim, bool use_32bit = false>
class CIndexer {
 public:
  ptrdiff_t size_;
  ptrdiff_t index_;
  __device__ ptrdiff_t size() const { return size_; }
  __device__ void set(ptrdiff_t i) { index_ = i; }
  __device__ ptrdiff_t get() const { return index_; }
};
"""


def _typedefs(params: Sequence[Tuple[str, str]], ctype: str) -> str:
    """CuPy's type map: one typedef per one-letter type parameter."""
    letters = sorted({t for t, _ in params if len(t) == 1})
    return "".join(f"typedef {ctype} {t};\n" for t in letters)


def cuda_elementwise_source(spec: KernelSpec, ctype: str) -> str:
    """The kernel CuPy's ElementwiseKernel generates for C-contiguous arrays of `ctype`.

    Scalars (`spec.scalars`) are `const T name` parameters; arrays are CArrays bound in
    the loop as `const T &x = _raw_x[_ind.get()];` (inputs) or `T &x = ...` (outputs).
    """
    ins, outs = parse_params(spec.in_params), parse_params(spec.out_params)
    params, binds = [], []
    for (t, n), const in [(p, True) for p in ins] + [(p, False) for p in outs]:
        if n in spec.scalars:
            params.append(f"{'const ' if const else ''}{t} {n}")
        else:
            params.append(f"{'const ' if const else ''}CArray<{t}, 1, 1, 1, 0> _raw_{n}")
            binds.append(f"{'const ' if const else ''}{t} &{n} = _raw_{n}[_ind.get()];")
    params.append("CIndexer<1, 1> _ind")
    operation = "\n".join(binds + [spec.operation])
    return (
        f"{_typedefs(ins + outs, ctype)}\n"
        f'extern "C" __global__ void {spec.name}({", ".join(params)}) {{\n'
        f"  ;\n  #pragma unroll 1\n  CUPY_FOR(i, _ind.size()) {{\n    _ind.set(i);\n"
        f"    {operation};\n  }}\n  ;\n}}\n"
    )


def cuda_reduction_source(spec: ReductionSpec, ctype: str, block_size: int = 512) -> str:
    """The kernel CuPy's ReductionKernel generates (its simple, non-CUB template)."""
    ins, outs = parse_params(spec.in_params), parse_params(spec.out_params)
    params, input_expr, output_expr = [], [], []
    for t, n in ins:
        if n in spec.scalars:
            params.append(f"const {t} {n}")
        else:
            params.append(f"const CArray<{t}, 1, 1, 1, 0> _raw_{n}")
            input_expr.append(f"const {t} {n} = _raw_{n}[_in_ind.get()];")
    for t, n in outs:
        params.append(f"CArray<{t}, 0, 1, 1, 0> _raw_{n}")
        output_expr.append(f"{t} &{n} = _raw_{n}[_out_ind.get()];")
    params += ["CIndexer<1, 1> _in_ind", "CIndexer<0, 1> _out_ind", "const int _block_stride"]
    return f"""{_typedefs(ins + outs, ctype)}typedef int IndexT;
#define REDUCE(a, b) ({spec.reduce_expr})
#define POST_MAP(a) ({spec.post_map_expr})
#define _REDUCE(_offset) if (_tid < _offset) {{ \\
  _type_reduce _a = _sdata[_tid], _b = _sdata[(_tid + _offset)]; \\
  _sdata[_tid] = REDUCE(_a, _b); \\
}}
typedef {spec.reduce_type} _type_reduce;
extern "C" __global__ void {spec.name}({", ".join(params)}) {{
  __shared__ char _sdata_raw[{block_size} * sizeof(_type_reduce)];
  _type_reduce *_sdata = reinterpret_cast<_type_reduce*>(_sdata_raw);
  unsigned int _tid = threadIdx.x;
  IndexT _J_offset = _tid >> __popc(_block_stride - 1);
  ptrdiff_t _j_offset = (ptrdiff_t)_J_offset * _out_ind.size();
  IndexT _J_stride = {block_size} >> __popc(_block_stride - 1);
  ptrdiff_t _j_stride = (ptrdiff_t)_J_stride * _out_ind.size();
  for (ptrdiff_t _i_base = (ptrdiff_t)blockIdx.x * _block_stride;
       _i_base < _out_ind.size();
       _i_base += (ptrdiff_t)gridDim.x * _block_stride) {{
    _type_reduce _s = _type_reduce({spec.identity});
    ptrdiff_t _i = _i_base + (_tid & (_block_stride - 1));
    IndexT _J = _J_offset;
    for (ptrdiff_t _j = _i + _j_offset; _j < _in_ind.size();
         _j += _j_stride, _J += _J_stride) {{
      _in_ind.set(_j);
      {" ".join(input_expr)}
      _type_reduce _a = static_cast<_type_reduce>({spec.map_expr});
      _s = REDUCE(_s, _a);
    }}
    _sdata[_tid] = _s;
    __syncthreads();
    for (unsigned int _block = {block_size} / 2; _block >= _block_stride; _block >>= 1) {{
      if (_tid < _block) {{
        _REDUCE(_block);
      }}
      __syncthreads();
    }}
    if (_tid < _block_stride) {{
      _s = _sdata[_tid];
    }}
    if (_tid < _block_stride && _i < _out_ind.size()) {{
      _out_ind.set(static_cast<ptrdiff_t>(_i));
      {" ".join(output_expr)}
      POST_MAP(_s);
    }}
  }}
}}
#undef REDUCE
#undef POST_MAP
#undef _REDUCE
"""


def cuda_module(dtype: Any) -> str:
    """Every kernel and the reduction for `dtype`, each in its own namespace (as CuPy
    compiles each in its own module), in one .cu file."""
    ctype = ctype_of(dtype)
    parts = [CUDA_PRELUDE]
    for spec in KERNELS.values():
        parts.append(f"namespace {spec.name}_ns {{\n{cuda_elementwise_source(spec, ctype)}}}\n")
    parts.append(f"namespace {REDUCTION.name}_ns {{\n"
                 f"{cuda_reduction_source(REDUCTION, ctype)}}}\n")
    return "\n".join(parts)


def nvcc_command(source: Path, output: Path, archs: Sequence[int]) -> List[str]:
    """nvcc invocation that turns every warning into an error; same FMA policy as CuPy's."""
    cmd = ["nvcc", "-c", "-std=c++17", *kc.NVRTC_OPTIONS, "-Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra,-Werror"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd + ["-o", str(output), str(source)]


# ---------------------------------------------------------------- host C++

CPP_PRELUDE = r"""
#include <cmath>
#include <cstddef>
// CUDA spellings the operation strings may use, defined for the host.
#define __device__
#define __forceinline__ inline
using std::sqrt;
"""


def cpp_elementwise_source(spec: KernelSpec, ctype: str) -> str:
    """The operation string in a host loop, parameters bound as CuPy binds them."""
    ins, outs = parse_params(spec.in_params), parse_params(spec.out_params)
    params, binds = [], []
    for (t, n), const in [(p, True) for p in ins] + [(p, False) for p in outs]:
        c = "const " if const else ""
        if n in spec.scalars:
            params.append(f"{c}{t} {n}")
        else:
            params.append(f"{c}{t}* _raw_{n}")
            binds.append(f"{c}{t} &{n} = _raw_{n}[i];")
    params.append("const ptrdiff_t _n")
    body = "\n    ".join(binds + [spec.operation.replace("\n", "\n    ")])
    return (
        f"{_typedefs(ins + outs, ctype)}"
        f'extern "C" void {spec.name}({", ".join(params)}) {{\n'
        f"  for (ptrdiff_t i = 0; i < _n; ++i) {{\n    {body};\n  }}\n}}\n"
    )


def cpp_reduction_source(spec: ReductionSpec, ctype: str) -> str:
    """The reduction's expressions in a sequential host loop."""
    ins, outs = parse_params(spec.in_params), parse_params(spec.out_params)
    params, binds = [], []
    for t, n in ins:
        if n in spec.scalars:
            params.append(f"const {t} {n}")
        else:
            params.append(f"const {t}* _raw_{n}")
            binds.append(f"const {t} {n} = _raw_{n}[i];")
    for t, n in outs:
        params.append(f"{t}* _raw_{n}")
    out_binds = " ".join(f"{t} &{n} = _raw_{n}[0];" for t, n in outs)
    return f"""{_typedefs(ins + outs, ctype)}typedef {spec.reduce_type} _type_reduce;
#define REDUCE(a, b) ({spec.reduce_expr})
#define POST_MAP(a) ({spec.post_map_expr})
extern "C" void {spec.name}({", ".join(params)}, const ptrdiff_t _n) {{
  _type_reduce _s = _type_reduce({spec.identity});
  for (ptrdiff_t i = 0; i < _n; ++i) {{
    {" ".join(binds)}
    _type_reduce _a = static_cast<_type_reduce>({spec.map_expr});
    _s = REDUCE(_s, _a);
  }}
  {out_binds}
  POST_MAP(_s);
}}
#undef REDUCE
#undef POST_MAP
"""


def cpp_module(dtype: Any) -> str:
    ctype = ctype_of(dtype)
    parts = [CPP_PRELUDE]
    for spec in KERNELS.values():
        parts.append(f"namespace {spec.name}_ns {{\n{cpp_elementwise_source(spec, ctype)}}}\n")
    parts.append(f"namespace {REDUCTION.name}_ns {{\n"
                 f"{cpp_reduction_source(REDUCTION, ctype)}}}\n")
    return "\n".join(parts)


# Same floating-point policy as the Cython kernels (setup.py: -O3 -ffp-contract=off).
GXX_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off",
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
            raise RuntimeError(f"g++ failed on the kernel strings:\n{err.stderr}") from err
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


class Harness:
    """All of `optim._kernels_cuda`'s kernels for one dtype, executed on the host."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = numpy.dtype(dtype)
        self.lib = ctypes.CDLL(str(compile_shared(cpp_module(self.dtype))))
        self._scalar = ctypes.c_float if self.dtype == numpy.float32 else ctypes.c_double

    def call(self, spec: Spec, args: Sequence[Any]) -> None:
        """Run `spec` on positional `args` (in_params then out_params, as CuPy takes them)."""
        params = parse_params(spec.in_params) + parse_params(spec.out_params)
        if len(args) != len(params):
            raise TypeError(f"{spec.name} takes {len(params)} arguments, got {len(args)}")
        in_names = {n for _, n in parse_params(spec.in_params)}
        c_args: list = []
        size = None
        for (t, name), arg in zip(params, args):
            if name in spec.scalars:
                if isinstance(arg, numpy.ndarray):
                    raise TypeError(f"{spec.name}: {name} is a scalar parameter")
                c_args.append(self._scalar(arg) if t == "T" else ctypes.c_double(arg))
                continue
            if not isinstance(arg, numpy.ndarray) or not arg.flags.c_contiguous:
                raise TypeError(f"{spec.name}: {name} must be a C-contiguous numpy array")
            want = self.dtype if t == "T" else numpy.dtype({"double": "float64"}[t])
            if arg.dtype != want:
                raise TypeError(f"{spec.name}: {name} is {arg.dtype}, kernel type is {want}")
            if isinstance(spec, KernelSpec) or name in in_names:  # reduction outputs: 1
                if size is not None and arg.size != size:
                    raise ValueError(f"{spec.name}: {name} has {arg.size} elements, not {size}")
                size = arg.size
            c_args.append(arg.ctypes.data_as(ctypes.c_void_p))
        c_args.append(ctypes.c_ssize_t(size or 0))
        getattr(self.lib, spec.name)(*c_args)

    def update(self, spec: KernelSpec, args: Sequence[Any]) -> None:
        self.call(spec, args)

    def sum_squares(self, gradient: numpy.ndarray, weights: numpy.ndarray,
                    l2: float) -> float:
        out = numpy.zeros((), dtype=numpy.float64)
        self.call(REDUCTION, [numpy.ascontiguousarray(gradient),
                              numpy.ascontiguousarray(weights), self.dtype.type(l2), out])
        return float(out)


_harnesses: Dict[str, Harness] = {}
_lock = threading.Lock()


def harness(dtype: Any) -> Harness:
    """The (cached) harness for `dtype`."""
    key = numpy.dtype(dtype).name
    with _lock:
        if key not in _harnesses:
            _harnesses[key] = Harness(key)
        return _harnesses[key]


# ---------------------------------------------------------------- a fake device


class FakeDeviceArray(numpy.ndarray):
    """An array 'on the fake device': a NumPy array the NumPy backend must not accept."""


def to_fake_device(x: numpy.ndarray) -> FakeDeviceArray:
    return numpy.array(x, copy=True, order="C").view(FakeDeviceArray)


class HarnessBackend:
    """The optimizer's GPU backend protocol, with the CUDA kernels run by the harness.

    Launches go through `optim._kernels_cuda.plan_update`, exactly as `CupyBackend`'s
    do. `launches` records the kernel names, in order, for the tests.
    """

    name = "fake-device"

    def __init__(self) -> None:
        self.launches: List[str] = []
        self.moved_to_device = 0
        self.moved_to_host = 0

    def is_array(self, x: Any) -> bool:
        return isinstance(x, FakeDeviceArray)

    def _check(self, *arrays: Any) -> None:
        for a in arrays:
            if a is not None and not self.is_array(a):
                raise TypeError(f"fake device got a host array ({type(a).__name__})")

    def zeros_like(self, x: Any) -> FakeDeviceArray:
        self._check(x)
        return numpy.zeros(x.shape, dtype=x.dtype).view(FakeDeviceArray)

    def copy(self, x: Any) -> FakeDeviceArray:
        self._check(x)
        return numpy.array(x, copy=True).view(FakeDeviceArray)

    def to_host(self, x: Any) -> numpy.ndarray:
        self._check(x)
        self.moved_to_host += 1
        return numpy.array(x, copy=True, subok=False)

    def from_host(self, x: numpy.ndarray) -> FakeDeviceArray:
        if type(x) is not numpy.ndarray:
            raise TypeError(f"from_host takes a numpy.ndarray, got {type(x).__name__}")
        self.moved_to_device += 1
        return to_fake_device(x)

    def sum_squares(self, gradient: Any, weights: Any, l2: float) -> float:
        self._check(gradient, weights)
        self.launches.append(REDUCTION.name)
        return harness(weights.dtype).sum_squares(
            gradient.view(numpy.ndarray), weights.view(numpy.ndarray), l2)

    def update(self, kind: str, coefs: Dict[str, Any], weights: Any, gradient: Any,
               mom1: Any, mom2: Any, average: Any, slow: Any) -> None:
        self._check(weights, gradient, mom1, mom2, average, slow)
        spec, args = kc.plan_update(kind, coefs, weights, gradient, mom1, mom2, average, slow)
        self.launches.append(spec.name)
        host_args = [a.view(numpy.ndarray) if isinstance(a, numpy.ndarray) else a
                     for a in args]
        harness(weights.dtype).update(spec, host_args)


IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
