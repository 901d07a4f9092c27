"""GPU kernels: the fused updates of docs/numerics.md as CuPy kernel strings.

Every update is ONE `cupy.ElementwiseKernel` launch over the parameter (plus one
`cupy.ReductionKernel` launch for the gradient's sum of squares when clipping is on).
The operation strings are composed from small snippets, one source per formula, so the
16 variants (sgd, adam, radam rectified / un-rectified; averages on/off; lookahead sync
on/off) cannot drift apart. All arithmetic is in the kernels' type `T` (float32 or
float64); the per-call scalars are kernel parameters of type `T`.

Nothing here needs CuPy to be read: `KERNELS` and `REDUCTION` are plain data, which the
tests compile with nvcc and execute on the CPU with g++ (tests/cuda_harness.py).
CuPy is imported lazily, when a kernel is first built.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy

CUPY_HINT = (
    'optim\'s GPU path needs CuPy: pip install "optim[cuda12x]" '
    "(or optim[cuda11x] / optim[cuda13x], matching your CUDA version)"
)

# nvcc/NVRTC fuse a*b+c into FMAs by default; the CPU kernels are built with
# -ffp-contract=off. The update is memory-bound, so we keep the CPU's rounding instead.
NVRTC_OPTIONS: Tuple[str, ...] = ("--fmad=false",)

# Canonical parameter orders: a kernel's scalars, then its arrays, in these orders.
SCALARS: Tuple[str, ...] = (
    "lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "l2",
    "clip_scale", "pre_decay", "post_decay", "avg_rate", "la_alpha",
)
# Scalars that are not `Coefs` fields: formed from them in double on the host, then
# rounded to T, exactly as the CPU kernels form them (a float32 `1 - beta` is biased).
DERIVED: Dict[str, Callable[[Dict[str, Any]], float]] = {
    "one_minus_beta1": lambda c: 1.0 - float(c["beta1"]),
    "one_minus_beta2": lambda c: 1.0 - float(c["beta2"]),
    "avg_rate": lambda c: 1.0 - float(c["avg_keep"]),
}
ARRAYS: Tuple[str, ...] = ("w", "g", "m", "v", "avg", "slow")


@dataclass(frozen=True)
class Snippet:
    """A piece of an operation string and the parameters it reads or writes."""

    code: str
    scalars: Tuple[str, ...] = ()
    arrays: Tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """Everything `cupy.ElementwiseKernel(in_params, out_params, operation, name)` takes.

    `in_params` are the scalars (passed by value), `out_params` the arrays, all updated
    in place (read and written through CuPy's `T &name = _raw_name[_ind.get()]`).
    """

    name: str
    in_params: str
    out_params: str
    operation: str
    scalars: Tuple[str, ...]
    arrays: Tuple[str, ...]


@dataclass(frozen=True)
class ReductionSpec:
    """Everything `cupy.ReductionKernel` takes; `scalars` names the by-value in_params."""

    name: str
    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    reduce_type: str
    scalars: Tuple[str, ...]


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
    scalars = tuple(s for s in SCALARS if s in used_scalars)
    arrays = tuple(a for a in ARRAYS if a in used_arrays)
    return KernelSpec(
        name=name,
        in_params=", ".join(f"T {s}" for s in scalars),
        out_params=", ".join(f"T {a}" for a in arrays),
        operation="\n".join(snip.code for snip in snippets if snip.code),
        scalars=scalars,
        arrays=arrays,
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

# sum((g + l2*w)**2): each term formed in T (as the CPU kernel does), squared and summed
# in double.
REDUCTION = ReductionSpec(
    name="optim_sum_squares",
    in_params="T g, T w, T l2",
    out_params="float64 total",
    map_expr="double(g + l2 * w) * double(g + l2 * w)",
    reduce_expr="a + b",
    post_map_expr="total = a",
    identity="0",
    reduce_type="double",
    scalars=("l2",),
)


def plan_update(kind: str, coefs: Dict[str, Any], weights: Any, gradient: Any,
                mom1: Any, mom2: Any, average: Any, slow: Any) -> Tuple[KernelSpec, list]:
    """The kernel for one update and its positional arguments.

    Scalars come first (`DERIVED` ones formed in double), cast to the arrays' dtype
    (the kernels compute in `T`), then
    the arrays in `KernelSpec.arrays` order. Shared by `CupyBackend` and the tests'
    CPU harness, so both launch exactly the same thing.
    """
    dtype = numpy.dtype(weights.dtype)
    if dtype not in (numpy.float32, numpy.float64):
        raise TypeError(f"optim's GPU kernels update float32 or float64, got {dtype}")
    spec = KERNELS[
        kernel_name(kind, bool(coefs.get("rectified", False)), average is not None,
                    slow is not None)
    ]
    arrays = {"w": weights, "g": gradient, "m": mom1, "v": mom2, "avg": average,
              "slow": slow}
    args: list = [dtype.type(DERIVED[s](coefs) if s in DERIVED else coefs[s])
                  for s in spec.scalars]
    for a in spec.arrays:
        if arrays[a] is None:
            raise ValueError(f"kernel {spec.name} needs array {a!r}, got None")
        args.append(arrays[a])
    return spec, args


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


class CupyBackend:
    """The optimizer's GPU backend: CuPy arrays, updated by the kernels above."""

    name = "cupy"

    def __init__(self) -> None:
        self._kernels: Dict[str, Any] = {}
        self._reduction: Optional[Any] = None

    def ensure_available(self) -> None:
        """Raise ImportError (naming the extra to install) unless CuPy imports."""
        _import_cupy()

    def is_array(self, x: Any) -> bool:
        if not type(x).__module__.startswith("cupy"):
            return False  # keeps CuPy unimported for host arrays
        try:
            cupy = _import_cupy()
        except ImportError:
            return False
        return isinstance(x, cupy.ndarray)

    def zeros_like(self, x: Any) -> Any:
        return _import_cupy().zeros_like(x)

    def copy(self, x: Any) -> Any:
        return _import_cupy().array(x, copy=True)

    def to_host(self, x: Any) -> numpy.ndarray:
        return _import_cupy().asnumpy(x)

    def from_host(self, x: numpy.ndarray) -> Any:
        return _import_cupy().ascontiguousarray(_import_cupy().asarray(x))

    def kernel(self, name: str) -> Any:
        """The `cupy.ElementwiseKernel` called `name`, built on first use."""
        kern = self._kernels.get(name)
        if kern is None:
            cupy = _import_cupy()
            spec = KERNELS[name]
            kern = cupy.ElementwiseKernel(
                spec.in_params, spec.out_params, spec.operation, spec.name,
                no_return=True, options=NVRTC_OPTIONS,
            )
            self._kernels[name] = kern
        return kern

    def reduction(self) -> Any:
        """The `cupy.ReductionKernel` for the sum of squares, built on first use."""
        if self._reduction is None:
            cupy = _import_cupy()
            r = REDUCTION
            self._reduction = cupy.ReductionKernel(
                r.in_params, r.out_params, r.map_expr, r.reduce_expr, r.post_map_expr,
                r.identity, r.name, reduce_type=r.reduce_type, options=NVRTC_OPTIONS,
            )
        return self._reduction

    def sum_squares(self, gradient: Any, weights: Any, l2: float) -> float:
        """sum((g + l2*w)**2) over the array, accumulated in double (synchronises)."""
        total = self.reduction()(gradient, weights, gradient.dtype.type(l2))
        return float(total)

    def update(self, kind: str, coefs: Dict[str, Any], weights: Any, gradient: Any,
               mom1: Any, mom2: Any, average: Any, slow: Any) -> None:
        """One fused update, in place: one kernel launch."""
        spec, args = plan_update(kind, coefs, weights, gradient, mom1, mom2, average, slow)
        self.kernel(spec.name)(*args)
