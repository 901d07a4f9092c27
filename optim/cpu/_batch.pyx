"""step_many: many updates validated together, then run in one loop without the GIL,
and the call kept (`Batch`) so that the next one with the same keys costs little on the
host. Built on optim._kernels' C-level interface (optim/_kernels.pxd)."""
from cpython.dict cimport PyDict_Check, PyDict_GetItem, PyDict_Next, PyDict_SetItem, PyDict_Size
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.limits cimport LONG_MAX
from libc.math cimport isfinite
from cymem.cymem cimport Pool

from optim._kernels cimport (
    NONFINITE_APPLY, NONFINITE_RAISE, OUTCOME_UPDATED, Hyper, Task, fill_task, make_coefs, n_threads,
    run_tasks,
)
from optim.cpu._loops cimport KIND_SGD, Kind

cimport numpy as cnp

cnp.import_array()


def step_many(list hypers, list keys, list weights, list gradients, list mom1, list mom2,
              list averages, list slows, list counts, double lr_scale=1.0) -> Batch:
    """Update many tensors in one call: validates them all, then loops without the GIL.

    Each list holds one entry per key (None where a state array is absent): hypers[i]
    is the `Hyper` of keys[i] (its group's), counts[i] its update number t. Same results
    as calling `step` in order. Returns the batch, which `Batch.again` runs again for
    the same keys and state arrays; `batch.outcomes()` lists the updates that found a
    non-finite gradient (in raise mode, none of the call's updates was written then).
    """
    cdef Py_ssize_t n = len(keys)
    for name, seq in (("hypers", hypers), ("weights", weights), ("gradients", gradients),
                      ("mom1", mom1), ("mom2", mom2), ("averages", averages),
                      ("slows", slows), ("counts", counts)):
        if len(seq) != n:
            raise ValueError(f"step_many: {len(seq)} {name} for {n} keys")
    cdef Batch batch = Batch.__new__(Batch)
    batch.fill(hypers, keys, weights, gradients, mom1, mom2, averages, slows, counts,
               lr_scale)
    batch.run()
    return batch




cdef inline bint set_count(Task* task, PyObject* count) noexcept:
    """task.t = count + 1 if count is an int from 0 to LONG_MAX - 1 (else False)."""
    cdef int overflow = 0
    cdef long t
    if count == NULL or not PyLong_CheckExact(<object>count):
        return False
    t = PyLong_AsLongAndOverflow(<object>count, &overflow)
    if overflow or t < 0 or t == LONG_MAX:
        return False
    task.t = t + 1
    return True


cdef inline bint fits(object x, int typenum, int ndim, const Py_ssize_t* dims) noexcept:
    """Whether x is a C-contiguous, writable `typenum` array of shape dims[:ndim]: what
    fill_task checks of every array, as a test (Batch.again falls back on False)."""
    if not cnp.PyArray_Check(x):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int d
    if (cnp.PyArray_TYPE(a) != typenum or cnp.PyArray_NDIM(a) != ndim
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISWRITEABLE(a)):
        return False
    for d in range(ndim):
        if cnp.PyArray_DIM(a, d) != dims[d]:
            return False
    return True


cdef enum:
    N_STATE = 4  # a task's state arrays, in this order: mom1, mom2, average, slow
    WALK_PER_KEY = 8  # Batch: walk a state dict of up to this many entries per key


cdef class Batch:
    """A step_many call, kept so that the next call with the same keys costs little on
    the host (a training loop updates the same tensors in the same order every step).

    It holds its task table, each tensor's shape and dtype, and the state arrays it
    used (references, so their memory stays valid). `again` runs it on new weights and
    gradients once it has checked, in C, that the keys are equal, that the state dicts
    `bind` recorded still map them to these arrays (`unchanged`), and everything
    `fill_task` checks: every array's type, dtype, contiguity, writability and shape,
    the state arrays the update kind needs, the counts and lr_scale. What is left per
    key is the check of its arrays and the write of its count to nr_update (a dict
    lookup; the counts are read by walking nr_update's entries).
    """

    cdef Pool mem
    cdef Task* tasks
    cdef Py_ssize_t* sizes
    cdef Py_ssize_t* dims       # each task's shape: dims[dim_start[i]:dim_start[i + 1]]
    cdef Py_ssize_t* dim_start
    cdef Py_ssize_t n
    cdef list keys
    cdef tuple hypers           # each task's Hyper
    cdef char* hyper_starts     # per task: 1 if its Hyper is not the previous task's
    cdef bint checking          # the last run checked a gradient (skip or raise mode)
    cdef bint raising           # a task is in raise mode
    cdef bint wrote             # the last run wrote (False: refused in raise mode)
    cdef tuple state            # n * N_STATE arrays or None, task by task
    cdef tuple stores           # the state dicts `bind` recorded, and their lengths
    cdef Py_ssize_t* store_sizes
    cdef tuple snapshots        # per state dict: (its keys, its values) when bound, or None
    cdef object counts          # nr_update when bound, and its keys then (None: look up)
    cdef list count_keys
    cdef Py_ssize_t* count_task  # per entry of count_keys: the task it counts, or -1
    cdef bint busy              # checking or running: no other call may refill it

    cdef int fill(self, list hypers, list keys, list weights, list gradients, list mom1,
                  list mom2, list averages, list slows, list counts,
                  double lr_scale) except -1:
        """Validate every update (raising fill_task's errors) and fill the tables."""
        cdef Py_ssize_t i, d, n = len(keys), n_dims = 0
        for hyper in hypers:
            if not isinstance(hyper, Hyper):
                raise TypeError(f"step_many: hypers must be Hyper objects, got "
                                f"{type(hyper).__name__}")
        self.mem = Pool()
        self.n = n
        self.keys = list(keys)
        self.hypers = tuple(hypers)
        self.tasks = <Task*>self.mem.alloc(max(n, 1), sizeof(Task))
        self.sizes = <Py_ssize_t*>self.mem.alloc(max(n, 1), sizeof(Py_ssize_t))
        self.dim_start = <Py_ssize_t*>self.mem.alloc(n + 1, sizeof(Py_ssize_t))
        self.hyper_starts = <char*>self.mem.alloc(max(n, 1), sizeof(char))
        for i in range(n):
            self.hyper_starts[i] = i == 0 or hypers[i] is not hypers[i - 1]
            if self.hyper_starts[i]:
                self.raising = self.raising or (<Hyper>hypers[i]).nonfinite == NONFINITE_RAISE
        for i in range(n):
            fill_task(&self.tasks[i], <Hyper>hypers[i], keys[i], weights[i], gradients[i],
                      mom1[i], mom2[i], averages[i], slows[i], counts[i], lr_scale,
                      &self.tasks[i - 1] if i and hypers[i] is hypers[i - 1] else NULL)
            self.sizes[i] = self.tasks[i].n
            n_dims += cnp.PyArray_NDIM(<cnp.ndarray>weights[i])
            self.dim_start[i + 1] = n_dims
        self.dims = <Py_ssize_t*>self.mem.alloc(max(n_dims, 1), sizeof(Py_ssize_t))
        for i in range(n):
            for d in range(self.dim_start[i + 1] - self.dim_start[i]):
                self.dims[self.dim_start[i] + d] = cnp.PyArray_DIM(<cnp.ndarray>weights[i], d)
        self.state = tuple([x for i in range(n)
                            for x in (mom1[i], mom2[i], averages[i], slows[i])])
        return 0

    cdef int run(self) except -1:
        """The loops over the filled tasks, without the GIL."""
        cdef int threads = n_threads()
        cdef bint wrote
        with nogil:
            wrote = run_tasks(self.tasks, self.sizes, self.n, threads, self.raising)
        self.wrote = wrote
        return 0

    def outcomes(self) -> list:
        """(index, outcome) of each update of the last run that found its gradient
        non-finite (1: a NaN, 2: an inf): skipped, or in raise mode refused."""
        cdef Py_ssize_t i
        return [(i, self.tasks[i].outcome) for i in range(self.n)
                if self.tasks[i].outcome != OUTCOME_UPDATED]

    @property
    def written(self) -> bool:
        """False if the last run wrote nothing (a raise-mode update was refused)."""
        return self.wrote

    def bind(self, tuple stores, object counts) -> Batch:
        """Record the dicts the state arrays came from, as they are now: stores[k] for
        k < N_STATE holds the tasks' state arrays of slot k (mom1, mom2, average, slow),
        any further ones are only watched for replacement and size; `counts` (the
        update counts, nr_update) is where `again` reads and writes each key's count.
        Returns self."""
        cdef Py_ssize_t i, j, k
        cdef object store
        if self.busy:
            raise RuntimeError("Batch.bind: the batch is running")
        self.counts, self.count_keys = counts, None
        if PyDict_Check(counts) and len(counts) <= WALK_PER_KEY * self.n:
            position = {key: j for j, key in enumerate(counts)}
            if all(key in position for key in self.keys):
                self.count_keys = list(counts)
                self.count_task = <Py_ssize_t*>self.mem.alloc(max(len(counts), 1),
                                                              sizeof(Py_ssize_t))
                for j in range(len(counts)):
                    self.count_task[j] = -1
                for i in range(self.n):
                    self.count_task[position[self.keys[i]]] = i
        self.stores = stores
        self.store_sizes = <Py_ssize_t*>self.mem.alloc(max(len(stores), 1), sizeof(Py_ssize_t))
        snapshots = []
        for k in range(len(stores)):
            store = stores[k]
            self.store_sizes[k] = -1 if store is None else len(store)
            # a small dict is compared entry by entry, a large one by the batch's keys
            if k < N_STATE and store is not None and len(store) <= WALK_PER_KEY * self.n:
                snapshots.append((list(store), list(store.values())))
            else:
                snapshots.append(None)
        self.snapshots = tuple(snapshots)
        return self

    cdef int unchanged(self, tuple stores, list keys) except -1:
        """1 if every store is the dict bound, of the same size, and maps the batch's keys
        to the same state arrays (by identity) as when bound; else 0."""
        cdef Py_ssize_t i, j, k, pos
        cdef object store
        cdef list snap_keys, snap_values
        cdef PyObject* key
        cdef PyObject* value
        cdef PyObject* expected
        if self.stores is None or len(stores) != len(self.stores):
            return 0
        for k in range(len(stores)):
            store = stores[k]
            if store is not self.stores[k]:
                return 0
            if store is None:
                continue
            if not PyDict_Check(store) or PyDict_Size(store) != self.store_sizes[k]:
                return 0
            if k >= N_STATE:
                continue
            if self.snapshots[k] is not None:  # the same entries, in the same order
                snap_keys, snap_values = self.snapshots[k]
                pos = j = 0
                while PyDict_Next(store, &pos, &key, &value):
                    if (j == PyList_GET_SIZE(snap_keys) or key != PyList_GET_ITEM(snap_keys, j)
                            or value != PyList_GET_ITEM(snap_values, j)):
                        return 0
                    j += 1
                continue
            for i in range(self.n):  # each key's array, as _tables.same_state does
                value = PyDict_GetItem(store, <object>PyList_GET_ITEM(keys, i))
                expected = PyTuple_GET_ITEM(self.state, N_STATE * i + k)
                if value != (NULL if expected == <PyObject*>None else expected):
                    return 0
        return 1

    def again(self, list keys, list weights, list gradients, object nr_update,
              double lr_scale, tuple stores, object on_nonfinite) -> bool:
        """Run the batch again on new weights and gradients of the same keys (equal, in
        the same order), the counts read from and written back to `nr_update`. The
        lists must be the caller's own (no other code holds them).

        Returns False, having touched nothing, when anything differs from what the
        batch was filled with (the caller then takes the general path, which raises
        the precise error): other keys, replaced state dicts, an array that fill_task
        would reject, a missing count or an invalid lr_scale. An update that found its
        gradient non-finite keeps its count and is reported to
        `on_nonfinite(key, outcome, weights)` (which raises in raise mode)."""
        if self.busy:
            return False
        self.busy = True  # from the start: comparing and hashing keys runs Python code
        try:
            if self.refill(keys, weights, gradients, nr_update, lr_scale, stores) == 0:
                return False
        finally:
            self.busy = False
        report_nonfinite(self, keys, weights, on_nonfinite)
        return True

    cdef int refill(self, list keys, list weights, list gradients,
                    object nr_update, double lr_scale, tuple stores) except -1:
        """again's work: 1 if it ran, 0 if it touched nothing."""
        cdef Py_ssize_t i, n = self.n
        cdef Task* task
        cdef long t
        cdef int typenum, ndim
        cdef const Py_ssize_t* dims
        cdef object w, g, m, v, avg, slow
        cdef Hyper hyper = None
        cdef Kind kind = KIND_SGD
        cdef bint moments = False, same_coefs
        cdef int nonfinite = 0
        cdef double grad_clip = 0.0
        cdef long lookahead_k = 0
        # The caller's lists are its own copies: Python code run by comparing or hashing
        # keys cannot change them. First what runs such code, then only C.
        if (PyList_GET_SIZE(weights) != n or PyList_GET_SIZE(gradients) != n
                or not PyDict_Check(nr_update) or not (isfinite(lr_scale) and lr_scale >= 0.0)):
            return 0
        if (keys != self.keys or not self.read_counts(keys, nr_update)
                or not self.unchanged(stores, keys)):
            return 0
        self.checking = self.raising = False
        for i in range(n):
            task = &self.tasks[i]
            t = task.t
            same_coefs = i and not self.hyper_starts[i] and self.tasks[i - 1].t == t
            if self.hyper_starts[i]:  # the settings of a run of tasks sharing a Hyper
                hyper = <Hyper>PyTuple_GET_ITEM(self.hypers, i)
                kind = hyper._kind()
                moments = kind != KIND_SGD
                nonfinite, grad_clip = hyper.nonfinite, hyper.grad_clip
                lookahead_k = hyper.lookahead_k
                self.checking = self.checking or nonfinite != NONFINITE_APPLY
                self.raising = self.raising or nonfinite == NONFINITE_RAISE
            typenum, ndim = task.dtype, self.dim_start[i + 1] - self.dim_start[i]
            dims = &self.dims[self.dim_start[i]]
            w = <object>PyList_GET_ITEM(weights, i)
            g = <object>PyList_GET_ITEM(gradients, i)
            if (type(w) is not cnp.ndarray or type(g) is not cnp.ndarray
                    or not fits(w, typenum, ndim, dims) or not fits(g, typenum, ndim, dims)):
                return 0
            m = <object>PyTuple_GET_ITEM(self.state, N_STATE * i)
            v = <object>PyTuple_GET_ITEM(self.state, N_STATE * i + 1)
            avg = <object>PyTuple_GET_ITEM(self.state, N_STATE * i + 2)
            slow = <object>PyTuple_GET_ITEM(self.state, N_STATE * i + 3)
            task.w = cnp.PyArray_DATA(<cnp.ndarray>w)
            task.g = cnp.PyArray_DATA(<cnp.ndarray>g)
            task.m = task.v = task.avg = task.slow = NULL
            if moments:
                if not (fits(m, typenum, ndim, dims) and fits(v, typenum, ndim, dims)):
                    return 0
                task.m = cnp.PyArray_DATA(<cnp.ndarray>m)
                task.v = cnp.PyArray_DATA(<cnp.ndarray>v)
            if avg is not None:
                if not fits(avg, typenum, ndim, dims):
                    return 0
                task.avg = cnp.PyArray_DATA(<cnp.ndarray>avg)
            if lookahead_k > 0 and t % lookahead_k == 0:  # syncs(hyper, t)
                if not fits(slow, typenum, ndim, dims):
                    return 0
                task.slow = cnp.PyArray_DATA(<cnp.ndarray>slow)
            if same_coefs:
                task.c = self.tasks[i - 1].c
            else:
                task.c = make_coefs(hyper, t, lr_scale)
            task.kind = kind
            task.grad_clip = grad_clip
            task.nonfinite = nonfinite
        self.run()
        if self.wrote:
            self.count(keys, nr_update)
        return 1

    cdef int read_counts(self, list keys, object nr_update) except -1:
        """Set each task's t to its key's count in nr_update + 1: walking nr_update's
        entries when it holds the keys it held when bound, in the same order (its
        values at the keys' positions are their counts), else looking each key up.
        0 if a count is missing, not an int or out of range."""
        cdef Py_ssize_t i, j = 0, pos = 0, found = 0
        cdef PyObject* key
        cdef PyObject* count
        cdef list count_keys = self.count_keys
        if (count_keys is not None and nr_update is self.counts
                and PyDict_Size(nr_update) == PyList_GET_SIZE(count_keys)):
            while PyDict_Next(nr_update, &pos, &key, &count):
                if j == PyList_GET_SIZE(count_keys) or key != PyList_GET_ITEM(count_keys, j):
                    break  # not the same keys: look them up
                i = self.count_task[j]
                if i >= 0:
                    if not set_count(&self.tasks[i], count):
                        return 0
                    found += 1
                j += 1
            if found == self.n:
                return 1
        for i in range(self.n):
            count = PyDict_GetItem(nr_update, <object>PyList_GET_ITEM(keys, i))
            if not set_count(&self.tasks[i], count):
                return 0
        return 1

    cdef int count(self, list keys, object nr_update) except -1:
        """nr_update[keys[i]] = the task's t, one int object per run of equal counts
        (updates that found a non-finite gradient keep their count)."""
        cdef Py_ssize_t i
        cdef long last = -1
        cdef object t = None
        cdef bint checking = self.checking
        for i in range(self.n):
            if checking and self.tasks[i].outcome != OUTCOME_UPDATED:
                continue
            if self.tasks[i].t != last:
                last = self.tasks[i].t
                t = last
            PyDict_SetItem(nr_update, <object>PyList_GET_ITEM(keys, i), t)
        return 0


cdef int report_nonfinite(Batch batch, list keys, list weights,
                          object on_nonfinite) except -1:
    """Tell `on_nonfinite(key, outcome, weights)` of each update of the batch's last run
    that found a non-finite gradient (none, almost always: one C loop)."""
    cdef Py_ssize_t i
    if not batch.checking:  # apply mode: every outcome is OUTCOME_UPDATED
        return 0
    for i in range(batch.n):
        if batch.tasks[i].outcome != OUTCOME_UPDATED:
            on_nonfinite(keys[i], batch.tasks[i].outcome, weights[i])
    return 0


def known_shapes(list shapes, list weights, list gradients) -> bool:
    """Whether every weights and gradient is a NumPy array, every gradient has elements
    and every weights array has shapes[i] (a tuple; None fails): step_many's hot path."""
    cdef Py_ssize_t i, d, ndim, n = len(shapes)
    cdef object shape, w, g
    if len(weights) != n or len(gradients) != n:
        return False
    for i in range(n):
        shape, w, g = shapes[i], weights[i], gradients[i]
        if (type(w) is not cnp.ndarray or type(g) is not cnp.ndarray
                or cnp.PyArray_SIZE(<cnp.ndarray>g) == 0 or type(shape) is not tuple):
            return False
        ndim = cnp.PyArray_NDIM(<cnp.ndarray>w)
        if len(<tuple>shape) != ndim:
            return False
        for d in range(ndim):
            if <Py_ssize_t>(<tuple>shape)[d] != cnp.PyArray_DIM(<cnp.ndarray>w, d):
                return False
    return True
