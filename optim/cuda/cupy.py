"""The CuPy backend: launches `optim._kernels_cuda`'s kernels on CuPy arrays.

`CupyBackend` compiles the generated sources into a `cupy.RawModule` per dtype and
device, prepares a `Plan` per key (its state arrays, geometry, kernels and scratch
memory, `optim.cuda.workspace`) and launches one tensor's update without reading
anything back. `launch_many` (a whole `step_many` call: segments of tensors, their
tables in device memory, each tensor with its own coefficient row and status) is
`optim.cuda.engine`'s. `check_device_pair` validates a pair of device arrays
before anything is touched. CuPy is imported when a kernel is first needed; the tests
pass a CPU emulation of it.
"""
import operator
from typing import Any, Dict, Optional, Tuple

import numpy

from . import _tables
from .workspace import Workspace, next_epoch, refuse_capture
from .._kernels_cuda import (BLOCK, CUPY_HINT, ENTRY_POINTS, KERNELS, NVRTC_OPTIONS, n_chunks,
                             code_kernel, cuda_source, norm_grid, update_grid,
                             variant_kernels)
from ..settings.defaults import shape_error
from . import engine
from .engine import missing_state

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


class Plan:
    """One key's launch, prepared once: its state arrays (checked by identity at every
    call), dtype, size, geometry, device, the update kind and averages it was prepared
    for, the 4 kernels (loaded on that device) with their state arguments, and the key's
    own scratch memory (`workspace.Workspace`). A frozen key's plan holds whatever
    state the key has, uses none, and has no kernels nor scratch memory.

    `counter`: the key's update count on the device (skip mode; made at its first
    checked update, and handed on to the key's next plan); `solo`: the tables of its
    checked per-call updates (skip and raise modes run step_many's kernels on it)."""

    __slots__ = ("backend", "array_type", "dtype", "shape", "n", "m", "v", "avg", "slow",
                 "funcs", "many_funcs", "norm", "state_args", "grid", "n_chunks", "norm_grid",
                 "device", "workspace", "kind", "kind_code", "averages", "frozen", "counter",
                 "solo")

    def holds(self, m: Any, v: Any, avg: Any, slow: Any) -> bool:
        return self.m is m and self.v is v and self.avg is avg and self.slow is slow


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
        # step_many's: (device, dtype name, kernel code or None: the clip norm, averages)
        self._many: Dict[Tuple[int, str, Optional[int], bool], Any] = {}
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

    def many_kernel(self, dtype: str, device: int, code: Optional[int] = None,
                    averages: bool = False) -> Any:
        """step_many's kernel for dtype `dtype` (its name) on `device`: the update kernel
        whose `kernel_code` is `code`, or the clip norm (code None)."""
        key = (device, dtype, code, averages)
        func = self._many.get(key)
        if func is None:
            name = ("optim_clip_norm_many" if code is None
                    else code_kernel(code, averages) + "_many")
            func = self._many[key] = self.function(dtype, name, device)
        return func

    def _device(self) -> int:
        return self.cupy.cuda.runtime.getDevice()

    def refuse_capture(self, what: str) -> None:
        """RuntimeError if CuPy's current stream is capturing a CUDA graph: `what`
        allocates or uploads, which a graph cannot replay."""
        refuse_capture(self.cupy, what)

    def add_counter(self, plan: Plan) -> Any:
        """Give `plan` its device update count (skip mode): one int64 on its device, set
        by the first launch that uses it (its row's `counter` slot), never by the host."""
        with self.cupy.cuda.Device(plan.device):
            plan.counter = self.cupy.empty(1, dtype=numpy.int64)
        return plan.counter

    def zero_gradient(self, plan: Plan, key: Any, weights: Any, gradient: Any) -> None:
        """A frozen key's per-call update: validated against its plan, the gradient
        zeroed (one fill on the current stream), nothing else touched."""
        self.check(plan, key, weights, gradient, self.cupy.cuda.runtime.getDevice())
        gradient.fill(0)

    # ------------------------------------------------------------ one tensor

    def plan(self, key: Any, kind: str, averages: bool, weights: Any, mom1: Any, mom2: Any,
             average: Any, slow: Any, frozen: bool = False) -> Plan:
        """Prepare the launches of `key`, whose state arrays are given (validated here:
        device arrays of the weights' dtype, shape and device). `frozen`: the key's
        updates only zero its gradient (its state, whatever it is, is held, not used)."""
        device = _device_of(key, weights, self._device())
        state = {"m": mom1, "v": mom2, "avg": average, "slow": slow}
        if not frozen:
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
        plan.kind, plan.kind_code = kind, _tables.DEVICE_KINDS.index(kind)
        plan.averages, plan.frozen = bool(averages), bool(frozen)
        plan.counter, plan.solo = None, {}
        plan.n_chunks = n_chunks(plan.n)
        if frozen:
            plan.funcs = plan.many_funcs = ()
            plan.norm = plan.workspace = None
            plan.state_args = (None,) * 4
            plan.grid, plan.norm_grid = (update_grid(plan.n),), (norm_grid(plan.n_chunks),)
            return plan
        plan.funcs = tuple(self.function(plan.dtype, name, device) for name in names)
        plan.many_funcs = tuple(self.function(plan.dtype, name + "_many", device)
                                for name in names)
        plan.norm = self.function(plan.dtype, "optim_clip_norm", device)
        # None: a variant this key's state cannot run (lookahead weights missing)
        plan.state_args = tuple(
            None if any(state[a] is None for a in KERNELS[name].arrays[2:])
            else tuple(state[a] for a in KERNELS[name].arrays[2:]) for name in names)
        plan.grid = (update_grid(plan.n),)
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
        coefs = _tables.device_coefs(hyper, t, lr_scale, key)
        bits = coefs[0]
        state_args = plan.state_args[bits]
        if state_args is None:
            missing_state(key, variant_kernels(plan.kind, plan.averages)[bits])
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

    # step_many: optim.cuda.engine (its tables are cached in the caller's dict)
    launch_many = engine.launch_many
    expected = staticmethod(engine.expected)


_BLOCK = (BLOCK,)


def _check_arrays(key: Any, weights: Any, gradient: Any, plan: Plan) -> None:
    """The clear error for arrays that do not fit the key's plan (state on the device)."""
    check_device_pair(key, weights, gradient)
    if weights.dtype != plan.dtype:
        raise TypeError(f"key {key!r}: weights are {weights.dtype} but this key's state is "
                        f"{plan.dtype}")
    if weights.shape != plan.shape:
        raise ValueError(shape_error(key, weights.shape, plan.shape))


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
