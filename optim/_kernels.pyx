"""CPU kernels: one fused pass over memory per update, for float32 and float64.

The loops themselves are in optim/_loops.pxi, built once per SIMD level; this module
picks the level's table (optim.cpu chooses which at import), validates every array
before any loop starts (the loops run without bounds checks), and splits large updates
across threads in whole norm chunks. The math is docs/numerics.md.
"""
import importlib
import importlib.util

from cpython.dict cimport PyDict_Check, PyDict_GetItem, PyDict_Next, PyDict_SetItem, PyDict_Size
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_CheckExact
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.object cimport PyObject, PyObject_Hash
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_New
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.limits cimport LONG_MAX
from libc.math cimport fabs, sqrt, isfinite
from libc.string cimport memset
from cymem.cymem cimport Pool

from optim.cpu._loops cimport (
    KIND_ADAM, KIND_RADAM, KIND_SGD, MAX_PIECES, MAX_THREADS, NORM_CHUNK, NORM_LANES,
    OPTIM_LOOPS_CAPSULE, PIECE_MIN, Coefs, Coupled, GradientOnly, Kind, Loops, deal,
    lane_tree, norm_term, piece_start, pieces_for, real_t, term,
)
from optim.cpu._pool cimport OPTIM_POOL, optim_parallel

cimport numpy as cnp

cnp.import_array()

KIND_NAMES = ("sgd", "adam", "radam")
# Hyper.nonfinite's names, indexed by its value (the NONFINITE_* of _kernels.pxd)
NONFINITE_MODES = tuple(
    {NONFINITE_APPLY: "apply", NONFINITE_SKIP: "skip", NONFINITE_RAISE: "raise"}[mode]
    for mode in range(3))
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

# SIMD levels, lowest first: each is a module optim.cpu._loops_<level> with its LOOPS table.
# setup.py's flags per level are what optim_cpu_level checks the CPU for.
ISA_LEVELS = ("baseline", "avx2", "avx512")

cdef Loops LOOPS            # the active level's loops (a copy of its table)
cdef int N_THREADS = 1      # threads a large update may use


cdef int n_threads() noexcept:
    return N_THREADS
ACTIVE_LOOPS = PyCapsule_New(&LOOPS, OPTIM_LOOPS_CAPSULE, NULL)
"""The active `Loops` table, read by optim.bench._roofline at each run."""


def isa_built() -> tuple:
    """The SIMD levels this build has loops for (setup.py skips what the compiler lacks)."""
    return tuple(level for level in ISA_LEVELS
                 if importlib.util.find_spec(f"optim.cpu._loops_{level}") is not None)


def isa_supported() -> tuple:
    """The SIMD levels this CPU (and OS) can run, built or not."""
    return ISA_LEVELS[:optim_cpu_level() + 1]


def isa() -> str:
    """The SIMD level whose loops run now."""
    return LOOPS.isa.decode()


def use_isa(str level) -> None:
    """Run the loops built for `level` from now on (optim.cpu validates the name)."""
    if level not in isa_supported():
        raise ValueError(f"SIMD level {level!r}: this CPU supports {', '.join(isa_supported())}")
    # import only what the CPU runs: a level's module may use its instructions anywhere
    module = importlib.import_module(f"optim.cpu._loops_{level}")
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


use_isa("baseline")  # optim.cpu picks the best level at import


cdef class Hyper:
    """Current hyperparameter values, read by the kernels without touching Python
    (its attributes are declared in optim/_kernels.pxd)."""

    @property
    def kind(self) -> str:
        return KIND_NAMES[self._kind()]

    def copy(self) -> Hyper:
        """A new Hyper with the same values."""
        cdef Hyper other = Hyper.__new__(Hyper)
        other.set_from(self)
        return other

    def set_from(self, Hyper other) -> None:
        """Take every value of `other`."""
        self.learn_rate, self.beta1, self.beta2 = other.learn_rate, other.beta1, other.beta2
        self.eps, self.L2, self.grad_clip = other.eps, other.L2, other.grad_clip
        self.weight_decay, self.lookahead_alpha = other.weight_decay, other.lookahead_alpha
        self.lookahead_k, self.L2_is_weight_decay = other.lookahead_k, other.L2_is_weight_decay
        self.use_radam, self.frozen, self.nonfinite = other.use_radam, other.frozen, other.nonfinite

    cdef Kind _kind(self) noexcept:
        if self.use_radam:
            return KIND_RADAM
        if self.beta1 == 0.0 and self.beta2 == 0.0:
            return KIND_SGD
        return KIND_ADAM


# ---------------------------------------------------------------- the per-call scalars

cdef double SPLIT = 134217729.0  # 2**27 + 1: Veltkamp's split of a double in two halves


cdef inline double product_error(double a, double b, double p) noexcept nogil:
    """The rounding error of p = a * b (a * b == p + error, exactly), by Dekker's split
    of a and b into halves whose products are exact: no FMA needed (and none may be
    contracted in: optim builds with -ffp-contract=off)."""
    cdef double c = SPLIT * a
    cdef double a_hi = c - (c - a)
    cdef double a_lo = a - a_hi
    c = SPLIT * b
    cdef double b_hi = c - (c - b)
    cdef double b_lo = b - b_hi
    return ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


cdef inline void dd_multiply(double* hi, double* lo, double b_hi, double b_lo) noexcept nogil:
    """(hi, lo) *= (b_hi, b_lo) in double-double arithmetic, normalised (hi is the
    product rounded to double). Beyond 1e300 (Dekker's split would overflow) or at inf,
    a plain product."""
    cdef double p = hi[0] * b_hi
    cdef double e
    if not (fabs(p) < 1e300 and fabs(hi[0]) < 1e300 and fabs(b_hi) < 1e300):
        hi[0], lo[0] = p, 0.0
        return
    e = product_error(hi[0], b_hi, p) + (hi[0] * b_lo + lo[0] * b_hi)
    hi[0] = p + e
    lo[0] = e - (hi[0] - p)


cdef double power_of(double x, long n) noexcept nogil:
    """x**n (n >= 0): exponentiation by squaring, least significant bit first, in
    double-double (about 106 bits), rounded to double once at the end. Only correctly
    rounded + - * in a fixed order, so the same bits under any libm, compiler and CPU
    (libm's pow is not correctly rounded and differs between them); and, its error
    being far below half an ulp, it is x**n correctly rounded in all but rare ties."""
    cdef double r_hi = 1.0, r_lo = 0.0, x_hi = x, x_lo = 0.0
    while n > 0:
        if n & 1:
            dd_multiply(&r_hi, &r_lo, x_hi, x_lo)
        n >>= 1
        if n:
            dd_multiply(&x_hi, &x_lo, x_hi, x_lo)
    return r_hi


def power(double x, long n) -> float:
    """x**n (an integer n >= 0) as the kernels compute it (`power_of`); for schedules."""
    if n < 0:
        raise ValueError(f"power: the exponent must be >= 0, got {n}")
    return power_of(x, n)


cdef Coefs make_coefs(Hyper h, long t, double lr_scale) noexcept:
    """Scalars for the t-th update of a key (t counts this update): + - * / and sqrt
    only (docs/numerics.md, "Per-call scalars")."""
    cdef Coefs c
    cdef double lr = h.learn_rate * lr_scale
    cdef double beta1_t, beta2_t, rho_inf, rho_t
    cdef Kind kind = h._kind()
    if not (h.powers_t == t and h.powers_beta1 == h.beta1 and h.powers_beta2 == h.beta2):
        h.beta1_t, h.beta2_t = power_of(h.beta1, t), power_of(h.beta2, t)
        h.powers_t, h.powers_beta1, h.powers_beta2 = t, h.beta1, h.beta2
    beta1_t, beta2_t = h.beta1_t, h.beta2_t
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
        c.lr = h.learn_rate * sqrt(1.0 - beta2_t) / (1.0 - beta1_t) * lr_scale
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


cdef bint syncs(Hyper h, long t) noexcept:
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
    `previous`: a task filled with the same Hyper (its coefs are reused when its t is
    this one's)."""
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
    task.kind = kind
    task.grad_clip = h.grad_clip
    task.nonfinite = h.nonfinite
    task.outcome = OUTCOME_UPDATED
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


cdef struct FiniteScan:  # all_finite_terms cut into n_pieces pieces
    int dtype
    const void* g
    const void* w
    double l2
    Py_ssize_t n
    Py_ssize_t n_pieces
    bint* finite  # per piece


cdef void finite_piece(void* arg, Py_ssize_t i) noexcept nogil:
    cdef FiniteScan* s = <FiniteScan*>arg
    cdef Py_ssize_t start = piece_start(s.n, s.n_pieces, i)
    cdef Py_ssize_t size = piece_start(s.n, s.n_pieces, i + 1) - start
    if s.dtype == cnp.NPY_FLOAT32:
        s.finite[i] = LOOPS.all_finite_f32(<const float*>s.g + start,
                                           shifted(<const float*>s.w, start), <float>s.l2, size)
    else:
        s.finite[i] = LOOPS.all_finite_f64(<const double*>s.g + start,
                                           shifted(<const double*>s.w, start), s.l2, size)


cdef bint all_finite_terms(int dtype, const void* g, const void* w, double l2, Py_ssize_t n,
                           int n_threads) noexcept nogil:
    """Whether every clip norm term (g + l2*w, or g without reading w when l2 == 0) is
    finite: the non-finite check of an unclipped update, one read in the arrays' width
    (by up to n_threads threads)."""
    cdef bint finite[MAX_PIECES]
    cdef FiniteScan s = FiniteScan(dtype, g, w, l2, n, pieces_for(n, n_threads), &finite[0])
    cdef Py_ssize_t i
    if l2 == 0.0:
        s.w = NULL  # the terms are g alone: the loops read no weights
    optim_parallel(finite_piece, &s, s.n_pieces, n_threads)
    for i in range(s.n_pieces):
        if not finite[i]:
            return False
    return True


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


cdef int find_nonfinite(const Task* task) noexcept nogil:
    """OUTCOME_NAN if a term of the clip norm (g + l2*w in the arrays' type, or g) is a
    NaN, OUTCOME_INF if one is infinite (and none a NaN), else 0: the confirmation of a
    sum of squares that is not finite, which finite float64 terms can overflow."""
    if task.dtype == cnp.NPY_FLOAT32:
        return scan_terms(<const float*>task.g, <const float*>task.w, <float>task.c.l2, task.n)
    return scan_terms(<const double*>task.g, <const double*>task.w, task.c.l2, task.n)


cdef int scan_terms(const real_t* g, const real_t* w, real_t l2, Py_ssize_t n) noexcept nogil:
    if l2 != 0:
        return scan(g, w, l2, n, Coupled(0))
    return scan(g, w, l2, n, GradientOnly(0))


cdef int scan(const real_t* g, const real_t* w, real_t l2, Py_ssize_t n,
              norm_term kind) noexcept nogil:
    cdef Py_ssize_t i
    cdef real_t x
    cdef int found = 0
    for i in range(n):
        x = term(g, w, l2, i, kind)
        if x != x:
            return OUTCOME_NAN
        if x - x != 0:
            found = OUTCOME_INF
    return found


cdef void zero_gradient(Task* task) noexcept nogil:
    memset(task.g, 0, task.n * (sizeof(float) if task.dtype == cnp.NPY_FLOAT32
                                else sizeof(double)))


cdef int measure(Task* task, int n_threads) noexcept nogil:
    """Before anything is written: the clip factor into the task's coefs (1 without
    clipping), and, when the task checks (nonfinite skip or raise), whether its gradient
    holds a NaN or an inf: 0, OUTCOME_NAN or OUTCOME_INF (docs/numerics.md)."""
    cdef double sumsq
    cdef int found = 0
    cdef bint checks = task.nonfinite != NONFINITE_APPLY
    task.c.clip_scale = 1.0
    if task.grad_clip > 0.0:  # the norm is needed anyway: it is the check
        sumsq = sum_squares(task.dtype, task.g, task.w, task.c.l2, task.n, n_threads)
        if checks and not isfinite(sumsq):  # a non-finite term, or squares overflowed
            found = find_nonfinite(task)
        task.c.clip_scale = clip_factor(sumsq, task.grad_clip)
    elif checks and not all_finite_terms(task.dtype, task.g, task.w, task.c.l2, task.n,
                                         n_threads):
        found = find_nonfinite(task)  # NaN or inf
    return found


cdef void apply(Task* task, int n_threads) noexcept nogil:
    """The fused pass. A large task is cut into pieces of whole norm chunks for up to
    n_threads threads: each element's arithmetic is the same in any piece, so the bits
    do not depend on n_threads."""
    cdef Split s
    if n_threads == 1:  # (step_many's small tasks: no piece to plan)
        run_range(task, task.kind, 0, task.n)
        return
    s = Split(task, task.kind, pieces_for(task.n, n_threads))
    if s.n_pieces == 1:
        run_range(task, task.kind, 0, task.n)
    else:
        optim_parallel(split_piece, &s, s.n_pieces, n_threads)


cdef void run_task(Task* task, int n_threads) noexcept nogil:
    """Measure, then the fused pass; a gradient found non-finite in skip mode is zeroed
    and nothing else is written, in raise mode nothing at all (task.outcome says)."""
    if task.grad_clip <= 0.0 and task.nonfinite == NONFINITE_APPLY:  # nothing to measure
        task.c.clip_scale = 1.0
        task.outcome = OUTCOME_UPDATED
        apply(task, n_threads)
        return
    task.outcome = measure(task, n_threads)
    if task.outcome == OUTCOME_UPDATED:
        apply(task, n_threads)
    elif task.nonfinite == NONFINITE_SKIP:
        zero_gradient(task)


cdef struct Groups:  # step_many's small tasks: group b is tasks first[b] .. first[b+1]-1
    Task* tasks
    const Py_ssize_t* first
    int n_threads
    bint measured  # raise mode: every task was measured (and found finite) before


cdef void group_piece(void* arg, Py_ssize_t b) noexcept nogil:
    """Run group b's tasks whole on this thread (the large ones were run split)."""
    cdef Groups* gr = <Groups*>arg
    cdef Py_ssize_t i
    for i in range(gr.first[b], gr.first[b + 1]):
        if pieces_for(gr.tasks[i].n, gr.n_threads) == 1:
            if gr.measured:
                apply(&gr.tasks[i], 1)
            else:
                run_task(&gr.tasks[i], 1)


cdef bint run_tasks(Task* tasks, const Py_ssize_t* sizes, Py_ssize_t n_tasks,
                    int n_threads, bint raising) noexcept nogil:
    """step_many's loop. Tasks large enough to split run one after another as in `step`;
    the others are cut into contiguous groups of about equal size, each task run whole
    by one thread. The tasks must not share memory. `raising`: a task is in raise mode
    (the caller knows; each task's nonfinite says which): every task is measured first
    and nothing is written when one is found non-finite: returns False then (the
    outcomes say which), else True."""
    cdef Py_ssize_t i, n_groups
    cdef Py_ssize_t first[MAX_PIECES + 1]
    cdef Groups gr = Groups(tasks, &first[0], n_threads, raising)
    if raising:
        for i in range(n_tasks):
            tasks[i].outcome = measure(&tasks[i], n_threads)
        for i in range(n_tasks):
            if tasks[i].outcome != OUTCOME_UPDATED:
                return False
    for i in range(n_tasks):
        if pieces_for(sizes[i], n_threads) > 1:
            if gr.measured:
                apply(&tasks[i], n_threads)
            else:
                run_task(&tasks[i], n_threads)
    n_groups = deal(sizes, n_tasks, n_threads, first)
    optim_parallel(group_piece, &gr, n_groups, n_threads)
    return True


# ---------------------------------------------------------------- Python entry points

def step(Hyper hyper, object key, object weights, object gradient, object mom1,
         object mom2, object average, object slow, long t, double lr_scale=1.0) -> int:
    """Update `weights` in place and zero `gradient`: the t-th update of `key`. Returns
    the outcome: 0 updated; 1 / 2: a NaN / an inf was found (hyper.nonfinite skip: only
    the gradient was zeroed; raise: nothing was written).

    mom1/mom2 are required for Adam and RAdam (None for SGD); average is None when
    averages are off; slow (the lookahead weights) is read only on sync steps.
    """
    return step_c(hyper, key, weights, gradient, mom1, mom2, average, slow, t, lr_scale)


def zero_gradient_of(object key, object weights, object gradient) -> None:
    """A frozen key's update: validate the pair, zero the gradient, nothing else."""
    cdef Task task
    check_pair_c(key, weights, gradient)
    task.g = cnp.PyArray_DATA(<cnp.ndarray>gradient)
    task.n = cnp.PyArray_SIZE(<cnp.ndarray>gradient)
    task.dtype = cnp.PyArray_TYPE(<cnp.ndarray>gradient)
    zero_gradient(&task)


cdef extern from *:
    """
    /* A dict lookup with the key's hash computed once for all of the hot path's dicts
       (CPython's _PyDict_GetItem_KnownHash, public in its headers 3.10-3.13); elsewhere
       the plain lookup, which hashes the key again. Returns a borrowed reference, or
       NULL (an exception set only if the key's comparison raised). */
    #if !defined(PYPY_VERSION) && PY_VERSION_HEX < 0x030E0000
    #define OPTIM_DICT_GET(d, k, h) _PyDict_GetItem_KnownHash((d), (k), (h))
    #else
    #define OPTIM_DICT_GET(d, k, h) PyDict_GetItemWithError((d), (k))
    #endif
    """
    PyObject* OPTIM_DICT_GET(object d, object key, Py_hash_t h)


cdef inline object dict_get(object d, object key, Py_hash_t h):
    """d.get(key) for a dict d (of any mapping: its get), h being hash(key)."""
    cdef PyObject* found
    if not PyDict_Check(d):
        return d.get(key)
    found = OPTIM_DICT_GET(d, key, h)
    if found == NULL:
        if PyErr_Occurred():  # the key's comparison raised: let the plain get raise it
            PyErr_Clear()
            return d.get(key)
        return None
    return <object>found


cdef class StateDicts:
    """The dicts of per-key state, as the hot paths read them: a struct of six fields
    (`optim.state.KeyStates` is this with the rest of what state means)."""


cdef class KnownKeys:
    """The per-call hot path of known NumPy keys, in C, over the optimizer's per-key
    state (`states`: replacing one of its dicts needs no notice here, each call reads
    them). `key_hyper` (None without groups) maps each key whose group is resolved to
    its Hyper; `report(key, outcome, weights)` hears of every skipped or refused update
    (it raises in raise mode). A known key's count is committed here, as the optimizer
    commits it (`KeyStates.commit`): nr_update[key] = t."""

    cdef readonly Hyper hyper
    cdef readonly StateDicts states
    cdef public object key_hyper, report
    cdef public object batch  # the last step_many's optim.cpu._batch.Batch, kept to rerun

    def __init__(self, Hyper hyper, StateDicts states, object key_hyper=None,
                 object report=None) -> None:
        self.hyper, self.states = hyper, states
        self.key_hyper, self.report = key_hyper, report

    def step_many_again(self, list keys, list weights, list gradients,
                        double lr_scale=1.0) -> bool:
        """Rerun the kept batch if C code finds the same keys, arrays and state
        (`Batch.again`, which commits the counts into nr_update and reports what it
        skipped); False (nothing touched) otherwise."""
        if self.batch is None:
            return False
        cdef StateDicts states = self.states
        return self.batch.again(keys, weights, gradients, states.nr_update, lr_scale,
                                (states.mom1, states.mom2, states.averages, states.lookahead,
                                 states.shapes), self.report)

    def step_known(self, object key, object weights, object gradient,
                   double lr_scale=1.0) -> bool:
        """Update a known key whose state is complete; False (nothing touched) when the
        general path is needed (a new key, other array types, an empty gradient)."""
        cdef Hyper hyper = self.hyper
        cdef StateDicts states = self.states
        cdef Py_hash_t h = PyObject_Hash(key)  # once, for every dict below
        cdef object found
        if self.key_hyper is not None:
            found = dict_get(self.key_hyper, key, h)
            if found is None:
                return False  # the general path resolves the key's group
            hyper = <Hyper>found
            if hyper.frozen:
                if (type(weights) is not cnp.ndarray or type(gradient) is not cnp.ndarray
                        or not (<cnp.ndarray>gradient).size):
                    return False
                zero_gradient_of(key, weights, gradient)
                return True
        shape = dict_get(states.shapes, key, h)
        if (shape is None or type(weights) is not cnp.ndarray
                or type(gradient) is not cnp.ndarray or not (<cnp.ndarray>gradient).size):
            return False
        if weights.shape != shape:
            from optim.settings.defaults import shape_error

            raise ValueError(shape_error(key, weights.shape, shape))
        count = dict_get(states.nr_update, key, h)
        if count is None:
            return False
        cdef long t = count + 1
        averages = states.averages
        cdef int outcome = step_c(hyper, key, weights, gradient,
                                  dict_get(states.mom1, key, h), dict_get(states.mom2, key, h),
                                  None if averages is None else dict_get(averages, key, h),
                                  dict_get(states.lookahead, key, h), t, lr_scale)
        if outcome == OUTCOME_UPDATED:
            states.nr_update[key] = t
        else:
            self.report(key, outcome, weights)
        return True


cdef int step_c(Hyper hyper, object key, object weights, object gradient, object mom1,
                object mom2, object average, object slow, long t, double lr_scale) except -1:
    """One validated update; returns its outcome (OUTCOME_UPDATED / _NAN / _INF)."""
    cdef Task task
    fill_task(&task, hyper, key, weights, gradient, mom1, mom2, average, slow, t, lr_scale)
    cdef int n_threads = N_THREADS
    if task.n >= GIL_FREE_SIZE:
        with nogil:
            run_task(&task, n_threads)
    else:
        run_task(&task, 1)
    return task.outcome


def check_pair(object key, object weights, object gradient) -> None:
    """Raise a clear error unless weights and gradient can be updated together."""
    check_pair_c(key, weights, gradient)
