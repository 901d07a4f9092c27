"""step_many on the device: many tensors in a few launches (`CupyBackend.launch_many`).

A call's tensors are cut into *segments*, one per dtype and set of kernels their rows
name; each segment is one update launch per kernel (one, but for a skip-mode window
whose counts run different kernels), plus one clip norm launch when a tensor of it
clips or checks its gradient. A segment's tensor and chunk tables live in device memory
(`DeviceTables`), cached by the caller and rebuilt only when an address, a size, the
plans or the stream change; its coefficient rows (`_tables.device_coef_table`: one per
tensor, with its own Hyper, then the window rows of skip-mode tensors) are uploaded at
every call. In skip mode a tensor's rows cover the counts its key may be at, and the
device picks the one its count says. Every array is checked against its key's plan
before anything is launched, and nothing is read back but in raise mode (docs/gpu.md,
"Groups and the non-finite skip").
"""
import operator
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy

from . import _tables
from .workspace import next_epoch
from .._kernels import NONFINITE_RAISE, OUTCOME_INF, OUTCOME_NAN
from .._kernels_cuda import (BLOCK, CHECK_APPLY, GO, NAN, ROW, SLOT, TENSOR_FIELDS,
                             code_kernel, norm_grid)

# skip mode, per tensor: (first count, rows, counter), see `launch_many`
Window = Optional[Tuple[int, int, int]]

_BLOCK = (BLOCK,)
_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost
_CHECK, _GRAD_CLIP = SLOT["check"], SLOT["grad_clip"]
_KERNEL, _STATUS = SLOT["kernel"], SLOT["status"]
_PICK, _EXTRA, _WINDOW, _COUNTER = SLOT["pick"], SLOT["extra"], SLOT["window"], SLOT["counter"]
_FROZEN = _tables.DEVICE_FROZEN
_CHECK_RAISE = float(NONFINITE_RAISE)  # a row's check slot in raise mode
# rows asking for these run in segments of their own (a frozen tensor joins one)
_SPLITS = _tables.HAS_FROZEN | _tables.HAS_MIXED_KERNELS
# rows asking for these need the clip norm launch
_NORMS = _tables.HAS_SKIP | _tables.HAS_RAISE | _tables.HAS_CLIP


class DeviceTables:
    """A segment's tables on the device (tensor table, chunk -> tensor table, chunk
    sums, epoch-tagged tickets, the statuses the clip norm decides), rebuilt only when
    an address, a size, the plans or the stream change; `epoch` is the last clip norm
    launch's."""

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
    """Per tensor of a step_many call: its plan's dtype (and the dtype's name), shape and
    state arrays."""

    __slots__ = ("plans", "dtypes", "names", "shapes", "m", "v", "avg", "slow", "device")

    def __init__(self, plans: List[Any]) -> None:
        self.plans = list(plans)
        self.dtypes = [p.dtype for p in plans]
        self.names = [d.name for d in self.dtypes]  # (NumPy computes `name` at each read)
        self.shapes = [p.shape for p in plans]
        self.m = [p.m for p in plans]
        self.v = [p.v for p in plans]
        self.avg = [p.avg for p in plans]
        self.slow = [p.slow for p in plans]
        devices = {p.device for p in plans}
        self.device = devices.pop() if len(devices) == 1 else None  # None: mixed


class Rows(NamedTuple):
    """A call's coefficient rows on the host: one per tensor, then the window rows of its
    skip-mode tensors (counts + 1, + 2, ...)."""

    table: numpy.ndarray
    mask: int                     # what the rows ask: _tables.HAS_* bits
    first_extra: Dict[int, int]   # tensor -> its first window row (windows of > 1 row)
    counted: bool                 # a tensor has a window: its count is on the device


class Segment(NamedTuple):
    """Tensors launched together: one dtype, the kernel codes their rows name."""

    dtype: str
    kernels: Tuple[int, ...]
    members: Optional[List[int]]  # their positions in the call; None: all of them


class Launch(NamedTuple):
    """A checked segment and what its launches take (its tensors' plans, addresses and
    rows)."""

    segment: Segment
    index: Sequence[int]  # the tensors' positions in the call
    averages: bool
    plans: List[Any]
    w_ptrs: List[int]
    g_ptrs: List[int]
    rows: numpy.ndarray
    uses_norm: bool       # a tensor clips or checks: the clip norm launch runs


class Staged(NamedTuple):
    """A launch whose tables and rows are on the device."""

    launch: Launch
    tables: DeviceTables
    coefs: Any  # the launch's rows, on the device


def launch_many(backend: Any, tables: Dict[Any, Any], hypers: Any, keys: List[Any],
                weights: List[Any], gradients: List[Any], plans: List[Any],
                counts: List[int], lr_scale: float, windows: Optional[List[Window]] = None,
                on_refused: Optional[Callable[[int, int], None]] = None
                ) -> Optional[Tuple[Record, List[int]]]:
    """Update many keys: one launch per segment of tensors sharing dtype and kernel (plus
    one clip norm launch per segment when a tensor of it clips or checks). `tables`
    caches the segments' device tables. Every array is checked against its key's plan
    before anything is launched.

    `hypers`: one Hyper per key (its group's settings: a row of its own, not a launch
    of its own), or one Hyper for all. A frozen key's gradient is zeroed by its
    segment's launch. `counts[i]`: the update count of key i (for a skip-mode key with
    a window, the first count of its window). `windows[i]` (skip mode, None
    elsewhere): (first count, rows, counter) - the counts first .. first + rows - 1
    the key may be at, and what the device count starts from (-1: as it is; >= 0:
    this); the clip norm kernel picks the row. Returns (Record, position of each
    key's status in it) when a key has a window, else None. Raise mode (a Hyper with
    nonfinite NONFINITE_RAISE): the statuses are read back before any update (a host
    read) and `on_refused(i, outcome)` is called for a refused key i, then
    FloatingPointError raised: nothing of the call is written."""
    n = len(keys)
    if n == 0:
        return None
    cp = backend.cupy
    device = cp.cuda.runtime.getDevice()
    backend.refuse_capture("step_many")
    want = expected(tables, plans)
    w_ptrs, g_ptrs = _addresses(backend, want, keys, plans, weights, gradients, device)
    rows = coefficient_rows(hypers, keys, counts, lr_scale, windows)
    stream = (device, cp.cuda.get_current_stream().ptr)
    # everything is checked before anything is launched
    launches = [_checked(segment, keys, plans, w_ptrs, g_ptrs, rows, windows)
                for segment in segments(rows, want.names, windows)]
    refusing = bool(rows.mask & _tables.HAS_RAISE)
    staged = []
    for launch, slot in zip(launches, _slots(launches)):
        ready = _stage(backend, tables, slot, launch, stream)
        if not refusing:
            _run(backend, device, ready, commit=1)
        staged.append(ready)
    if refusing:
        _refuse_or_run(backend, device, staged, keys, rows, on_refused)
    if not rows.counted:
        return None
    return _record(cp, staged, windows, n, stream[1])


def expected(tables: Dict[Any, Any], plans: List[Any]) -> Expected:
    """What step_many's arrays and state must be, per tensor, for these plans (cached in
    `tables` while the list of plans is the same)."""
    want = tables.get("expected")
    if want is None or want.plans != plans:
        want = tables["expected"] = Expected(plans)
    return want


def coefficient_rows(hypers: Any, keys: List[Any], counts: List[int], lr_scale: float,
                     windows: Optional[List[Window]]) -> Rows:
    """One row per key, then the window rows of skip-mode keys (counts + 1, + 2, ...)."""
    first_extra: Dict[int, int] = {}
    row_hypers, row_keys, row_counts = hypers, keys, counts
    if windows is not None:
        if not isinstance(hypers, list):
            hypers = [hypers] * len(keys)
        row_hypers, row_keys, row_counts = list(hypers), list(keys), list(counts)
        for i, win in enumerate(windows):
            if win is not None and win[1] > 1:
                first_extra[i] = len(row_keys)
                row_hypers += [hypers[i]] * (win[1] - 1)
                row_keys += [keys[i]] * (win[1] - 1)
                row_counts += [counts[i] + j for j in range(1, win[1])]
    table = numpy.empty((len(row_keys), ROW), dtype=numpy.float64)
    variants = numpy.empty(len(row_keys), dtype=numpy.uint8)
    mask = _tables.device_coef_table(row_hypers, row_keys, row_counts, lr_scale, table,
                                      variants)
    counted = False
    if windows is not None:
        for i, win in enumerate(windows):
            if win is not None:
                table[i, _WINDOW] = win[1]
                table[i, _COUNTER] = win[2]
                counted = True
    return Rows(table, mask, first_extra, counted)


def segments(rows: Rows, dtypes: List[str], windows: Optional[List[Window]]
             ) -> List[Segment]:
    """Tensors by (dtype, the kernels their rows name); a frozen tensor joins the first
    segment of its dtype (or makes one), and its row names that segment's first kernel,
    which zeroes its gradient. `dtypes`: each tensor's dtype name."""
    n = len(dtypes)
    table, first_extra = rows.table, rows.first_extra
    codes = table[:, _KERNEL]
    if not first_extra and not rows.mask & _SPLITS and dtypes.count(dtypes[0]) == n:
        # the usual case: one segment (one dtype, one kernel, nobody frozen)
        return [Segment(dtypes[0], (int(codes[0]),), None)]
    by_kernels: Dict[Tuple[str, Tuple[int, ...]], List[int]] = {}
    frozen = []
    for i in range(n):
        if table[i, _STATUS] == _FROZEN:
            frozen.append(i)
            continue
        kernels: Tuple[int, ...] = (int(codes[i]),)
        if i in first_extra:
            start = first_extra[i]
            window = codes[start:start + windows[i][1] - 1]  # type: ignore[index]
            kernels = tuple(sorted({int(codes[i]), *map(int, window)}))
        by_kernels.setdefault((dtypes[i], kernels), []).append(i)
    for i in frozen:
        name = dtypes[i]
        target = next((s for s in by_kernels if s[0] == name), None)
        if target is None:
            target = (name, (0,))  # optim_sgd: any kernel zeroes a frozen gradient
            by_kernels[target] = []
        by_kernels[target].append(i)
        table[i, _KERNEL] = target[1][0]
    return [Segment(dtype, kernels, members)
            for (dtype, kernels), members in by_kernels.items()]


def _addresses(backend: Any, want: Expected, keys: List[Any], plans: List[Any],
               weights: List[Any], gradients: List[Any], device: int
               ) -> Tuple[List[int], List[int]]:
    """The weights' and gradients' addresses, once each array fits its key's plan (else
    the error of the first misfit, from `backend.check`)."""
    w_ptrs = _tables.array_pointers(weights, want.dtypes, want.shapes, device)
    g_ptrs = _tables.array_pointers(gradients, want.dtypes, want.shapes, device)
    if w_ptrs is None or g_ptrs is None or want.device != device:
        for plan, key, w, g in zip(plans, keys, weights, gradients):
            backend.check(plan, key, w, g, device)  # raises the error of the first misfit
        raise AssertionError("array_pointers and check disagree")  # pragma: no cover
    return w_ptrs, g_ptrs


def _checked(segment: Segment, keys: List[Any], plans: List[Any], w_ptrs: List[int],
             g_ptrs: List[int], rows: Rows, windows: Optional[List[Window]]) -> Launch:
    """A segment whose tensors can all run its kernels, with what its launches take."""
    members = segment.members
    if members is None:
        index: Sequence[int] = range(len(keys))
        averages = _check_kernels(segment.kernels, index, keys, plans, rows.table)
        return Launch(segment, index, averages, plans, w_ptrs, g_ptrs, rows.table,
                      bool(rows.mask & _NORMS))
    averages = _check_kernels(segment.kernels, members, keys, plans, rows.table)
    pick = operator.itemgetter(*members)
    own = _segment_rows(rows.table, members, rows.first_extra, windows)
    head = own[:len(members)]
    uses_norm = bool((head[:, _CHECK] != CHECK_APPLY).any()
                     or (head[:, _GRAD_CLIP] > 0.0).any())
    return Launch(segment, members, averages, _picked(pick, plans), _picked(pick, w_ptrs),
                  _picked(pick, g_ptrs), own, uses_norm)


def _check_kernels(kernels: Tuple[int, ...], index: Sequence[int], keys: List[Any],
                   plans: List[Any], table: numpy.ndarray) -> bool:
    """Every tensor of a segment can run the segment's kernels: its plan was prepared
    for the row's kind and the optimizer's averages, and holds the state arrays they use
    (a kernel reads the pointers of its arrays). Returns the segment's averages flag."""
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
                missing_state(keys[i], name)
    return bool(averages)


def _segment_rows(table: numpy.ndarray, members: List[int], first_extra: Dict[int, int],
                  windows: Optional[List[Window]]) -> numpy.ndarray:
    """A segment's rows: its members' own, renumbered (pick: itself), then the window rows
    of its skip-mode members (each member's `extra` slot says where they start)."""
    m = len(members)
    rows = table[members]
    rows[:, _PICK] = numpy.arange(m, dtype=numpy.float64)
    pieces = [rows]
    at = m
    for j, i in enumerate(members):
        start = first_extra.get(i)
        if start is not None:
            more = windows[i][1] - 1  # type: ignore[index]
            rows[j, _EXTRA] = at
            pieces.append(table[start:start + more])
            at += more
    return rows if len(pieces) == 1 else numpy.ascontiguousarray(numpy.vstack(pieces))


def _picked(pick: Any, items: List[Any]) -> List[Any]:
    got = pick(items)
    return list(got) if isinstance(got, tuple) else [got]


def _slots(launches: List[Launch]) -> List[Any]:
    """Where each launch's tables are cached: a dtype's tensors in one launch (the usual
    case) keep one set of tables whatever the kernel (e.g. lookahead sync steps)."""
    if len(launches) == 1:
        return [launches[0].segment.dtype]
    per_dtype: Dict[str, int] = {}
    for launch in launches:
        dtype = launch.segment.dtype
        per_dtype[dtype] = per_dtype.get(dtype, 0) + 1
    return [seg.dtype if per_dtype[seg.dtype] == 1 else (seg.dtype, seg.kernels)
            for seg in (launch.segment for launch in launches)]


def _stage(backend: Any, tables: Dict[Any, Any], slot: Any, launch: Launch,
           stream: Tuple[int, int]) -> Staged:
    """The launch's device tables (cached in `tables[slot]`) and its rows uploaded."""
    own = device_tables(backend.cupy, tables, slot, launch.plans, launch.w_ptrs,
                        launch.g_ptrs, stream)
    # CuPy stages a host array through pinned memory and copies it on the current
    # stream: the copy neither waits for the device nor blocks the host
    return Staged(launch, own, backend.cupy.asarray(launch.rows))


def _run(backend: Any, device: int, staged: Staged, commit: int) -> None:
    """The launch's clip norm (when it uses one), then its updates."""
    if staged.launch.uses_norm:
        _norm(backend, device, staged, commit)
    _updates(backend, device, staged)


def _refuse_or_run(backend: Any, device: int, staged: List[Staged], keys: List[Any],
                   rows: Rows, on_refused: Optional[Callable[[int, int], None]]) -> None:
    """Raise mode: every launch's statuses are decided (the clip norms; they move the
    device counts only when none is kept there) and read back before any update."""
    counted = rows.counted
    for ready in staged:
        if ready.launch.uses_norm:
            _norm(backend, device, ready, 0 if counted else 1)
    for ready in staged:
        _refuse(backend, ready, keys, rows.table, on_refused)
    for ready in staged:
        if counted:
            _run(backend, device, ready, commit=1)
        else:
            _updates(backend, device, ready)


def _refuse(backend: Any, staged: Staged, keys: List[Any], table: numpy.ndarray,
            on_refused: Optional[Callable[[int, int], None]]) -> None:
    """FloatingPointError for the first tensor in raise mode whose gradient holds a NaN
    or an inf (`on_refused(i, outcome)` first); reads the statuses back (a host read)."""
    index = staged.launch.index
    if not any(table[i, _CHECK] == _CHECK_RAISE for i in index):
        return
    statuses = backend.to_host(staged.tables.statuses)
    for j, i in enumerate(index):
        if table[i, _CHECK] == _CHECK_RAISE and statuses[j] != GO:
            outcome = OUTCOME_NAN if statuses[j] == NAN else OUTCOME_INF
            if on_refused is not None:
                on_refused(i, outcome)
            raise FloatingPointError(
                f"key {keys[i]!r}: the gradient holds "
                f"{'a NaN' if outcome == OUTCOME_NAN else 'an infinity'}; nothing was "
                "written (nonfinite='raise')")


def _record(cp: Any, staged: List[Staged], windows: Any, n: int, stream_ptr: int
            ) -> Tuple[Record, List[int]]:
    """Skip mode: each launch's statuses go to pinned host memory behind its launches,
    then an event; the host reads them once the event has passed (never waits here)."""
    host = numpy.frombuffer(cp.cuda.alloc_pinned_memory(8 * n), numpy.float64, n)
    positions = [-1] * n
    sources = []
    offset = 0
    for ready in staged:
        index = ready.launch.index
        if not any(windows[i] is not None for i in index):
            continue
        m = len(index)
        statuses = ready.tables.statuses
        cp.cuda.runtime.memcpyAsync(host.ctypes.data + 8 * offset, statuses.data.ptr,
                                    8 * m, _DEVICE_TO_HOST, stream_ptr)
        sources.append(statuses)
        for j, i in enumerate(index):
            positions[i] = offset + j
        offset += m
    event = cp.cuda.Event(block=False, disable_timing=True)
    event.record(cp.cuda.get_current_stream())
    return Record(event, host, sources), positions


def _norm(backend: Any, device: int, staged: Staged, commit: int) -> None:
    """The launch's clip norm: clip factors, and the statuses of the tensors that check
    (commit: move the device counts too)."""
    own = staged.tables
    own.epoch = epoch = next_epoch(own.epoch)
    backend.many_kernel(staged.launch.segment.dtype, device)(
        own.norm_grid, _BLOCK,
        (own.tensors, own.chunk_tensor, staged.coefs, own.statuses, own.n_chunks,
         own.partials, own.tickets, epoch, commit))


def _updates(backend: Any, device: int, staged: Staged) -> None:
    """One launch per kernel the rows name (one but for a skip-mode window whose counts
    run different kernels)."""
    own, launch = staged.tables, staged.launch
    args = (own.tensors, own.chunk_tensor, staged.coefs, own.n_chunks)
    for code in launch.segment.kernels:
        backend.many_kernel(launch.segment.dtype, device, code, launch.averages)(
            own.grid, _BLOCK, args)


def device_tables(cp: Any, tables: Dict[Any, Any], slot: Any, plans: List[Any],
                  w_ptrs: List[int], g_ptrs: List[int], stream: Tuple[int, int]
                  ) -> DeviceTables:
    """A segment's cached tables, rebuilt when an address, size or stream changed."""
    own = tables.get(slot)
    if (own is not None and own.stream == stream and own.w_ptrs == w_ptrs
            and own.g_ptrs == g_ptrs and own.plans == plans):
        return own
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
    own = DeviceTables()
    own.plans, own.w_ptrs, own.g_ptrs, own.stream = list(plans), w_ptrs, g_ptrs, stream
    own.tensors = cp.asarray(tensors)
    own.chunk_tensor = cp.asarray(numpy.repeat(numpy.arange(n, dtype=numpy.int32), chunks))
    own.partials = cp.empty(max(total, 1), dtype=numpy.float64)
    own.tickets = cp.zeros(n, dtype=numpy.uint64)
    own.statuses = cp.empty(n, dtype=numpy.float64)
    own.epoch = 0
    own.n_chunks = total
    own.grid = (max(1, min(total, 1 << 20)),)
    own.norm_grid = (norm_grid(total),)
    tables[slot] = own
    return own


def missing_state(key: Any, name: str) -> None:
    """The error for a kernel that needs state the key's plan does not hold."""
    raise ValueError(f"key {key!r}: this update needs state the key does not have "
                     f"({name}: lookahead weights)")
