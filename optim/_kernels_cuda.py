"""GPU kernels: the fused updates of docs/numerics.md as one CUDA source per dtype.

`cuda_source(dtype)` is a `cupy.RawModule` source generated from small snippets, one
per formula, so the 16 update variants (sgd, adam, radam rectified / un-rectified;
averages on/off; lookahead sync on/off) cannot drift apart. Each variant becomes one
`__device__` function (`<name>_op`), used by both of its entry points:

* `<name>`: one tensor, the per-call scalars as kernel arguments (`double`, rounded to
  the arrays' type `T` in the kernel, as the CPU kernels round their `Coefs`);
* `<name>_many`: every tensor of a `step_many` group in one launch, through a tensor
  table and a chunk -> tensor table in device memory and one coefficient row per tensor.

Clipping adds one launch before the update: `optim_clip_norm` (one tensor) or
`optim_clip_norm_many` computes the sum of squares in the fixed order of
docs/numerics.md ("The clip norm": one warp per chunk of 4096 elements, 32 lanes, a
`__shfl_down_sync` tree), and the warp that completes a tensor's last chunk turns it
into the clip factor, in device memory, which the update reads. Nothing is ever read
back to the host, so updates queue on the stream without synchronising.

Nothing here needs CuPy to be read: the sources are plain strings, which the tests
compile with nvcc and execute on the host (tests/cuda_harness.py). CuPy is imported
lazily, when a kernel is first launched.
"""
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy

from . import _device, _kernels
from ._cuda_workspace import Workspace, next_epoch, refuse_capture

CUPY_HINT = (
    'optim\'s GPU path needs CuPy: pip install "thinc-optim[cuda12x]" '
    "(or thinc-optim[cuda11x] / thinc-optim[cuda13x], matching your CUDA version)"
)

# nvcc/NVRTC fuse a*b+c into FMAs by default; the CPU kernels are built with
# -ffp-contract=off. The update is memory-bound, so we keep the CPU's rounding instead.
NVRTC_OPTIONS: Tuple[str, ...] = ("--fmad=false",)

NORM_CHUNK = _kernels.NORM_ORDER["chunk"]  # docs/numerics.md, "The clip norm"
NORM_LANES = _kernels.NORM_ORDER["lanes"]
COEFS: Tuple[str, ...] = _kernels.DEVICE_COEFS  # the double scalars of one update
ROW = _kernels.DEVICE_ROW  # a step_many coefficient row: COEFS, then the clip factor
CLIP_SLOT = ROW - 1
BLOCK = 256  # threads per block (8 warps); the results do not depend on it
TENSOR_FIELDS: Tuple[str, ...] = ("w", "g", "m", "v", "avg", "slow", "n", "first_chunk")

# The kernels' scalars, in type T, and how each is formed from the double coefficient
# row `c` (COEFS order) and the clip factor: `1 - beta` and `1 - avg_keep` in double,
# then rounded, exactly as the CPU kernels form them.
SCALARS: Tuple[str, ...] = (
    "lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "l2",
    "clip_scale", "pre_decay", "post_decay", "avg_rate", "la_alpha",
)
_C = {name: f"c[OPTIM_C_{name.upper()}]" for name in COEFS}
SCALAR_FORMS: Dict[str, str] = {
    "lr": f"T({_C['lr']})",
    "beta1": f"T({_C['beta1']})",
    "beta2": f"T({_C['beta2']})",
    "one_minus_beta1": f"T(1.0 - {_C['beta1']})",
    "one_minus_beta2": f"T(1.0 - {_C['beta2']})",
    "eps": f"T({_C['eps']})",
    "l2": f"T({_C['l2']})",
    "clip_scale": "T(clip)",
    "pre_decay": f"T({_C['pre_decay']})",
    "post_decay": f"T({_C['post_decay']})",
    "avg_rate": f"T(1.0 - {_C['avg_keep']})",
    "la_alpha": f"T({_C['la_alpha']})",
}
ARRAYS: Tuple[str, ...] = ("w", "g", "m", "v", "avg", "slow")


@dataclass(frozen=True)
class Snippet:
    """A piece of an update's operation and the parameters it reads or writes."""

    code: str
    scalars: Tuple[str, ...] = ()
    arrays: Tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """One update variant: its operation (per element, on references `w`, `g`, ...) and
    the scalars and arrays it uses, in `SCALARS` / `ARRAYS` order."""

    name: str
    operation: str
    scalars: Tuple[str, ...]
    arrays: Tuple[str, ...]


# ---------------------------------------------------------------- the formula snippets

_EFFECTIVE_GRADIENT = Snippet(
    "const T g_eff = (g + l2 * w) * clip_scale;", ("l2", "clip_scale"), ("w", "g")
)
_MOMENTS = Snippet(
    "m = beta1 * m + one_minus_beta1 * g_eff;\n"
    "v = beta2 * v + one_minus_beta2 * g_eff * g_eff;",
    ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2"), ("m", "v"),
)
_START = Snippet("T w_new = w;")
_PRE_DECAY = Snippet("w_new = w_new - pre_decay * w;", ("pre_decay",))
_STEP = "w_new = w_new - lr * ({direction});"
_DIRECTIONS: Dict[str, Snippet] = {
    "plain": Snippet("g_eff"),
    "adaptive": Snippet("m / (sqrt(v) + eps)", ("eps",)),
    "momentum": Snippet("m"),
}
_POST_DECAY = Snippet("w_new = w_new - post_decay * w_new;", ("post_decay",))
_ZERO_GRADIENT = Snippet("g = T(0);")
_LOOKAHEAD_SYNC = Snippet(
    "slow = slow + la_alpha * (w_new - slow);\nw_new = slow;", ("la_alpha",), ("slow",)
)
_STORE = Snippet("w = w_new;")
_AVERAGE = Snippet("avg = avg - avg_rate * (avg - w_new);", ("avg_rate",), ("avg",))

# base kernel -> (uses moments, uses pre-decay, direction)
_BASES: Dict[str, Tuple[bool, bool, str]] = {
    "sgd": (False, False, "plain"),
    "adam": (True, False, "adaptive"),
    "radam_rect": (True, True, "adaptive"),
    "radam_unrect": (True, True, "momentum"),
}


def kernel_name(kind: str, rectified: bool, averages: bool, lookahead: bool) -> str:
    """Name of the kernel for an update of `kind` ("sgd" | "adam" | "radam")."""
    if kind == "radam":
        base = "radam_rect" if rectified else "radam_unrect"
    elif kind in ("sgd", "adam"):
        base = kind
    else:
        raise ValueError(f"unknown update kind {kind!r}; expected sgd, adam or radam")
    return "optim_" + base + ("_avg" if averages else "") + ("_la" if lookahead else "")


def _compose(name: str, snippets: Sequence[Snippet]) -> KernelSpec:
    used_scalars = {s for snip in snippets for s in snip.scalars}
    used_arrays = {a for snip in snippets for a in snip.arrays}
    return KernelSpec(
        name=name,
        operation="\n".join(snip.code for snip in snippets if snip.code),
        scalars=tuple(s for s in SCALARS if s in used_scalars),
        arrays=tuple(a for a in ARRAYS if a in used_arrays),
    )


def _build_kernels() -> Dict[str, KernelSpec]:
    kernels: Dict[str, KernelSpec] = {}
    for base, (moments, pre_decay, direction) in _BASES.items():
        dir_snip = _DIRECTIONS[direction]
        step = Snippet(_STEP.format(direction=dir_snip.code), ("lr",) + dir_snip.scalars)
        for averages in (False, True):
            for lookahead in (False, True):
                parts: List[Snippet] = [_EFFECTIVE_GRADIENT]
                if moments:
                    parts.append(_MOMENTS)
                parts.append(_START)
                if pre_decay:
                    parts.append(_PRE_DECAY)
                parts += [step, _POST_DECAY, _ZERO_GRADIENT]
                if lookahead:
                    parts.append(_LOOKAHEAD_SYNC)
                parts.append(_STORE)
                if averages:
                    parts.append(_AVERAGE)
                name = "optim_" + base + ("_avg" if averages else "") + (
                    "_la" if lookahead else ""
                )
                kernels[name] = _compose(name, parts)
    return kernels


KERNELS: Dict[str, KernelSpec] = _build_kernels()


def variant_kernels(kind: str, averages: bool) -> Tuple[str, str, str, str]:
    """The 4 kernels of an optimizer, indexed by `device_coefs`' variant bits
    (rectified | lookahead_sync << 1)."""
    return tuple(kernel_name(kind, bool(bits & 1), averages, bool(bits & 2))  # type: ignore
                 for bits in range(4))


# ---------------------------------------------------------------- the CUDA source

# Entry points: name -> parameters (C type, name), in launch order. Python floats reach
# `double`, Python ints `long long`, arrays pointers (CuPy's RawKernel conventions).
Params = Tuple[Tuple[str, str], ...]

_COEF_PARAMS: Params = tuple(("double", name) for name in COEFS)
# `tickets`: one epoch-tagged completion counter per tensor (optim_finished_last_chunk);
# `epoch`: the launch's tag, 1 .. 2**32 - 1, a new one per launch (optim/_cuda_workspace.py).
_NORM_PARAMS: Params = (
    ("const T*", "g"), ("const T*", "w"), ("double", "l2"), ("double", "grad_clip"),
    ("long long", "n"), ("double*", "partials"), ("unsigned long long*", "tickets"),
    ("long long", "epoch"), ("double*", "clip"),
)
_NORM_MANY_PARAMS: Params = (
    ("const long long*", "tensors"), ("const int*", "chunk_tensor"), ("double*", "coefs"),
    ("double", "grad_clip"), ("long long", "n_chunks"), ("double*", "partials"),
    ("unsigned long long*", "tickets"), ("long long", "epoch"),
)
_MANY_PARAMS: Params = (
    ("const long long*", "tensors"), ("const int*", "chunk_tensor"),
    ("const double*", "coefs"), ("long long", "n_chunks"),
)


def update_params(spec: KernelSpec) -> Params:
    """The one-tensor kernel's parameters: every coefficient, the clip factor's address,
    the variant's arrays, the element count."""
    return _COEF_PARAMS + (("const double*", "clip_factor"),) + tuple(
        ("T*", "p_" + a) for a in spec.arrays) + (("long long", "n"),)


ENTRY_POINTS: Dict[str, Params] = {
    **{name: update_params(spec) for name, spec in KERNELS.items()},
    **{name + "_many": _MANY_PARAMS for name in KERNELS},
    "optim_clip_norm": _NORM_PARAMS,
    "optim_clip_norm_many": _NORM_MANY_PARAMS,
}


def _signature(name: str) -> str:
    params = ", ".join(f"{typ} {'__restrict__ ' if typ.endswith('*') else ''}{pname}"
                       for typ, pname in ENTRY_POINTS[name])
    return f'extern "C" __global__ void {name}({params})'


_COMMON = r"""
#define OPTIM_CHUNK {chunk}LL
#define OPTIM_LANES {lanes}
#define OPTIM_ROW {row}
#define OPTIM_CLIP_SLOT {clip_slot}
#define OPTIM_TENSOR_FIELDS {tensor_fields}
{coef_defines}

// Thread and warp coordinates, and the grid-stride loops every kernel uses: the
// results never depend on the grid or block size (a multiple of 32).
__device__ __forceinline__ long long optim_thread() {{
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}}
__device__ __forceinline__ long long optim_threads() {{
  return static_cast<long long>(gridDim.x) * blockDim.x;
}}
__device__ __forceinline__ long long optim_warp() {{ return optim_thread() / OPTIM_LANES; }}
__device__ __forceinline__ long long optim_warps() {{ return optim_threads() / OPTIM_LANES; }}
__device__ __forceinline__ unsigned int optim_lane() {{ return threadIdx.x % OPTIM_LANES; }}
__device__ __forceinline__ long long optim_chunk_len(long long n, long long start) {{
  return n - start < OPTIM_CHUNK ? n - start : OPTIM_CHUNK;
}}

// ---- the clip norm, in the order of docs/numerics.md ("The clip norm")

// The pairwise tree over a warp's lanes: lane[j] += lane[j + half], half = 16 .. 1.
// The total is in lane 0.
__device__ __forceinline__ double optim_lane_tree(double v) {{
  for (int half = OPTIM_LANES / 2; half > 0; half /= 2) {{
    v = v + __shfl_down_sync(0xffffffffu, v, half);
  }}
  return v;
}}

// One chunk (len <= OPTIM_CHUNK) of the sum of squares of the terms g + l2*w (coupled),
// or g alone: lane j adds the squares of elements j, j + 32, ... in order, each term
// formed in T and squared in double.
template <bool coupled>
__device__ __forceinline__ double optim_chunk_lanes(const T* g, const T* w, const T l2,
                                                    long long len) {{
  double lane_sum = 0.0;
  for (long long i = optim_lane(); i < len; i += OPTIM_LANES) {{
    const T term = coupled ? T(g[i] + l2 * w[i]) : g[i];
    const double x = static_cast<double>(term);
    lane_sum = lane_sum + x * x;
  }}
  return optim_lane_tree(lane_sum);
}}

// One chunk of the clip norm. l2 == 0 (L2 off or decoupled): the terms are g alone and
// w is not read, as Thinc adds L2 * weights only when L2 is coupled and not 0. l2 is
// the same in all of a warp's lanes (one tensor's), so the branch does not diverge.
__device__ __forceinline__ double optim_chunk_sum_squares(
    const T* g, const T* w, const double l2, long long len) {{
  if (l2 == 0.0) {{
    return optim_chunk_lanes<false>(g, w, T(0), len);
  }}
  return optim_chunk_lanes<true>(g, w, T(l2), len);
}}

// Count a finished chunk of a tensor (its sum already stored by lane 0); true in the
// warp that finished the tensor's last chunk. Integer atomics only.
// The ticket is (epoch << 32) | chunks counted. The first chunk of a launch to arrive
// finds another epoch there (0 after a completed launch, or anything a disturbance left)
// and starts the count afresh, so a disturbed ticket spoils no later launch: there is
// no state to reset and nothing for the host to do. The last warp leaves 0 (no launch
// has epoch 0), so a CUDA graph replaying one epoch twice starts afresh too.
__device__ __forceinline__ bool optim_finished_last_chunk(unsigned long long* ticket,
                                                           long long epoch,
                                                           long long n_chunks) {{
  __threadfence();  // the chunk sum is visible device-wide before it is counted
  unsigned int done = 0;
  if (optim_lane() == 0) {{
    const unsigned long long tag = static_cast<unsigned long long>(epoch) << 32;
    unsigned long long seen = __ldcg(ticket);
    for (;;) {{
      const unsigned long long next = (seen >> 32) == (tag >> 32) ? seen + 1ull : tag | 1ull;
      const unsigned long long was = atomicCAS(ticket, seen, next);
      if (was == seen) {{
        done = static_cast<unsigned int>(next & 0xffffffffull);
        break;
      }}
      seen = was;
    }}
  }}
  done = __shfl_sync(0xffffffffu, done, 0);
  return done == static_cast<unsigned int>(n_chunks);
}}

// The tensor's chunk sums, combined by the same rule: chunk k to lane k % 32, then
// the tree. Read from L2 (other warps wrote them).
__device__ __forceinline__ double optim_tensor_sum_squares(const double* partials,
                                                           long long n_chunks) {{
  __threadfence();
  double lane_sum = 0.0;
  for (long long k = optim_lane(); k < n_chunks; k += OPTIM_LANES) {{
    lane_sum = lane_sum + __ldcg(partials + k);
  }}
  return optim_lane_tree(lane_sum);
}}

// Thinc's rule, as optim._kernels.clip_factor: grad_clip / norm when norm >= grad_clip.
__device__ __forceinline__ double optim_clip_factor(double sumsq, double grad_clip) {{
  const double norm = sqrt(sumsq);
  if (grad_clip > 0.0 && norm >= grad_clip) {{
    return grad_clip / norm;
  }}
  return 1.0;
}}
"""

_NORM_KERNELS = r"""
{norm_signature} {{
  const long long n_chunks = (n + OPTIM_CHUNK - 1) / OPTIM_CHUNK;
  for (long long k = optim_warp(); k < n_chunks; k += optim_warps()) {{
    const long long start = k * OPTIM_CHUNK;
    const double sum = optim_chunk_sum_squares(g + start, w + start, l2,
                                               optim_chunk_len(n, start));
    if (optim_lane() == 0) {{
      partials[k] = sum;
    }}
    if (optim_finished_last_chunk(tickets, epoch, n_chunks)) {{
      const double total = optim_tensor_sum_squares(partials, n_chunks);
      if (optim_lane() == 0) {{
        clip[0] = optim_clip_factor(total, grad_clip);
        tickets[0] = 0ull;  // idle: any launch starts afresh (graph replays included)
      }}
    }}
  }}
}}

{norm_many_signature} {{
  for (long long k = optim_warp(); k < n_chunks; k += optim_warps()) {{
    const int t = chunk_tensor[k];
    const long long* tensor = tensors + static_cast<long long>(t) * OPTIM_TENSOR_FIELDS;
    const T* w = reinterpret_cast<const T*>(tensor[0]);
    const T* g = reinterpret_cast<const T*>(tensor[1]);
    const long long n = tensor[6], first = tensor[7];
    const long long tensor_chunks = (n + OPTIM_CHUNK - 1) / OPTIM_CHUNK;
    const long long start = (k - first) * OPTIM_CHUNK;
    double* row = coefs + static_cast<long long>(t) * OPTIM_ROW;
    const double sum = optim_chunk_sum_squares(g + start, w + start, row[OPTIM_C_L2],
                                               optim_chunk_len(n, start));
    if (optim_lane() == 0) {{
      partials[k] = sum;
    }}
    if (optim_finished_last_chunk(tickets + t, epoch, tensor_chunks)) {{
      const double total = optim_tensor_sum_squares(partials + first, tensor_chunks);
      if (optim_lane() == 0) {{
        row[OPTIM_CLIP_SLOT] = optim_clip_factor(total, grad_clip);
        tickets[t] = 0ull;
      }}
    }}
  }}
}}
"""


def _indent(code: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in code.splitlines())


def _op_function(spec: KernelSpec) -> str:
    """The variant's `__device__` function: scalars formed from the row `c` and the clip
    factor, then the operation on references to the element's values."""
    refs = ", ".join(f"T& {a}" for a in spec.arrays)
    forms = "\n".join(f"const T {s} = {SCALAR_FORMS[s]};" for s in spec.scalars)
    return (
        f"__device__ __forceinline__ void {spec.name}_op("
        f"const double* c, const double clip, {refs}) {{\n"
        f"{_indent(forms, 2)}\n{_indent(spec.operation, 2)}\n}}\n"
    )


def _element_loop(spec: KernelSpec, pointer: str, first: str, end: str, step: str) -> str:
    """Load the element of every array, apply `<name>_op`, store every array."""
    loads = " ".join(f"T {a} = {pointer}{a}[i];" for a in spec.arrays)
    stores = " ".join(f"{pointer}{a}[i] = {a};" for a in spec.arrays)
    args = ", ".join(spec.arrays)
    return (f"for (long long i = {first}; i < {end}; i += {step}) {{\n"
            f"  {loads}\n  {spec.name}_op(c, clip, {args});\n  {stores}\n}}")


def _update_kernel(spec: KernelSpec) -> str:
    coefs = ", ".join(COEFS)
    loop = _element_loop(spec, "p_", "optim_thread()", "n", "optim_threads()")
    return (f"{_signature(spec.name)} {{\n"
            f"  const double c[{len(COEFS)}] = {{{coefs}}};\n"
            f"  const double clip = clip_factor[0];\n{_indent(loop, 2)}\n}}\n")


def _update_many_kernel(spec: KernelSpec) -> str:
    pointers = "\n".join(
        f"T* p_{a} = reinterpret_cast<T*>(tensor[{TENSOR_FIELDS.index(a)}]);"
        for a in spec.arrays)
    loop = _element_loop(spec, "p_", "start + threadIdx.x", "end", "blockDim.x")
    body = (
        "const int t = chunk_tensor[k];\n"
        "const long long* tensor = tensors + static_cast<long long>(t) * "
        "OPTIM_TENSOR_FIELDS;\n"
        f"{pointers}\n"
        "const long long n = tensor[6];\n"
        "const long long start = (k - tensor[7]) * OPTIM_CHUNK;\n"
        "const long long end = start + optim_chunk_len(n, start);\n"
        "const double* row = coefs + static_cast<long long>(t) * OPTIM_ROW;\n"
        "double c[OPTIM_ROW];  // in registers for the chunk's elements\n"
        "for (int j = 0; j < OPTIM_ROW; ++j) {\n"
        "  c[j] = row[j];\n"
        "}\n"
        "const double clip = c[OPTIM_CLIP_SLOT];\n"
        f"{loop}"
    )
    return (f"{_signature(spec.name + '_many')} {{\n"
            "  // one block per chunk of OPTIM_CHUNK elements of one tensor\n"
            "  for (long long k = blockIdx.x; k < n_chunks; k += gridDim.x) {\n"
            f"{_indent(body, 4)}\n  }}\n}}\n")


def cuda_source(dtype: Any) -> str:
    """The RawModule source for `dtype` (float32 or float64): every entry point."""
    ctype = {"float32": "float", "float64": "double"}[numpy.dtype(dtype).name]
    coef_defines = "\n".join(f"#define OPTIM_C_{name.upper()} {i}"
                             for i, name in enumerate(COEFS))
    parts = [
        f"// optim's GPU kernels for {numpy.dtype(dtype).name} (generated by "
        "optim/_kernels_cuda.py)",
        f"typedef {ctype} T;",
        _COMMON.format(chunk=NORM_CHUNK, lanes=NORM_LANES, row=ROW, clip_slot=CLIP_SLOT,
                       tensor_fields=len(TENSOR_FIELDS), coef_defines=coef_defines),
        _NORM_KERNELS.format(norm_signature=_signature("optim_clip_norm"),
                             norm_many_signature=_signature("optim_clip_norm_many")),
    ]
    for spec in KERNELS.values():
        parts += [_op_function(spec), _update_kernel(spec), _update_many_kernel(spec)]
    return "\n".join(parts)


# ---------------------------------------------------------------- launch geometry


def update_grid(n: int) -> int:
    """Blocks for a one-tensor update of n elements (grid-stride beyond this)."""
    return max(1, min((n + BLOCK - 1) // BLOCK, 65535))


def norm_grid(n_chunks: int) -> int:
    """Blocks for a clip norm over n_chunks chunks: one warp per chunk."""
    warps = BLOCK // NORM_LANES
    return max(1, min((n_chunks + warps - 1) // warps, 65535))


def n_chunks(n: int) -> int:
    return (n + NORM_CHUNK - 1) // NORM_CHUNK


# ---------------------------------------------------------------- CuPy

_cupy: Any = None


def _import_cupy() -> Any:
    """Import CuPy, or raise ImportError naming the extra to install."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as err:
            raise ImportError(CUPY_HINT) from err
        _cupy = cupy
    return _cupy


_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


class Plan:
    """One key's launch, prepared once: its state arrays (checked by identity at every
    call), dtype, size, geometry, device, the 4 kernels (loaded on that device) with their
    state arguments, and the key's own scratch memory (`_cuda_workspace.Workspace`)."""

    __slots__ = ("backend", "array_type", "dtype", "shape", "n", "m", "v", "avg", "slow",
                 "funcs", "many_funcs", "norm", "state_args", "grid", "n_chunks", "norm_grid",
                 "device", "workspace")

    def holds(self, m: Any, v: Any, avg: Any, slow: Any) -> bool:
        return self.m is m and self.v is v and self.avg is avg and self.slow is slow


class Batch:
    """A step_many group's tables on the device (tensor table, chunk -> tensor table,
    chunk sums, epoch-tagged tickets), rebuilt only when an address, a size, the group
    or the stream changes; `epoch` is the last clip norm launch's. The coefficient rows
    are uploaded at every call."""

    __slots__ = ("plans", "w_ptrs", "g_ptrs", "stream", "tensors", "chunk_tensor",
                 "partials", "tickets", "epoch", "n_chunks", "grid", "norm_grid")


class Expected:
    """Per tensor of a step_many call: its plan's dtype, shape and state arrays."""

    __slots__ = ("plans", "dtypes", "shapes", "m", "v", "avg", "slow", "device")

    def __init__(self, plans: List[Plan]) -> None:
        self.plans = list(plans)
        self.dtypes = [p.dtype for p in plans]
        self.shapes = [p.shape for p in plans]
        self.m = [p.m for p in plans]
        self.v = [p.v for p in plans]
        self.avg = [p.avg for p in plans]
        self.slow = [p.slow for p in plans]
        devices = {p.device for p in plans}
        self.device = devices.pop() if len(devices) == 1 else None  # None: mixed


class CupyBackend:
    """The optimizer's GPU backend: CuPy arrays, updated by `cuda_source`'s kernels.

    `cupy` may be another module with the same API (the tests pass a CPU emulation).
    """

    name = "cupy"

    def __init__(self, cupy: Any = None) -> None:
        self._cp = cupy
        # per device: a RawModule's functions are loaded on the device current at
        # get_function, and launch there only
        self._modules: Dict[Tuple[int, str], Any] = {}
        self._functions: Dict[Tuple[int, str, str], Any] = {}
        # CuPy keeps C-contiguity as an attribute; `flags` builds an object per access
        self._contiguous = operator.attrgetter("_c_contiguous")

    @property
    def cupy(self) -> Any:
        if self._cp is None:
            self._cp = _import_cupy()
        return self._cp

    def ensure_available(self) -> None:
        """Raise ImportError (naming the extra to install) unless CuPy imports."""
        self.cupy  # noqa: B018

    def is_array(self, x: Any) -> bool:
        if self._cp is None and not type(x).__module__.startswith("cupy"):
            return False  # keeps CuPy unimported for host arrays
        try:
            return isinstance(x, self.cupy.ndarray)
        except ImportError:
            return False

    def zeros_like(self, x: Any) -> Any:
        return self.cupy.zeros_like(x)

    def copy(self, x: Any) -> Any:
        return self.cupy.array(x, copy=True)

    def to_host(self, x: Any) -> numpy.ndarray:
        return self.cupy.asnumpy(x)

    def from_host(self, x: numpy.ndarray) -> Any:
        return self.cupy.ascontiguousarray(self.cupy.asarray(x))

    # ------------------------------------------------------------ kernels

    def module(self, dtype: Any, device: Optional[int] = None) -> Any:
        """The RawModule for `dtype` on `device` (default: the current one), built on
        first use; `device` must be current when its functions are first fetched."""
        key = (self._device() if device is None else device, numpy.dtype(dtype).name)
        mod = self._modules.get(key)
        if mod is None:
            mod = self.cupy.RawModule(code=cuda_source(key[1]), options=NVRTC_OPTIONS)
            self._modules[key] = mod
        return mod

    def function(self, dtype: Any, name: str, device: Optional[int] = None) -> Any:
        """Kernel `name` for `dtype`, loaded on `device` (default: the current one,
        which it must be)."""
        device = self._device() if device is None else device
        key = (device, numpy.dtype(dtype).name, name)
        func = self._functions.get(key)
        if func is None:
            if name not in ENTRY_POINTS:
                raise KeyError(f"no GPU kernel {name!r}")
            func = self._functions[key] = self.module(dtype, device).get_function(name)
        return func

    def _device(self) -> int:
        return self.cupy.cuda.runtime.getDevice()

    def refuse_capture(self, what: str) -> None:
        """RuntimeError if CuPy's current stream is capturing a CUDA graph: `what`
        allocates or uploads, which a graph cannot replay."""
        refuse_capture(self.cupy, what)

    # ------------------------------------------------------------ one tensor

    def plan(self, key: Any, kind: str, averages: bool, weights: Any, mom1: Any, mom2: Any,
             average: Any, slow: Any) -> Plan:
        """Prepare the launches of `key`, whose state arrays are given (validated here:
        device arrays of the weights' dtype, shape and device)."""
        device = _device_of(key, weights, self._device())
        state = {"m": mom1, "v": mom2, "avg": average, "slow": slow}
        for name, x in state.items():
            if x is not None:
                _check_state(key, name, x, weights, device, self)
        self.refuse_capture(f"key {key!r}: preparing its launch")
        names = variant_kernels(kind, averages)
        plan = Plan()
        plan.backend = self
        plan.array_type = type(weights)
        plan.dtype = weights.dtype
        plan.shape = weights.shape
        plan.n = int(weights.size)
        plan.m, plan.v, plan.avg, plan.slow = mom1, mom2, average, slow
        plan.device = device
        plan.funcs = tuple(self.function(plan.dtype, name, device) for name in names)
        plan.many_funcs = tuple(self.function(plan.dtype, name + "_many", device)
                                for name in names)
        plan.norm = self.function(plan.dtype, "optim_clip_norm", device)
        # None: a variant this key's state cannot run (lookahead weights missing)
        plan.state_args = tuple(
            None if any(state[a] is None for a in KERNELS[name].arrays[2:])
            else tuple(state[a] for a in KERNELS[name].arrays[2:]) for name in names)
        plan.grid = (update_grid(plan.n),)
        plan.n_chunks = n_chunks(plan.n)
        plan.norm_grid = (norm_grid(plan.n_chunks),)
        # the key's own scratch memory, sized now and kept while the plan lives
        plan.workspace = Workspace(self.cupy, plan.n_chunks)
        return plan

    def check(self, plan: Plan, key: Any, weights: Any, gradient: Any, device: int) -> None:
        """Raise unless weights and gradient fit the key's plan (dtype, shape, layout,
        device); touches nothing."""
        contiguous = self._contiguous
        if (weights.dtype != plan.dtype or gradient.dtype != plan.dtype
                or weights.shape != plan.shape or gradient.shape != plan.shape
                or not contiguous(weights) or not contiguous(gradient)):
            _check_arrays(key, weights, gradient, plan)
        if (weights.data.device_id != device or gradient.data.device_id != device
                or plan.device != device):
            _device_of(key, weights, device)
            _device_of(key, gradient, device)
            raise ValueError(f"key {key!r}: its state is on device {plan.device} but the "
                             f"current device is {device}; update it under "
                             f"`with cupy.cuda.Device({plan.device}):`")

    def launch(self, plan: Plan, hyper: Any, key: Any, weights: Any, gradient: Any, t: int,
               lr_scale: float) -> None:
        """One update of `key` from a plan: the clip norm (if clipping), then the update.
        Validates the arrays against the plan first; reads nothing back."""
        device = self.cupy.cuda.runtime.getDevice()
        self.check(plan, key, weights, gradient, device)
        coefs = _kernels.device_coefs(hyper, t, lr_scale, key)
        bits = coefs[0]
        state_args = plan.state_args[bits]
        if state_args is None:
            _missing_state(key, plan, bits)
        grad_clip = hyper.grad_clip
        ws = plan.workspace
        if grad_clip > 0.0:
            ws.epoch = epoch = next_epoch(ws.epoch)
            plan.norm(plan.norm_grid, _BLOCK,
                      (gradient, weights, coefs[5], grad_clip, plan.n, ws.partials,
                       ws.tickets, epoch, ws.clip))
            clip = ws.clip
        else:
            clip = ws.one
        plan.funcs[bits](plan.grid, _BLOCK,
                         coefs[1:] + (clip, weights, gradient) + state_args + (plan.n,))

    # ------------------------------------------------------------ many tensors

    def launch_many(self, batches: Dict[Any, Any], hyper: Any, keys: List[Any],
                    weights: List[Any], gradients: List[Any], plans: List[Plan],
                    counts: List[int], lr_scale: float) -> None:
        """Update many keys: one launch per group sharing dtype and kernel (plus one
        clip norm launch per group when clipping). `batches` caches the groups' tables.
        Every array is checked against its key's plan before anything is launched."""
        n = len(keys)
        if n == 0:
            return
        device = self.cupy.cuda.runtime.getDevice()
        self.refuse_capture("step_many")
        expected = self.expected(batches, plans)
        dtypes = expected.dtypes
        w_ptrs = _device.array_pointers(weights, dtypes, expected.shapes, device)
        g_ptrs = _device.array_pointers(gradients, dtypes, expected.shapes, device)
        if w_ptrs is None or g_ptrs is None or expected.device != device:
            for plan, key, w, g in zip(plans, keys, weights, gradients):
                self.check(plan, key, w, g, device)  # raises the error of the first misfit
            raise AssertionError("array_pointers and check disagree")  # pragma: no cover
        table = numpy.empty((n, ROW), dtype=numpy.float64)
        variants = numpy.empty(n, dtype=numpy.uint8)
        _kernels.device_coef_table(hyper, keys, counts, lr_scale, table, variants)
        stream = (device, self.cupy.cuda.get_current_stream().ptr)
        if variants.min() == variants.max() and dtypes.count(dtypes[0]) == n:
            groups = {(dtypes[0].name, int(variants[0])): None}  # the usual case: one group
        else:
            groups = {}
            for i in range(n):
                groups.setdefault((dtypes[i].name, int(variants[i])), []).append(i)
        for (dtype, bits), members in groups.items():
            if members is None:
                g_plans, g_w, g_g, rows = plans, w_ptrs, g_ptrs, table
            else:
                pick = operator.itemgetter(*members)
                g_plans, g_w, g_g = (_picked(pick, x) for x in (plans, w_ptrs, g_ptrs))
                rows = table[members]
            for plan in g_plans:
                if plan.state_args[bits] is None:
                    _missing_state(keys[plans.index(plan)], plan, bits)
            # a dtype's tensors in one group (the usual case) keep one set of tables
            # whatever the kernel (e.g. lookahead sync steps)
            one_group = sum(1 for d, _ in groups if d == dtype) == 1
            batch = self._batch(batches, dtype if one_group else (dtype, bits), g_plans, g_w,
                                g_g, stream)
            # CuPy stages a host array through pinned memory and copies it on the current
            # stream: the copy neither waits for the device nor blocks the host
            coefs = self.cupy.asarray(rows)
            if hyper.grad_clip > 0.0:
                batch.epoch = epoch = next_epoch(batch.epoch)
                self.function(dtype, "optim_clip_norm_many", device)(
                    batch.norm_grid, _BLOCK,
                    (batch.tensors, batch.chunk_tensor, coefs, hyper.grad_clip,
                     batch.n_chunks, batch.partials, batch.tickets, epoch))
            g_plans[0].many_funcs[bits](
                batch.grid, _BLOCK, (batch.tensors, batch.chunk_tensor, coefs, batch.n_chunks))

    @staticmethod
    def expected(batches: Dict[Any, Any], plans: List[Plan]) -> "Expected":
        """What step_many's arrays and state must be, per tensor, for these plans
        (cached in `batches` while the list of plans is the same)."""
        expected = batches.get("expected")
        if expected is None or expected.plans != plans:
            expected = batches["expected"] = Expected(plans)
        return expected

    def _batch(self, batches: Dict[Any, Any], slot: Any, plans: List[Plan], w_ptrs: List[int],
               g_ptrs: List[int], stream: Tuple[int, int]) -> Batch:
        """The group's cached tables, rebuilt when an address, size or stream changed."""
        batch = batches.get(slot)
        if (batch is not None and batch.stream == stream and batch.w_ptrs == w_ptrs
                and batch.g_ptrs == g_ptrs and batch.plans == plans):
            return batch
        cp = self.cupy
        n = len(plans)
        tensors = numpy.zeros((n, len(TENSOR_FIELDS)), dtype=numpy.int64)
        chunks = numpy.fromiter((p.n_chunks for p in plans), dtype=numpy.int64, count=n)
        first = numpy.zeros(n, dtype=numpy.int64)
        numpy.cumsum(chunks[:-1], out=first[1:])
        tensors[:, 0] = w_ptrs
        tensors[:, 1] = g_ptrs
        for j, name in enumerate(("m", "v", "avg", "slow"), 2):
            tensors[:, j] = [0 if x is None else x.data.ptr
                             for x in map(operator.attrgetter(name), plans)]
        tensors[:, 6] = [p.n for p in plans]
        tensors[:, 7] = first
        total = int(chunks.sum())
        batch = Batch()
        batch.plans, batch.w_ptrs, batch.g_ptrs, batch.stream = list(plans), w_ptrs, g_ptrs, stream
        batch.tensors = cp.asarray(tensors)
        batch.chunk_tensor = cp.asarray(
            numpy.repeat(numpy.arange(n, dtype=numpy.int32), chunks))
        batch.partials = cp.empty(max(total, 1), dtype=numpy.float64)
        batch.tickets = cp.zeros(n, dtype=numpy.uint64)
        batch.epoch = 0
        batch.n_chunks = total
        batch.grid = (max(1, min(total, 1 << 20)),)
        batch.norm_grid = (norm_grid(total),)
        batches[slot] = batch
        return batch


_BLOCK = (BLOCK,)


def _picked(pick: Any, items: List[Any]) -> List[Any]:
    got = pick(items)
    return list(got) if isinstance(got, tuple) else [got]


def _check_arrays(key: Any, weights: Any, gradient: Any, plan: Plan) -> None:
    """The clear error for arrays that do not fit the key's plan (state on the device)."""
    check_device_pair(key, weights, gradient)
    if weights.dtype != plan.dtype:
        raise TypeError(f"key {key!r}: weights are {weights.dtype} but this key's state is "
                        f"{plan.dtype}")
    if weights.shape != plan.shape:
        raise ValueError(f"key {key!r}: weights have shape {tuple(weights.shape)}, but this "
                         f"key was updated with shape {tuple(plan.shape)} before")


def _missing_state(key: Any, plan: Plan, bits: int) -> None:
    name = plan.funcs[bits]
    raise ValueError(f"key {key!r}: this update needs state the key does not have "
                     f"({getattr(name, 'name', name)}: lookahead weights)")


def _device_of(key: Any, x: Any, device: int) -> int:
    """The device of array `x`, which must be the current one (kernels launch there)."""
    if x.data.device_id != device:
        raise ValueError(f"key {key!r}: the array is on device {x.data.device_id} but the "
                         f"current device is {device}; update it under "
                         f"`with cupy.cuda.Device({x.data.device_id}):`")
    return device


def _check_state(key: Any, name: str, x: Any, weights: Any, device: int, backend: Any) -> None:
    """A state array must be a device array like the weights (dtype, shape, device)."""
    if not backend.is_array(x):
        raise TypeError(f"key {key!r}: the optimizer's {name} is a {type(x).__name__}, not a "
                        "device array; call optimizer.to_gpu() first")
    if x.dtype != weights.dtype:
        raise TypeError(f"key {key!r}: the optimizer's {name} is {x.dtype} but the weights "
                        f"are {weights.dtype}")
    if x.shape != weights.shape or not x.flags.c_contiguous:
        raise ValueError(f"key {key!r}: the optimizer's {name} has shape {x.shape}, the "
                         f"weights {weights.shape}")
    _device_of(key, x, device)


def check_device_pair(key: Any, weights: Any, gradient: Any) -> None:
    """Validate a device update's weights and gradient (dtype, contiguity, shape)."""
    for what, x in (("weights", weights), ("gradient", gradient)):
        kind = str(x.dtype)
        if kind == "float16":
            raise TypeError(f"key {key!r}: {what} is float16; keep a float32 master copy")
        if kind not in ("float32", "float64"):
            raise TypeError(f"key {key!r}: {what} must be float32 or float64, got {kind}")
        if not x.flags.c_contiguous:
            raise ValueError(f"key {key!r}: {what} must be C-contiguous")
    if weights.dtype != gradient.dtype:
        raise TypeError(f"key {key!r}: gradient is {gradient.dtype} but weights are "
                        f"{weights.dtype}")
    if weights.shape != gradient.shape:
        raise ValueError(f"key {key!r}: gradient has shape {gradient.shape}, weights have "
                         f"shape {weights.shape}")
