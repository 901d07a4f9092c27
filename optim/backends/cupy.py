"""The CuPy backend: launches `optim._kernels_cuda`'s kernels on CuPy arrays.

`CupyBackend` compiles the generated sources into a `cupy.RawModule` per dtype and
device, prepares a `Plan` per key (its state arrays, geometry, kernels and scratch
memory, `optim._cuda_workspace`) and launches one tensor or a whole `step_many` group
(`Batch`: tensor and chunk tables in device memory) without reading anything back.
Each tensor of a group has its own coefficient row (its own Hyper: a parameter group's
settings, grad_clip included) and status (frozen; the non-finite skip's verdict); in
skip mode the rows cover the counts the key may be at and the device picks the one its
count says (docs/gpu.md, "Groups and the non-finite skip").
`check_device_pair` validates a pair of device arrays before anything is touched.
CuPy is imported when a kernel is first needed; the tests pass a CPU emulation of it.
"""
import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy

from .. import _device
from .._cuda_workspace import Workspace, next_epoch, refuse_capture
from .._kernels_cuda import (BLOCK, CUPY_HINT, ENTRY_POINTS, GO, KERNELS, NAN,
                             NVRTC_OPTIONS, ROW, SLOT, TENSOR_FIELDS, code_kernel,
                             cuda_source, n_chunks, norm_grid, update_grid, variant_kernels)
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
    call), dtype, size, geometry, device, the update kind and averages it was prepared
    for, the 4 kernels (loaded on that device) with their state arguments, and the key's
    own scratch memory (`_cuda_workspace.Workspace`). A frozen key's plan holds whatever
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


class Batch:
    """A step_many group's tables on the device (tensor table, chunk -> tensor table,
    chunk sums, epoch-tagged tickets, the statuses the clip norm decides), rebuilt only
    when an address, a size, the group or the stream changes; `epoch` is the last clip
    norm launch's. The coefficient rows are uploaded at every call."""

    __slots__ = ("plans", "w_ptrs", "g_ptrs", "stream", "tensors", "chunk_tensor",
                 "partials", "tickets", "epoch", "n_chunks", "grid", "norm_grid", "statuses")


class Record:
    """What one launch's skip-mode tensors became (their statuses: GO, NAN or INF), copied
    into pinned host memory behind the launch on its stream, and the event recorded
    after the copy. `ready()` asks the event without waiting; `wait()` waits (a sync).
    `sources`: the device arrays copied from, kept until the copies are known done."""

    __slots__ = ("event", "host", "done", "sources")

    def __init__(self, event: Any, host: numpy.ndarray, sources: List[Any]) -> None:
        self.event, self.host, self.done, self.sources = event, host, False, sources

    def ready(self) -> bool:
        if not self.done:
            self.done = bool(self.event.done)
            if self.done:
                self.sources = None
        return self.done

    def wait(self) -> None:
        if not self.done:
            self.event.synchronize()
            self.done, self.sources = True, None


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
        plan.kind, plan.kind_code = kind, _device.DEVICE_KINDS.index(kind)
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
        coefs = _device.device_coefs(hyper, t, lr_scale, key)
        bits = coefs[0]
        state_args = plan.state_args[bits]
        if state_args is None:
            _missing_state(key, variant_kernels(plan.kind, plan.averages)[bits])
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

    def launch_many(self, batches: Dict[Any, Any], hypers: Any, keys: List[Any],
                    weights: List[Any], gradients: List[Any], plans: List[Plan],
                    counts: List[int], lr_scale: float,
                    windows: Optional[List[Optional[Tuple[int, int, int]]]] = None,
                    on_refused: Optional[Callable[[int, int], None]] = None
                    ) -> Optional[Tuple[Record, List[int]]]:
        """Update many keys: one launch per group of tensors sharing dtype and kernel (plus
        one clip norm launch per group when a tensor of it clips or checks). `batches`
        caches the groups' tables. Every array is checked against its key's plan before
        anything is launched.

        `hypers`: one Hyper per key (its group's settings: a row of its own, not a launch
        of its own), or one Hyper for all. A frozen key's gradient is zeroed by its
        group's launch. `counts[i]`: the update count of key i (for a skip-mode key with
        a window, the first count of its window). `windows[i]` (skip mode, None
        elsewhere): (first count, rows, counter) - the counts first .. first + rows - 1
        the key may be at, and what the device count starts from (-1: as it is; >= 0:
        this); the clip norm kernel picks the row. Returns (Record, position of each
        key's status in it) when a key has a window, else None. Raise mode (a Hyper with
        nonfinite 2): the statuses are read back before any update (a host read) and
        `on_refused(i, outcome)` is called for a refused key i, then FloatingPointError
        raised: nothing of the call is written."""
        n = len(keys)
        if n == 0:
            return None
        cp = self.cupy
        device = cp.cuda.runtime.getDevice()
        self.refuse_capture("step_many")
        expected = self.expected(batches, plans)
        dtypes = expected.dtypes
        w_ptrs = _device.array_pointers(weights, dtypes, expected.shapes, device)
        g_ptrs = _device.array_pointers(gradients, dtypes, expected.shapes, device)
        if w_ptrs is None or g_ptrs is None or expected.device != device:
            for plan, key, w, g in zip(plans, keys, weights, gradients):
                self.check(plan, key, w, g, device)  # raises the error of the first misfit
            raise AssertionError("array_pointers and check disagree")  # pragma: no cover
        # one row per key, then the window rows of skip-mode keys (counts + 1, + 2, ...)
        first_extra: Dict[int, int] = {}
        row_hypers, row_keys, row_counts = hypers, keys, counts
        if windows is not None:
            if not isinstance(hypers, list):
                hypers = [hypers] * n
            row_hypers, row_keys, row_counts = list(hypers), list(keys), list(counts)
            for i, win in enumerate(windows):
                if win is not None and win[1] > 1:
                    first_extra[i] = len(row_keys)
                    row_hypers += [hypers[i]] * (win[1] - 1)
                    row_keys += [keys[i]] * (win[1] - 1)
                    row_counts += [counts[i] + j for j in range(1, win[1])]
        table = numpy.empty((len(row_keys), ROW), dtype=numpy.float64)
        variants = numpy.empty(len(row_keys), dtype=numpy.uint8)
        mask = _device.device_coef_table(row_hypers, row_keys, row_counts, lr_scale, table,
                                          variants)
        counted = False
        if windows is not None:
            for i, win in enumerate(windows):
                if win is not None:
                    table[i, _WINDOW] = win[1]
                    table[i, _COUNTER] = win[2]
                    counted = True
        codes = table[:, _KERNEL]
        stream = (device, cp.cuda.get_current_stream().ptr)
        if not first_extra and not mask & 17 and dtypes.count(dtypes[0]) == n:
            # the usual case: one group (one dtype, one kernel, nobody frozen)
            groups: Dict[Any, Any] = {(dtypes[0].name, (int(codes[0]),)): None}
        else:
            groups = self._groups(n, dtypes, codes, table, first_extra, windows)
        # everything is checked before anything is launched
        launches = []
        for (dtype, kernels), members in groups.items():
            index = range(n) if members is None else members
            averages = self._check_kernels(kernels, index, keys, plans, table)
            if members is None:
                g_plans, g_w, g_g, rows = plans, w_ptrs, g_ptrs, table
                uses_norm = bool(mask & 14)
            else:
                pick = operator.itemgetter(*members)
                g_plans, g_w, g_g = (_picked(pick, x) for x in (plans, w_ptrs, g_ptrs))
                rows = _group_rows(table, members, first_extra, windows)
                head = rows[:len(members)]
                uses_norm = bool((head[:, _CHECK] != 0.0).any()
                                 or (head[:, _GRAD_CLIP] > 0.0).any())
            launches.append((dtype, kernels, averages, members, g_plans, g_w, g_g, rows,
                             uses_norm))
        # a dtype's tensors in one group (the usual case) keep one set of tables whatever
        # the kernel (e.g. lookahead sync steps)
        per_dtype: Dict[str, int] = {}
        for dtype, kernels, *_ in launches:
            per_dtype[dtype] = per_dtype.get(dtype, 0) + 1
        refusing = bool(mask & 4)
        ready = []
        for dtype, kernels, averages, members, g_plans, g_w, g_g, rows, uses_norm in launches:
            slot = dtype if per_dtype[dtype] == 1 else (dtype, kernels)
            batch = self._batch(batches, slot, g_plans, g_w, g_g, stream)
            # CuPy stages a host array through pinned memory and copies it on the current
            # stream: the copy neither waits for the device nor blocks the host
            coefs = cp.asarray(rows)
            if uses_norm and not refusing:
                self._norm(dtype, device, batch, coefs, 1)
            if refusing:
                ready.append((dtype, kernels, averages, members, batch, coefs, uses_norm))
                continue
            self._updates(dtype, device, kernels, averages, batch, coefs)
            ready.append((dtype, kernels, averages, members, batch, coefs, uses_norm))
        if refusing:
            # raise mode: the statuses are read back (a host read) before any update
            for dtype, kernels, averages, members, batch, coefs, uses_norm in ready:
                if uses_norm:
                    self._norm(dtype, device, batch, coefs, 0 if counted else 1)
            for dtype, kernels, averages, members, batch, coefs, uses_norm in ready:
                index = list(range(n)) if members is None else members
                if not any(table[i, _CHECK] == 2.0 for i in index):
                    continue
                statuses = self.to_host(batch.statuses)
                for j, i in enumerate(index):
                    if table[i, _CHECK] == 2.0 and statuses[j] != GO:
                        outcome = 1 if statuses[j] == NAN else 2
                        if on_refused is not None:
                            on_refused(i, outcome)
                        raise FloatingPointError(
                            f"key {keys[i]!r}: the gradient holds "
                            f"{'a NaN' if outcome == 1 else 'an infinity'}; nothing was "
                            "written (nonfinite='raise')")
            for dtype, kernels, averages, members, batch, coefs, uses_norm in ready:
                if uses_norm and counted:
                    self._norm(dtype, device, batch, coefs, 1)
                self._updates(dtype, device, kernels, averages, batch, coefs)
        if not counted:
            return None
        # skip mode: each group's statuses go to pinned host memory behind its launches,
        # then an event; the host reads them once the event has passed (never waits here)
        host = numpy.frombuffer(cp.cuda.alloc_pinned_memory(8 * n), numpy.float64, n)
        positions = [-1] * n
        sources = []
        stream_ptr = stream[1]
        offset = 0
        for dtype, kernels, averages, members, batch, coefs, uses_norm in ready:
            index = range(n) if members is None else members
            if not any(windows[i] is not None for i in index):
                continue
            m = len(index)
            cp.cuda.runtime.memcpyAsync(host.ctypes.data + 8 * offset, batch.statuses.data.ptr,
                                        8 * m, _DEVICE_TO_HOST, stream_ptr)
            sources.append(batch.statuses)
            for j, i in enumerate(index):
                positions[i] = offset + j
            offset += m
        event = cp.cuda.Event(block=False, disable_timing=True)
        event.record(cp.cuda.get_current_stream())
        return Record(event, host, sources), positions

    def _norm(self, dtype: str, device: int, batch: Batch, coefs: Any, commit: int) -> None:
        """The group's clip norm launch: clip factors, and the statuses of the tensors
        that check (commit: move the device counts too)."""
        batch.epoch = epoch = next_epoch(batch.epoch)
        self.function(dtype, "optim_clip_norm_many", device)(
            batch.norm_grid, _BLOCK,
            (batch.tensors, batch.chunk_tensor, coefs, batch.statuses, batch.n_chunks,
             batch.partials, batch.tickets, epoch, commit))

    def _updates(self, dtype: str, device: int, kernels: Tuple[int, ...], averages: bool,
                 batch: Batch, coefs: Any) -> None:
        """One launch per kernel the group's rows name (one but for a skip-mode window
        whose counts run different kernels)."""
        args = (batch.tensors, batch.chunk_tensor, coefs, batch.n_chunks)
        for code in kernels:
            self.function(dtype, code_kernel(code, averages) + "_many", device)(
                batch.grid, _BLOCK, args)

    @staticmethod
    def _groups(n: int, dtypes: List[Any], codes: numpy.ndarray, table: numpy.ndarray,
                first_extra: Dict[int, int],
                windows: Optional[List[Any]]) -> Dict[Any, List[int]]:
        """Tensors by (dtype, the kernels their rows name); a frozen tensor joins the first
        group of its dtype (or makes one), and its row names that group's first kernel,
        which zeroes its gradient."""
        groups: Dict[Any, List[int]] = {}
        frozen = []
        for i in range(n):
            if table[i, _STATUS] == _FROZEN:
                frozen.append(i)
                continue
            kernels: Tuple[int, ...] = (int(codes[i]),)
            if i in first_extra:
                start = first_extra[i]
                window = codes[start:start + windows[i][1] - 1]
                kernels = tuple(sorted({int(codes[i]), *map(int, window)}))
            groups.setdefault((dtypes[i].name, kernels), []).append(i)
        for i in frozen:
            name = dtypes[i].name
            target = next((g for g in groups if g[0] == name), None)
            if target is None:
                target = (name, (0,))  # optim_sgd: any kernel zeroes a frozen gradient
                groups[target] = []
            groups[target].append(i)
            table[i, _KERNEL] = target[1][0]
        return groups

    @staticmethod
    def _check_kernels(kernels: Tuple[int, ...], index: Any, keys: List[Any],
                       plans: List[Plan], table: numpy.ndarray) -> bool:
        """Every tensor of a group can run the group's kernels: its plan was prepared for
        the row's kind and the optimizer's averages, and holds the state arrays they use
        (a kernel reads the pointers of its arrays). Returns the group's averages flag."""
        averages = None
        for i in index:
            plan = plans[i]
            if plan.frozen:
                if table[i, _STATUS] != _FROZEN:
                    raise ValueError(f"key {keys[i]!r}: its launch was prepared for frozen "
                                     "weights, but its settings update them")
                continue
            if averages is None:
                averages = plan.averages
            for code in kernels:
                if (code >> 2 != plan.kind_code or plan.averages != averages
                        or plan.state_args[code & 3] is None):
                    name = code_kernel(code, averages)
                    if code >> 2 != plan.kind_code or plan.averages != averages:
                        raise ValueError(f"key {keys[i]!r}: its launch was prepared for "
                                         f"{plan.kind} updates, but its settings run {name}")
                    _missing_state(keys[i], name)
        return bool(averages)

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
            tensors[:, j] = [0 if x is None or p.frozen else x.data.ptr
                             for p, x in zip(plans, map(operator.attrgetter(name), plans))]
        tensors[:, 6] = [p.n for p in plans]
        tensors[:, 7] = first
        tensors[:, 8] = [0 if p.counter is None else p.counter.data.ptr for p in plans]
        total = int(chunks.sum())
        batch = Batch()
        batch.plans, batch.w_ptrs, batch.g_ptrs, batch.stream = list(plans), w_ptrs, g_ptrs, stream
        batch.tensors = cp.asarray(tensors)
        batch.chunk_tensor = cp.asarray(
            numpy.repeat(numpy.arange(n, dtype=numpy.int32), chunks))
        batch.partials = cp.empty(max(total, 1), dtype=numpy.float64)
        batch.tickets = cp.zeros(n, dtype=numpy.uint64)
        batch.statuses = cp.empty(n, dtype=numpy.float64)
        batch.epoch = 0
        batch.n_chunks = total
        batch.grid = (max(1, min(total, 1 << 20)),)
        batch.norm_grid = (norm_grid(total),)
        batches[slot] = batch
        return batch


_BLOCK = (BLOCK,)
_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost
_CHECK, _GRAD_CLIP = SLOT["check"], SLOT["grad_clip"]
_KERNEL, _STATUS = SLOT["kernel"], SLOT["status"]
_PICK, _EXTRA, _WINDOW, _COUNTER = SLOT["pick"], SLOT["extra"], SLOT["window"], SLOT["counter"]
_FROZEN = _device.DEVICE_FROZEN


def _group_rows(table: numpy.ndarray, members: List[int], first_extra: Dict[int, int],
                windows: Optional[List[Any]]) -> numpy.ndarray:
    """A group's rows: its members' own, renumbered (pick: itself), then the window rows
    of its skip-mode members (each member's `extra` slot says where they start)."""
    m = len(members)
    rows = table[members]
    rows[:, _PICK] = numpy.arange(m, dtype=numpy.float64)
    pieces = [rows]
    at = m
    for j, i in enumerate(members):
        start = first_extra.get(i)
        if start is not None:
            more = windows[i][1] - 1
            rows[j, _EXTRA] = at
            pieces.append(table[start:start + more])
            at += more
    return rows if len(pieces) == 1 else numpy.ascontiguousarray(numpy.vstack(pieces))


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


def _missing_state(key: Any, name: str) -> None:
    raise ValueError(f"key {key!r}: this update needs state the key does not have "
                     f"({name}: lookahead weights)")


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
