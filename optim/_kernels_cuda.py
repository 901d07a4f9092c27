"""GPU kernels: the fused updates of docs/numerics.md as one CUDA source per dtype.

`cuda_source(dtype)` is a `cupy.RawModule` source generated from small snippets, one
per formula, so the 16 update variants (sgd, adam, radam rectified / un-rectified;
averages on/off; lookahead sync on/off) cannot drift apart. Each variant becomes one
`__device__` function (`<name>_op`), used by both of its entry points:

* `<name>`: one tensor, the per-call scalars as kernel arguments (`double`, rounded to
  the arrays' type `T` in the kernel, as the CPU kernels round their `Coefs`);
* `<name>_many`: every tensor of a `step_many` segment in one launch, through a tensor
  table and a chunk -> tensor table in device memory and one coefficient row per tensor.

Clipping adds one launch before the update: `optim_clip_norm` (one tensor) or
`optim_clip_norm_many` computes the sum of squares in the fixed order of
docs/numerics.md ("The clip norm": one warp per chunk of 4096 elements, 32 lanes, a
`__shfl_down_sync` tree), and the warp that completes a tensor's last chunk turns it
into the clip factor, in device memory, which the update reads. Nothing is ever read
back to the host, so updates queue on the stream without synchronising.

Nothing here needs CuPy: the sources are plain strings, which the tests compile with
nvcc and execute on the host (tests/cuda_harness.py). `optim.cuda.cupy` compiles
and launches them.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy

from .cuda import _tables
from . import _kernels

CUPY_HINT = (
    'optim\'s GPU path needs CuPy: pip install "thinc-optim[cuda12x]" '
    "(or thinc-optim[cuda11x] / thinc-optim[cuda13x], matching your CUDA version)"
)

# nvcc/NVRTC fuse a*b+c into FMAs by default; the CPU kernels are built with
# -ffp-contract=off. The update is memory-bound, so we keep the CPU's rounding instead.
NVRTC_OPTIONS: Tuple[str, ...] = ("--fmad=false",)

NORM_CHUNK = _kernels.NORM_ORDER["chunk"]  # docs/numerics.md, "The clip norm"
NORM_LANES = _kernels.NORM_ORDER["lanes"]
COEFS: Tuple[str, ...] = _tables.DEVICE_COEFS  # the double scalars of one update
# A step_many coefficient row: COEFS, then the per-tensor slots of
# _tables.DEVICE_SLOTS (clip factor, grad_clip, status, check, kernel, t, pick, extra,
# window, counter; what each means is written there).
SLOTS: Tuple[str, ...] = _tables.DEVICE_SLOTS
ROW = _tables.DEVICE_ROW
SLOT: Dict[str, int] = {name: len(COEFS) + i for i, name in enumerate(SLOTS)}
CLIP_SLOT = SLOT["clip"]
# the status slot's values
GO, FROZEN, NAN, INF, OUT = (_tables.DEVICE_GO, _tables.DEVICE_FROZEN, _tables.DEVICE_NAN,
                             _tables.DEVICE_INF, _tables.DEVICE_OUT)
# the check slot's value for a tensor that does not check its gradient (a Hyper's
# nonfinite mode, optim._kernels.NONFINITE_*, as a double)
CHECK_APPLY = float(_kernels.NONFINITE_APPLY)
BLOCK = 256  # threads per block (8 warps); the results do not depend on it
# the tensor table: array addresses, size, first chunk, and the address of the key's
# update count on the device (0: none; skip mode only)
TENSOR_FIELDS: Tuple[str, ...] = ("w", "g", "m", "v", "avg", "slow", "n", "first_chunk",
                                  "count")

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


def kernel_code(name: str) -> int:
    """The row's `kernel` slot for kernel `name`: kind * 4 + variant bits
    (_tables.DEVICE_KINDS; bits = rectified | lookahead_sync << 1)."""
    base = name[len("optim_"):].replace("_avg", "").replace("_la", "")
    kind = base.split("_")[0]
    bits = (1 if base == "radam_rect" else 0) | (2 if name.endswith("_la") else 0)
    return _tables.DEVICE_KINDS.index(kind) * 4 + bits


def code_kernel(code: int, averages: bool) -> str:
    """The kernel whose `kernel_code` is `code` (averages on or off)."""
    kind = _tables.DEVICE_KINDS[code // 4]
    return kernel_name(kind, bool(code & 1), averages, bool(code & 2))


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
# `epoch`: the launch's tag, 1 .. 2**32 - 1, a new one per launch (optim/workspace.py).
_NORM_PARAMS: Params = (
    ("const T*", "g"), ("const T*", "w"), ("double", "l2"), ("double", "grad_clip"),
    ("long long", "n"), ("double*", "partials"), ("unsigned long long*", "tickets"),
    ("long long", "epoch"), ("double*", "clip"),
)
# step_many's clip norm: each tensor's grad_clip is in its row; `statuses`: one double
# per tensor, its status copied for the host (skip and raise modes); `commit`: 0 only
# decides the statuses (raise mode's check), 1 also moves the device counts.
_NORM_MANY_PARAMS: Params = (
    ("const long long*", "tensors"), ("const int*", "chunk_tensor"), ("double*", "coefs"),
    ("double*", "statuses"), ("long long", "n_chunks"), ("double*", "partials"),
    ("unsigned long long*", "tickets"), ("long long", "epoch"), ("long long", "commit"),
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
#define OPTIM_NCOEFS {ncoefs}
{coef_defines}
{slot_defines}
// a row's status
#define OPTIM_GO {go!r}
#define OPTIM_FROZEN {frozen!r}
#define OPTIM_NAN {nan!r}
#define OPTIM_INF {inf!r}
#define OPTIM_OUT {out!r}
// a row's check: the Hyper's nonfinite mode; apply mode checks nothing
#define OPTIM_CHECK_APPLY {check_apply!r}
// a ticket's low 32 bits: chunks counted, and what the chunks' non-finite scans found
#define OPTIM_COUNT_MASK 0x3fffffffu
#define OPTIM_MARK_NAN 0x80000000u
#define OPTIM_MARK_INF 0x40000000u

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

// Count a finished chunk of a tensor (its sum already stored by lane 0), OR-ing `mark`
// (OPTIM_MARK_* bits) into the count; returns, in every lane, the ticket's low 32 bits
// after this chunk: the warp whose count reaches the tensor's chunks finished its last
// chunk, and sees every chunk's marks. Integer atomics only.
// The ticket is (epoch << 32) | marks | chunks counted. The first chunk of a launch to arrive
// finds another epoch there (0 after a completed launch, or anything a disturbance left)
// and starts the count afresh, so a disturbed ticket spoils no later launch: there is
// no state to reset and nothing for the host to do. The last warp leaves 0 (no launch
// has epoch 0), so a CUDA graph replaying one epoch twice starts afresh too.
__device__ __forceinline__ unsigned int optim_count_chunk(unsigned long long* ticket,
                                                          long long epoch,
                                                          unsigned int mark) {{
  __threadfence();  // the chunk sum is visible device-wide before it is counted
  unsigned int done = 0;
  if (optim_lane() == 0) {{
    const unsigned long long tag = static_cast<unsigned long long>(epoch) << 32;
    unsigned long long seen = __ldcg(ticket);
    for (;;) {{
      const unsigned long long next =
          ((seen >> 32) == (tag >> 32) ? seen + 1ull : tag | 1ull) | mark;
      const unsigned long long was = atomicCAS(ticket, seen, next);
      if (was == seen) {{
        done = static_cast<unsigned int>(next & 0xffffffffull);
        break;
      }}
      seen = was;
    }}
  }}
  return __shfl_sync(0xffffffffu, done, 0);
}}

__device__ __forceinline__ bool optim_finished_last_chunk(unsigned long long* ticket,
                                                           long long epoch,
                                                           long long n_chunks) {{
  return optim_count_chunk(ticket, epoch, 0u) == static_cast<unsigned int>(n_chunks);
}}

// The non-finite scan of one chunk, as the CPU's (optim._kernels.find_nonfinite): each
// term formed in T, g + l2*w when T(l2) != 0, else g; OPTIM_MARK_NAN if one is a NaN,
// OPTIM_MARK_INF if one is infinite, in lane 0. Run only on a chunk whose sum of
// squares is not finite: every chunk holding such a term is one, and a finite float64
// term whose square overflows is none.
__device__ __forceinline__ unsigned int optim_chunk_scan(const T* g, const T* w, const T l2,
                                                         long long len) {{
  double nans = 0.0, infs = 0.0;
  for (long long i = optim_lane(); i < len; i += OPTIM_LANES) {{
    const T x = l2 != T(0) ? T(g[i] + l2 * w[i]) : g[i];
    if (x != x) {{
      nans = 1.0;
    }} else if (x - x != T(0)) {{
      infs = 1.0;
    }}
  }}
  nans = optim_lane_tree(nans);
  infs = optim_lane_tree(infs);
  return (nans > 0.0 ? OPTIM_MARK_NAN : 0u) | (infs > 0.0 ? OPTIM_MARK_INF : 0u);
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
    double* row = coefs + static_cast<long long>(t) * OPTIM_ROW;
    const double check = row[OPTIM_S_CHECK];
    if (row[OPTIM_S_STATUS] == OPTIM_FROZEN ||
        (check == OPTIM_CHECK_APPLY && !(row[OPTIM_S_GRAD_CLIP] > 0.0))) {{
      continue;  // frozen, or neither clipped nor checked: the row keeps its factor 1.0
    }}
    const T* w = reinterpret_cast<const T*>(tensor[0]);
    const T* g = reinterpret_cast<const T*>(tensor[1]);
    const long long n = tensor[6], first = tensor[7];
    const long long tensor_chunks = (n + OPTIM_CHUNK - 1) / OPTIM_CHUNK;
    const long long start = (k - first) * OPTIM_CHUNK;
    const long long len = optim_chunk_len(n, start);
    const double l2 = row[OPTIM_C_L2];
    const double sum = optim_chunk_sum_squares(g + start, w + start, l2, len);
    if (optim_lane() == 0) {{
      partials[k] = sum;
    }}
    unsigned int mark = 0u;
    if (check != OPTIM_CHECK_APPLY) {{  // the same in all lanes (one tensor's row)
      const double chunk = __shfl_sync(0xffffffffu, sum, 0);
      if (!(chunk - chunk == 0.0)) {{
        mark = optim_chunk_scan(g + start, w + start, T(l2), len);
      }}
    }}
    const unsigned int word = optim_count_chunk(tickets + t, epoch, mark);
    if ((word & OPTIM_COUNT_MASK) == static_cast<unsigned int>(tensor_chunks)) {{
      const double total = optim_tensor_sum_squares(partials + first, tensor_chunks);
      if (optim_lane() == 0) {{
        row[OPTIM_CLIP_SLOT] = optim_clip_factor(total, row[OPTIM_S_GRAD_CLIP]);
        if (check != OPTIM_CHECK_APPLY) {{
          double status = (word & OPTIM_MARK_NAN) != 0u ? OPTIM_NAN
                          : ((word & OPTIM_MARK_INF) != 0u ? OPTIM_INF : OPTIM_GO);
          // skip mode: the key's update count lives on the device; this update is
          // count + 1 unless skipped, and runs the coefs of that count's window row
          long long* count = reinterpret_cast<long long*>(tensor[8]);
          const double counter = row[OPTIM_S_COUNTER];
          if (commit != 0 && count != nullptr && counter > -1.5) {{
            long long c = counter >= 0.0 ? static_cast<long long>(counter) : *count;
            if (status == OPTIM_GO) {{
              const long long j = c + 1 - static_cast<long long>(row[OPTIM_S_T]);
              if (j < 0 || j >= static_cast<long long>(row[OPTIM_S_WINDOW])) {{
                status = OPTIM_OUT;  // never by construction; refused, never a stray row
              }} else {{
                c = c + 1;
                row[OPTIM_S_PICK] = j == 0 ? static_cast<double>(t)
                                           : row[OPTIM_S_EXTRA] + static_cast<double>(j - 1);
              }}
            }}
            *count = c;
          }}
          row[OPTIM_S_STATUS] = status;
          statuses[t] = status;
        }}
        tickets[t] = 0ull;  // idle
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
        for a in spec.arrays if a != "g")
    loop = _element_loop(spec, "p_", "start + threadIdx.x", "end", "blockDim.x")
    body = (
        "const int t = chunk_tensor[k];\n"
        "const long long* tensor = tensors + static_cast<long long>(t) * "
        "OPTIM_TENSOR_FIELDS;\n"
        "T* p_g = reinterpret_cast<T*>(tensor[1]);\n"
        "const long long n = tensor[6];\n"
        "const long long start = (k - tensor[7]) * OPTIM_CHUNK;\n"
        "const long long end = start + optim_chunk_len(n, start);\n"
        "const double* home = coefs + static_cast<long long>(t) * OPTIM_ROW;\n"
        "if (home[OPTIM_S_STATUS] != OPTIM_GO) {\n"
        "  // frozen, or skipped (a NaN or an inf): only the gradient is zeroed, by the\n"
        "  // launch's kernel the tensor's own row names\n"
        "  if (home[OPTIM_S_KERNEL] == my_kernel) {\n"
        "    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {\n"
        "      p_g[i] = T(0);\n"
        "    }\n"
        "  }\n"
        "  continue;\n"
        "}\n"
        "// the row of the update's count (skip mode: picked by the clip norm kernel)\n"
        "const double* row = coefs + static_cast<long long>(home[OPTIM_S_PICK]) * OPTIM_ROW;\n"
        "if (row[OPTIM_S_KERNEL] != my_kernel) {\n"
        "  continue;  // another kernel of this launch runs that count\n"
        "}\n"
        f"{pointers}\n"
        "double c[OPTIM_NCOEFS];  // in registers for the chunk's elements\n"
        "for (int j = 0; j < OPTIM_NCOEFS; ++j) {\n"
        "  c[j] = row[j];\n"
        "}\n"
        "const double clip = home[OPTIM_CLIP_SLOT];\n"
        f"{loop}"
    )
    return (f"{_signature(spec.name + '_many')} {{\n"
            f"  const double my_kernel = {kernel_code(spec.name)}.0;  // kernel_code\n"
            "  // one block per chunk of OPTIM_CHUNK elements of one tensor\n"
            "  for (long long k = blockIdx.x; k < n_chunks; k += gridDim.x) {\n"
            f"{_indent(body, 4)}\n  }}\n}}\n")


def cuda_source(dtype: Any) -> str:
    """The RawModule source for `dtype` (float32 or float64): every entry point."""
    ctype = {"float32": "float", "float64": "double"}[numpy.dtype(dtype).name]
    coef_defines = "\n".join(f"#define OPTIM_C_{name.upper()} {i}"
                             for i, name in enumerate(COEFS))
    slot_defines = "\n".join(f"#define OPTIM_S_{name.upper()} {SLOT[name]}" for name in SLOTS)
    parts = [
        f"// optim's GPU kernels for {numpy.dtype(dtype).name} (generated by "
        "optim/_kernels_cuda.py)",
        f"typedef {ctype} T;",
        _COMMON.format(chunk=NORM_CHUNK, lanes=NORM_LANES, row=ROW, clip_slot=CLIP_SLOT,
                       tensor_fields=len(TENSOR_FIELDS), coef_defines=coef_defines,
                       ncoefs=len(COEFS), slot_defines=slot_defines, go=GO, frozen=FROZEN,
                       nan=NAN, inf=INF, out=OUT, check_apply=CHECK_APPLY),
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
