"""CPU kernels: one fused pass over memory per update, for float32 and float64.

The loops themselves are in optim/_loops.pxi, built once per SIMD level; this module
picks the level's table (optim/cpu.py chooses which at import), validates every array
before any loop starts (the loops run without bounds checks), and splits large updates
across threads in whole norm chunks. The math is docs/numerics.md.
"""
import importlib
import importlib.util

from cpython.dict cimport PyDict_Check, PyDict_GetItem, PyDict_Next, PyDict_SetItem, PyDict_Size
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_New
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.limits cimport LONG_MAX
from libc.math cimport pow, sqrt, isfinite
from cymem.cymem cimport Pool

from optim._loops cimport (
    KIND_ADAM, KIND_RADAM, KIND_SGD, MAX_PIECES, MAX_THREADS, NORM_CHUNK, NORM_LANES,
    OPTIM_LOOPS_CAPSULE, PIECE_MIN, Coefs, Kind, Loops, deal, lane_tree, piece_start,
    pieces_for, real_t,
)
from optim._pool cimport OPTIM_POOL, optim_parallel

cimport numpy as cnp

cnp.import_array()

KIND_NAMES = ("sgd", "adam", "radam")
cdef Py_ssize_t GIL_FREE_SIZE = 1 << 15  # release the GIL for tensors at least this large

NORM_ORDER = {"chunk": NORM_CHUNK, "lanes": NORM_LANES}
THREAD_PIECE_MIN = PIECE_MIN  # a threaded pass cuts no piece smaller than this


# ---------------------------------------------------------------- SIMD level and threads

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    static int optim_cpu_level(void) {
        __builtin_cpu_init();
        int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512cd");
        return v4 ? 2 : (v3 ? 1 : 0);
    }
    #else
    static int optim_cpu_level(void) { return 0; }
    #endif
    """
    int optim_cpu_level() noexcept nogil

# SIMD levels, lowest first: each is a module optim._loops_<level> with its LOOPS table.
# setup.py's flags per level are what optim_cpu_level checks the CPU for.
ISA_LEVELS = ("baseline", "avx2", "avx512")

cdef Loops LOOPS            # the active level's loops (a copy of its table)
cdef int N_THREADS = 1      # threads a large update may use
ACTIVE_LOOPS = PyCapsule_New(&LOOPS, OPTIM_LOOPS_CAPSULE, NULL)
"""The active `Loops` table, read by optim._roofline at each run."""


def isa_built() -> tuple:
    """The SIMD levels this build has loops for (setup.py skips what the compiler lacks)."""
    return tuple(level for level in ISA_LEVELS
                 if importlib.util.find_spec(f"optim._loops_{level}") is not None)


def isa_supported() -> tuple:
    """The SIMD levels this CPU (and OS) can run, built or not."""
    return ISA_LEVELS[:optim_cpu_level() + 1]


def isa() -> str:
    """The SIMD level whose loops run now."""
    return LOOPS.isa.decode()


def use_isa(str level) -> None:
    """Run the loops built for `level` from now on (optim/cpu.py validates the name)."""
    if level not in isa_supported():
        raise ValueError(f"SIMD level {level!r}: this CPU supports {', '.join(isa_supported())}")
    # import only what the CPU runs: a level's module may use its instructions anywhere
    module = importlib.import_module(f"optim._loops_{level}")
    global LOOPS
    LOOPS = (<Loops*>PyCapsule_GetPointer(module.LOOPS, OPTIM_LOOPS_CAPSULE))[0]


def has_pool() -> bool:
    """Whether this build has its thread pool (without POSIX threads, one thread)."""
    return bool(OPTIM_POOL)


def set_threads(int n) -> None:
    """Let large updates use up to n threads (1 .. MAX_THREADS; 1 without the pool)."""
    global N_THREADS
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"number of threads must be in 1..{MAX_THREADS}, got {n}")
    N_THREADS = n if OPTIM_POOL else 1


def get_threads() -> int:
    return N_THREADS


use_isa("baseline")  # optim/cpu.py picks the best level at import


cdef class Hyper:
    """Current hyperparameter values, read by the kernels without touching Python."""

    cdef public double learn_rate, beta1, beta2, eps, L2, grad_clip, weight_decay
    cdef public double lookahead_alpha
    cdef public long lookahead_k
    cdef public bint L2_is_weight_decay, use_radam

    @property
    def kind(self) -> str:
        return KIND_NAMES[self._kind()]

    cdef inline Kind _kind(self) noexcept:
        if self.use_radam:
            return KIND_RADAM
        if self.beta1 == 0.0 and self.beta2 == 0.0:
            return KIND_SGD
        return KIND_ADAM


# ---------------------------------------------------------------- the per-call scalars

cdef Coefs make_coefs(Hyper h, long t, double lr_scale) noexcept:
    """Scalars for the t-th update of a key (t counts this update)."""
    cdef Coefs c
    cdef double lr = h.learn_rate * lr_scale
    cdef double beta1_t = pow(h.beta1, <double>t)
    cdef double beta2_t = pow(h.beta2, <double>t)
    cdef double rho_inf, rho_t
    cdef Kind kind = h._kind()
    c.beta1 = h.beta1
    c.beta2 = h.beta2
    c.eps = h.eps
    c.l2 = h.L2 if (h.L2 != 0.0 and not h.L2_is_weight_decay) else 0.0
    c.post_decay = lr * h.L2 if (h.L2 != 0.0 and h.L2_is_weight_decay) else 0.0
    c.clip_scale = 1.0
    c.pre_decay = 0.0
    c.rectified = False
    c.avg_keep = min((1.0 + t) / (10.0 + t), 0.9999)
    c.la_alpha = h.lookahead_alpha
    if kind == KIND_SGD:
        c.lr = lr
    elif kind == KIND_ADAM:
        # Thinc's order of operations: learn_rate * fix2**0.5 / fix1, then * lr_scale.
        c.lr = h.learn_rate * pow(1.0 - beta2_t, 0.5) / (1.0 - beta1_t) * lr_scale
    else:
        rho_inf = 2.0 / (1.0 - h.beta2) - 1.0
        rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
        c.rectified = rho_t >= 5.0
        if c.rectified:
            c.lr = lr * sqrt(
                (1.0 - beta2_t) * (rho_t - 4.0) / (rho_inf - 4.0) * (rho_t - 2.0) / rho_t
                * rho_inf / (rho_inf - 2.0)
            ) / (1.0 - beta1_t)
        else:
            c.lr = lr / (1.0 - beta1_t)
        c.pre_decay = h.weight_decay * lr
    return c


cdef inline double clip_factor(double sumsq, double grad_clip) noexcept nogil:
    """Thinc's rule: scale by grad_clip / norm when norm >= grad_clip."""
    cdef double norm = sqrt(sumsq)
    if grad_clip > 0.0 and norm >= grad_clip:
        return grad_clip / norm
    return 1.0


cdef inline bint syncs(Hyper h, long t) noexcept:
    return h.lookahead_k > 0 and t % h.lookahead_k == 0


cdef int check_call(object key, long t, double lr_scale) except -1:
    """Validate the per-call numbers of an update of `key`."""
    if not (isfinite(lr_scale) and lr_scale >= 0.0):
        raise ValueError(f"key {key!r}: lr_scale must be a finite number >= 0, got {lr_scale}")
    if t < 1:
        raise ValueError(f"key {key!r}: update count must be >= 1, got {t}")
    return 0


def coefs(Hyper hyper, long t, double lr_scale=1.0, object key=None) -> dict:
    """The per-call scalars as a dict (for the GPU kernels and the tests)."""
    check_call(key, t, lr_scale)
    cdef Coefs c = make_coefs(hyper, t, lr_scale)
    out = dict(c)
    out["rectified"] = bool(c.rectified)
    out["kind"] = hyper.kind
    out["lookahead_sync"] = bool(syncs(hyper, t))
    return out


def clip_sum_squares(object gradient, object weights, double l2=0.0) -> float:
    """The clip norm's sum of squares, sum((g + l2*w)**2) (sum(g**2) when l2 == 0: the
    weights are not read), in the kernels' fixed order."""
    cdef int typenum = check_pair_c("clip_sum_squares", weights, gradient)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>weights)
    cdef void* g = cnp.PyArray_DATA(<cnp.ndarray>gradient)
    cdef void* w = cnp.PyArray_DATA(<cnp.ndarray>weights)
    cdef int n_threads = N_THREADS
    cdef double sumsq
    with nogil:
        sumsq = sum_squares(typenum, g, w, l2, n, n_threads)
    return sumsq


def clip_scale(double sumsq, double grad_clip) -> float:
    """The gradient multiplier for a gradient whose squared L2 norm is `sumsq`."""
    return clip_factor(sumsq, grad_clip)


# ---------------------------------------------------------------- validation

cdef struct Task:
    void* w
    void* g
    void* m
    void* v
    void* avg
    void* slow
    Py_ssize_t n
    int dtype
    long t
    Coefs c


cdef str describe(object x):
    if isinstance(x, cnp.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


cdef int check_float_array(object key, str what, object x) except -1:
    if not cnp.PyArray_Check(x):
        raise TypeError(f"key {key!r}: {what} must be a numpy.ndarray, got {describe(x)}")
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if typenum == cnp.NPY_FLOAT16:
        raise TypeError(
            f"key {key!r}: {what} is float16; optim updates float32 or float64 only. "
            "Keep a float32 master copy of float16 weights and update that."
        )
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError(f"key {key!r}: {what} must be float32 or float64, got {x.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x):
        raise ValueError(f"key {key!r}: {what} must be C-contiguous (use numpy.ascontiguousarray)")
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>x):
        raise ValueError(f"key {key!r}: {what} is read-only; the update writes it in place")
    return typenum


cdef bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int d, ndim = cnp.PyArray_NDIM(a)
    if ndim != cnp.PyArray_NDIM(b):
        return False
    for d in range(ndim):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef int check_pair_c(object key, object weights, object gradient) except -1:
    """Validate weights and gradient together; return their numpy type number."""
    cdef int typenum = check_float_array(key, "weights", weights)
    if check_float_array(key, "gradient", gradient) != typenum:
        raise TypeError(
            f"key {key!r}: gradient is {gradient.dtype} but weights are {weights.dtype}"
        )
    if not same_shape(<cnp.ndarray>gradient, <cnp.ndarray>weights):
        raise ValueError(
            f"key {key!r}: gradient has shape {gradient.shape}, weights have shape {weights.shape}"
        )
    return typenum


cdef void* state_data(object key, str what, object x, int typenum, object weights,
                      bint required) except? NULL:
    """Validate one state array against the weights; return its data pointer (or NULL)."""
    if x is None:
        if required:
            raise ValueError(f"key {key!r}: {what} is missing for this optimizer")
        return NULL
    if check_float_array(key, what, x) != typenum:
        raise TypeError(f"key {key!r}: {what} is {x.dtype}, weights are {weights.dtype}")
    if not same_shape(<cnp.ndarray>x, <cnp.ndarray>weights):
        raise ValueError(
            f"key {key!r}: {what} has shape {x.shape}, weights have shape {weights.shape}"
        )
    return cnp.PyArray_DATA(<cnp.ndarray>x)


cdef int fill_task(Task* task, Hyper h, object key, object weights, object gradient,
                   object mom1, object mom2, object average, object slow, long t,
                   double lr_scale, const Task* previous=NULL) except -1:
    """Validate one update's arguments and fill `task`; touches no array memory.
    `previous`: a task filled for the same hyperparameters (its coefs are reused when
    its t is this one's)."""
    cdef int typenum = check_pair_c(key, weights, gradient)
    check_call(key, t, lr_scale)
    cdef Kind kind = h._kind()
    cdef bint moments = kind != KIND_SGD
    task.w = cnp.PyArray_DATA(<cnp.ndarray>weights)
    task.g = cnp.PyArray_DATA(<cnp.ndarray>gradient)
    task.m = state_data(key, "mom1", mom1, typenum, weights, moments) if moments else NULL
    task.v = state_data(key, "mom2", mom2, typenum, weights, moments) if moments else NULL
    task.avg = state_data(key, "average", average, typenum, weights, False)
    task.slow = NULL
    if syncs(h, t):
        task.slow = state_data(key, "lookahead weights", slow, typenum, weights, True)
    task.n = cnp.PyArray_SIZE(<cnp.ndarray>weights)
    task.dtype = typenum
    task.t = t
    if previous != NULL and previous.t == t:
        task.c = previous.c
    else:
        task.c = make_coefs(h, t, lr_scale)
    return 0


# ---------------------------------------------------------------- running the loops

cdef enum:
    PARTIALS = 1024  # chunk sums of the clip norm computed per round


cdef inline const real_t* shifted(const real_t* p, Py_ssize_t i) noexcept nogil:
    """p + i, or NULL when p is NULL."""
    if p == NULL:
        return NULL
    return p + i


cdef inline double chunk_sum(int dtype, const void* g, const void* w, double l2,
                             Py_ssize_t n, Py_ssize_t c) noexcept nogil:
    """The sum of squares of chunk c of an n-element tensor, by the active loops (w NULL:
    the terms are g alone)."""
    cdef Py_ssize_t start = c * NORM_CHUNK
    cdef Py_ssize_t size = min(<Py_ssize_t>NORM_CHUNK, n - start)
    if dtype == cnp.NPY_FLOAT32:
        return LOOPS.chunk_sum_squares_f32(<const float*>g + start,
                                           shifted(<const float*>w, start), <float>l2, size)
    return LOOPS.chunk_sum_squares_f64(<const double*>g + start,
                                       shifted(<const double*>w, start), l2, size)


cdef struct NormRound:  # chunks first .. first + count - 1, cut into n_pieces pieces
    int dtype
    const void* g
    const void* w
    double l2
    Py_ssize_t n
    Py_ssize_t first
    Py_ssize_t count
    Py_ssize_t n_pieces
    double* partials


cdef void norm_piece(void* arg, Py_ssize_t i) noexcept nogil:
    cdef NormRound* r = <NormRound*>arg
    cdef Py_ssize_t c
    for c in range(r.count * i // r.n_pieces, r.count * (i + 1) // r.n_pieces):
        r.partials[c] = chunk_sum(r.dtype, r.g, r.w, r.l2, r.n, r.first + c)


cdef double sum_squares(int dtype, const void* g, const void* w, double l2, Py_ssize_t n,
                        int n_threads) noexcept nogil:
    """sum((g + l2*w)**2), or sum(g**2) without reading w when l2 == 0, in the fixed
    order of docs/numerics.md ("The clip norm"): the chunk sums (PARTIALS at a time, by
    up to n_threads threads) are combined once, in chunk order: chunk c goes to lane
    c % 32, then lane_tree. The thread count changes who computes a chunk sum, never
    which numbers are added in which order."""
    cdef double lanes[NORM_LANES]
    cdef double partials[PARTIALS]
    cdef NormRound r = NormRound(dtype, g, w, l2, n, 0, 0, 1, &partials[0])
    cdef Py_ssize_t c, n_chunks = (n + NORM_CHUNK - 1) // NORM_CHUNK
    if l2 == 0.0:
        r.w = NULL  # the terms are g alone: the loops read no weights
    for c in range(NORM_LANES):
        lanes[c] = 0.0
    while r.first < n_chunks:
        r.count = min(<Py_ssize_t>PARTIALS, n_chunks - r.first)
        r.n_pieces = pieces_for(r.count * NORM_CHUNK, n_threads)
        optim_parallel(norm_piece, &r, r.n_pieces, n_threads)
        for c in range(r.count):
            lanes[(r.first + c) % NORM_LANES] += partials[c]
        r.first += r.count
    return lane_tree(lanes)


cdef inline real_t* at(real_t* p, Py_ssize_t i) noexcept nogil:
    return p + i if p != NULL else NULL


cdef void run_range(const Task* task, Kind kind, Py_ssize_t start,
                    Py_ssize_t stop) noexcept nogil:
    """The fused pass of `kind` over elements [start, stop) of the task's arrays."""
    if task.dtype == cnp.NPY_FLOAT32:
        LOOPS.update_f32(kind, at(<float*>task.w, start), at(<float*>task.g, start),
                         at(<float*>task.m, start), at(<float*>task.v, start),
                         at(<float*>task.avg, start), at(<float*>task.slow, start),
                         stop - start, &task.c)
    else:
        LOOPS.update_f64(kind, at(<double*>task.w, start), at(<double*>task.g, start),
                         at(<double*>task.m, start), at(<double*>task.v, start),
                         at(<double*>task.avg, start), at(<double*>task.slow, start),
                         stop - start, &task.c)


cdef struct Split:  # one task's pass cut into n_pieces pieces of whole norm chunks
    Task* task
    Kind kind
    Py_ssize_t n_pieces


cdef void split_piece(void* arg, Py_ssize_t i) noexcept nogil:
    cdef Split* s = <Split*>arg
    run_range(s.task, s.kind, piece_start(s.task.n, s.n_pieces, i),
              piece_start(s.task.n, s.n_pieces, i + 1))


cdef void run_task(Task* task, Kind kind, double grad_clip, int n_threads) noexcept nogil:
    """Clip factor (if clipping), then the fused pass. A large task is cut into pieces
    of whole norm chunks for up to n_threads threads: each element's arithmetic is the
    same in any piece, so the bits do not depend on n_threads."""
    cdef Split s = Split(task, kind, pieces_for(task.n, n_threads))
    if grad_clip > 0.0:
        task.c.clip_scale = clip_factor(
            sum_squares(task.dtype, task.g, task.w, task.c.l2, task.n, n_threads), grad_clip)
    if s.n_pieces == 1:
        run_range(task, kind, 0, task.n)
    else:
        optim_parallel(split_piece, &s, s.n_pieces, n_threads)


cdef struct Groups:  # step_many's small tasks: group b is tasks first[b] .. first[b+1]-1
    Task* tasks
    const Py_ssize_t* first
    Kind kind
    double grad_clip
    int n_threads


cdef void group_piece(void* arg, Py_ssize_t b) noexcept nogil:
    """Run group b's tasks whole on this thread (the large ones were run split)."""
    cdef Groups* gr = <Groups*>arg
    cdef Py_ssize_t i
    for i in range(gr.first[b], gr.first[b + 1]):
        if pieces_for(gr.tasks[i].n, gr.n_threads) == 1:
            run_task(&gr.tasks[i], gr.kind, gr.grad_clip, 1)


cdef void run_tasks(Task* tasks, const Py_ssize_t* sizes, Py_ssize_t n_tasks, Kind kind,
                    double grad_clip, int n_threads) noexcept nogil:
    """step_many's loop. Tasks large enough to split run one after another as in `step`;
    the others are cut into contiguous groups of about equal size, each task run whole
    by one thread. The tasks must not share memory."""
    cdef Py_ssize_t i, n_groups
    cdef Py_ssize_t first[MAX_PIECES + 1]
    cdef Groups gr = Groups(tasks, &first[0], kind, grad_clip, n_threads)
    for i in range(n_tasks):
        if pieces_for(sizes[i], n_threads) > 1:
            run_task(&tasks[i], kind, grad_clip, n_threads)
    n_groups = deal(sizes, n_tasks, n_threads, first)
    optim_parallel(group_piece, &gr, n_groups, n_threads)


# ---------------------------------------------------------------- Python entry points

def step(Hyper hyper, object key, object weights, object gradient, object mom1,
         object mom2, object average, object slow, long t, double lr_scale=1.0) -> None:
    """Update `weights` in place and zero `gradient`: the t-th update of `key`.

    mom1/mom2 are required for Adam and RAdam (None for SGD); average is None when
    averages are off; slow (the lookahead weights) is read only on sync steps.
    """
    step_c(hyper, key, weights, gradient, mom1, mom2, average, slow, t, lr_scale)


cdef class KnownKeys:
    """The per-call hot path of known NumPy keys, in C: the optimizer's state dicts, held
    directly (optim.backends.cpu.CpuUpdates is this plus the step_many paths)."""

    cdef readonly Hyper hyper
    cdef readonly dict mom1, mom2, lookahead, shapes
    cdef readonly object averages, nr_update  # dict or None; a defaultdict(int)

    def __init__(self, Hyper hyper, dict mom1, dict mom2, object averages, dict lookahead,
                 object nr_update, dict shapes) -> None:
        self.hyper, self.mom1, self.mom2, self.averages = hyper, mom1, mom2, averages
        self.lookahead, self.nr_update, self.shapes = lookahead, nr_update, shapes

    def step_known(self, object key, object weights, object gradient,
                   double lr_scale=1.0) -> bool:
        """Update a known key whose state is complete; False (nothing touched) when the
        general path is needed (a new key, other array types, an empty gradient)."""
        shape = self.shapes.get(key)
        if (shape is None or type(weights) is not cnp.ndarray
                or type(gradient) is not cnp.ndarray or not (<cnp.ndarray>gradient).size):
            return False
        if weights.shape != shape:
            from optim.hyperparams import shape_error

            raise ValueError(shape_error(key, weights.shape, shape))
        cdef long t = self.nr_update[key] + 1
        averages = self.averages
        step_c(self.hyper, key, weights, gradient, self.mom1.get(key), self.mom2.get(key),
               None if averages is None else averages.get(key), self.lookahead.get(key), t,
               lr_scale)
        self.nr_update[key] = t
        return True


cdef int step_c(Hyper hyper, object key, object weights, object gradient, object mom1,
                object mom2, object average, object slow, long t, double lr_scale) except -1:
    cdef Task task
    fill_task(&task, hyper, key, weights, gradient, mom1, mom2, average, slow, t, lr_scale)
    cdef Kind kind = hyper._kind()
    cdef double grad_clip = hyper.grad_clip
    cdef int n_threads = N_THREADS
    if task.n >= GIL_FREE_SIZE:
        with nogil:
            run_task(&task, kind, grad_clip, n_threads)
    else:
        run_task(&task, kind, grad_clip, 1)
    return 0


def step_many(Hyper hyper, list keys, list weights, list gradients, list mom1, list mom2,
              list averages, list slows, list counts, double lr_scale=1.0) -> Batch:
    """Update many tensors in one call: validates them all, then loops without the GIL.

    Each list holds one entry per key (None where a state array is absent); counts[i]
    is the update number t of keys[i]. Same results as calling `step` in order. Returns
    the batch, which `Batch.again` runs again for the same keys and state arrays.
    """
    cdef Py_ssize_t n = len(keys)
    for name, seq in (("weights", weights), ("gradients", gradients), ("mom1", mom1),
                      ("mom2", mom2), ("averages", averages), ("slows", slows),
                      ("counts", counts)):
        if len(seq) != n:
            raise ValueError(f"step_many: {len(seq)} {name} for {n} keys")
    cdef Batch batch = Batch.__new__(Batch)
    batch.fill(hyper, keys, weights, gradients, mom1, mom2, averages, slows, counts,
               lr_scale)
    batch.run(hyper)
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
    cdef tuple state            # n * N_STATE arrays or None, task by task
    cdef tuple stores           # the state dicts `bind` recorded, and their lengths
    cdef Py_ssize_t* store_sizes
    cdef tuple snapshots        # per state dict: (its keys, its values) when bound, or None
    cdef object counts          # nr_update when bound, and its keys then (None: look up)
    cdef list count_keys
    cdef Py_ssize_t* count_task  # per entry of count_keys: the task it counts, or -1
    cdef bint busy              # checking or running: no other call may refill it

    cdef int fill(self, Hyper hyper, list keys, list weights, list gradients, list mom1,
                  list mom2, list averages, list slows, list counts,
                  double lr_scale) except -1:
        """Validate every update (raising fill_task's errors) and fill the tables."""
        cdef Py_ssize_t i, d, n = len(keys), n_dims = 0
        self.mem = Pool()
        self.n = n
        self.keys = list(keys)
        self.tasks = <Task*>self.mem.alloc(max(n, 1), sizeof(Task))
        self.sizes = <Py_ssize_t*>self.mem.alloc(max(n, 1), sizeof(Py_ssize_t))
        self.dim_start = <Py_ssize_t*>self.mem.alloc(n + 1, sizeof(Py_ssize_t))
        for i in range(n):
            fill_task(&self.tasks[i], hyper, keys[i], weights[i], gradients[i], mom1[i],
                      mom2[i], averages[i], slows[i], counts[i], lr_scale,
                      &self.tasks[i - 1] if i else NULL)
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

    cdef int run(self, Hyper hyper) except -1:
        """The loops over the filled tasks, without the GIL."""
        cdef Kind kind = hyper._kind()
        cdef double grad_clip = hyper.grad_clip
        cdef int n_threads = N_THREADS
        with nogil:
            run_tasks(self.tasks, self.sizes, self.n, kind, grad_clip, n_threads)
        return 0

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
            for i in range(self.n):  # each key's array, as _device.same_state does
                value = PyDict_GetItem(store, <object>PyList_GET_ITEM(keys, i))
                expected = PyTuple_GET_ITEM(self.state, N_STATE * i + k)
                if value != (NULL if expected == <PyObject*>None else expected):
                    return 0
        return 1

    def again(self, Hyper hyper, list keys, list weights, list gradients, object nr_update,
              double lr_scale, tuple stores) -> bool:
        """Run the batch again on new weights and gradients of the same keys (equal, in
        the same order), the counts read from and written back to `nr_update`. The
        lists must be the caller's own (no other code holds them).

        Returns False, having touched nothing, when anything differs from what the
        batch was filled with (the caller then takes the general path, which raises
        the precise error): other keys, replaced state dicts, an array that fill_task
        would reject, a missing count or an invalid lr_scale."""
        if self.busy:
            return False
        self.busy = True  # from the start: comparing and hashing keys runs Python code
        try:
            return self.refill(hyper, keys, weights, gradients, nr_update, lr_scale,
                               stores) == 1
        finally:
            self.busy = False

    cdef int refill(self, Hyper hyper, list keys, list weights, list gradients,
                    object nr_update, double lr_scale, tuple stores) except -1:
        """again's work: 1 if it ran, 0 if it touched nothing."""
        cdef Py_ssize_t i, n = self.n
        cdef Task* task
        cdef long t
        cdef int typenum, ndim
        cdef const Py_ssize_t* dims
        cdef object w, g, m, v, avg, slow
        cdef Kind kind = hyper._kind()
        cdef bint moments = kind != KIND_SGD
        # The caller's lists are its own copies: Python code run by comparing or hashing
        # keys cannot change them. First what runs such code, then only C.
        if (PyList_GET_SIZE(weights) != n or PyList_GET_SIZE(gradients) != n
                or not PyDict_Check(nr_update) or not (isfinite(lr_scale) and lr_scale >= 0.0)):
            return 0
        if (keys != self.keys or not self.read_counts(keys, nr_update)
                or not self.unchanged(stores, keys)):
            return 0
        for i in range(n):
            task = &self.tasks[i]
            t = task.t
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
            if syncs(hyper, t):
                if not fits(slow, typenum, ndim, dims):
                    return 0
                task.slow = cnp.PyArray_DATA(<cnp.ndarray>slow)
            if i and self.tasks[i - 1].t == t:
                task.c = self.tasks[i - 1].c
            else:
                task.c = make_coefs(hyper, t, lr_scale)
        self.run(hyper)
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
        """nr_update[keys[i]] = the task's t, one int object per run of equal counts."""
        cdef Py_ssize_t i
        cdef long last = -1
        cdef object t = None
        for i in range(self.n):
            if self.tasks[i].t != last:
                last = self.tasks[i].t
                t = last
            PyDict_SetItem(nr_update, <object>PyList_GET_ITEM(keys, i), t)
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


def check_pair(object key, object weights, object gradient) -> None:
    """Raise a clear error unless weights and gradient can be updated together."""
    check_pair_c(key, weights, gradient)


# ---------------------------------------------------------------- GPU per-call scalars
# Appended for the GPU kernels (optim/_kernels_cuda.py): the same `make_coefs` numbers,
# as flat doubles in a fixed order the generated CUDA source indexes by name.

DEVICE_COEFS = ("lr", "beta1", "beta2", "eps", "l2", "pre_decay", "post_decay", "avg_keep",
                "la_alpha")
DEVICE_ROW = len(DEVICE_COEFS) + 1  # a step_many table row: the coefs, then the clip factor


def device_coefs(Hyper hyper, long t, double lr_scale=1.0, object key=None) -> tuple:
    """(variant, *DEVICE_COEFS) for the t-th update of `key`, as Python floats.

    variant = rectified | lookahead_sync << 1: which of a kind's 4 kernels runs.
    """
    check_call(key, t, lr_scale)
    cdef Coefs c = make_coefs(hyper, t, lr_scale)
    return ((1 if c.rectified else 0) | (2 if syncs(hyper, t) else 0), c.lr, c.beta1,
            c.beta2, c.eps, c.l2, c.pre_decay, c.post_decay, c.avg_keep, c.la_alpha)


def device_coef_table(Hyper hyper, list keys, list counts, double lr_scale,
                      double[:, ::1] out, unsigned char[::1] variants) -> None:
    """Fill one DEVICE_ROW row of `out` and one `variants` entry per key (step_many on
    the GPU): row i holds the coefs of update counts[i] of keys[i], then 1.0 (no clip)."""
    cdef Py_ssize_t i, n = len(keys)
    cdef long t
    cdef Coefs c
    if len(counts) != n or out.shape[0] != n or out.shape[1] != DEVICE_ROW or variants.shape[0] != n:
        raise ValueError("device_coef_table: keys, counts, out and variants disagree")
    for i in range(n):
        t = counts[i]
        check_call(keys[i], t, lr_scale)
        c = make_coefs(hyper, t, lr_scale)
        variants[i] = (1 if c.rectified else 0) | (2 if syncs(hyper, t) else 0)
        out[i, 0] = c.lr
        out[i, 1] = c.beta1
        out[i, 2] = c.beta2
        out[i, 3] = c.eps
        out[i, 4] = c.l2
        out[i, 5] = c.pre_decay
        out[i, 6] = c.post_decay
        out[i, 7] = c.avg_keep
        out[i, 8] = c.la_alpha
        out[i, 9] = 1.0
