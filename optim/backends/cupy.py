"""The CuPy backend: launches `optim._kernels_cuda`'s kernels on CuPy arrays.

`CupyBackend` compiles the generated sources into a `cupy.RawModule` per dtype and
device, prepares a `Plan` per key (its state arrays, geometry, kernels and scratch
memory, `optim._cuda_workspace`) and launches one tensor or a whole `step_many` group
(`Batch`: tensor and chunk tables in device memory) without reading anything back.
`check_device_pair` validates a pair of device arrays before anything is touched.
CuPy is imported when a kernel is first needed; the tests pass a CPU emulation of it.
"""
import operator
from typing import Any, Dict, List, Optional, Tuple

import numpy

from .. import _device, _kernels
from .._cuda_workspace import Workspace, next_epoch, refuse_capture
from .._kernels_cuda import (BLOCK, CUPY_HINT, ENTRY_POINTS, KERNELS, NVRTC_OPTIONS, ROW,
                             TENSOR_FIELDS, cuda_source, n_chunks, norm_grid, update_grid,
                             variant_kernels)
from ..hyperparams import shape_error

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
        raise ValueError(shape_error(key, weights.shape, plan.shape))


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
