"""CPU kernels: one fused pass over memory per update, for float32 and float64.

The loops run without bounds checks, so the Python entry points (`step`, `step_many`)
validate every array before any loop starts. The math is docs/numerics.md.
"""
from libc.math cimport pow, sqrt, sqrtf, isfinite
from cymem.cymem cimport Pool

cimport numpy as cnp

cnp.import_array()

cdef enum Kind:
    KIND_SGD = 0
    KIND_ADAM = 1
    KIND_RADAM = 2

KIND_NAMES = ("sgd", "adam", "radam")
cdef Py_ssize_t GIL_FREE_SIZE = 1 << 15  # release the GIL for tensors at least this large

# The clip norm's fixed summation order (docs/numerics.md), shared with the GPU kernels.
cdef enum:
    NORM_CHUNK = 4096  # elements per chunk
    NORM_LANES = 32    # partial sums per chunk (a GPU warp's lanes)

NORM_ORDER = {"chunk": NORM_CHUNK, "lanes": NORM_LANES}


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
    """The clip norm's sum of squares, sum((g + l2*w)**2), in the kernels' fixed order."""
    cdef int typenum = check_pair_c("clip_sum_squares", weights, gradient)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>weights)
    cdef void* g = cnp.PyArray_DATA(<cnp.ndarray>gradient)
    cdef void* w = cnp.PyArray_DATA(<cnp.ndarray>weights)
    if typenum == cnp.NPY_FLOAT32:
        return sum_squares(<float*>g, <float*>w, l2, n)
    return sum_squares(<double*>g, <double*>w, l2, n)


def clip_scale(double sumsq, double grad_clip) -> float:
    """The gradient multiplier for a gradient whose squared L2 norm is `sumsq`."""
    return clip_factor(sumsq, grad_clip)


# ---------------------------------------------------------------- the loops

cdef inline real_t root(real_t x) noexcept nogil:
    """Square root in the array's own precision (sqrtf keeps float32 loops vectorised)."""
    if real_t is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# Optional parts of a pass (averages, lookahead sync, RAdam's rectified step) are
# compile-time flags: Cython emits one branch-free loop per combination, which the C
# compiler vectorises. Run-time dispatch picks the loop once per call.

cdef struct On:
    char unused

cdef struct Off:
    char unused

ctypedef fused avg_flag:
    On
    Off

ctypedef fused sync_flag:
    On
    Off

ctypedef fused rect_flag:
    On
    Off


cdef inline real_t finish(real_t w_new, Py_ssize_t i, real_t* avg, real_t* slow,
                          real_t la_alpha, real_t avg_rate, avg_flag has_avg,
                          sync_flag has_sync) noexcept nogil:
    """Lookahead sync and the average update for one element; returns the new weight."""
    if sync_flag is On:
        slow[i] = slow[i] + la_alpha * (w_new - slow[i])
        w_new = slow[i]
    if avg_flag is On:
        avg[i] = avg[i] - avg_rate * (avg[i] - w_new)
    return w_new


cdef void sgd_pass(real_t* w, real_t* g, real_t* avg, real_t* slow, Py_ssize_t n,
                   const Coefs* c, avg_flag has_avg, sync_flag has_sync) noexcept nogil:
    cdef real_t lr = <real_t>c.lr, l2 = <real_t>c.l2, clip = <real_t>c.clip_scale
    cdef real_t post_decay = <real_t>c.post_decay, la_alpha = <real_t>c.la_alpha
    cdef real_t avg_rate = <real_t>(1.0 - c.avg_keep)
    cdef real_t g_eff, w_new
    cdef Py_ssize_t i
    for i in range(n):
        g_eff = (g[i] + l2 * w[i]) * clip
        w_new = w[i] - lr * g_eff
        w_new = w_new - post_decay * w_new
        g[i] = 0
        w[i] = finish(w_new, i, avg, slow, la_alpha, avg_rate, has_avg, has_sync)


cdef void adam_pass(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg, real_t* slow,
                    Py_ssize_t n, const Coefs* c, avg_flag has_avg, sync_flag has_sync,
                    rect_flag rectified) noexcept nogil:
    """Adam, and RAdam (pre_decay; rectified=Off is RAdam's momentum-only step)."""
    cdef real_t lr = <real_t>c.lr, l2 = <real_t>c.l2, clip = <real_t>c.clip_scale
    cdef real_t beta1 = <real_t>c.beta1, beta2 = <real_t>c.beta2, eps = <real_t>c.eps
    cdef real_t one_minus_beta1 = <real_t>(1.0 - c.beta1)  # in double: no float32 bias
    cdef real_t one_minus_beta2 = <real_t>(1.0 - c.beta2)
    cdef real_t pre_decay = <real_t>c.pre_decay, post_decay = <real_t>c.post_decay
    cdef real_t la_alpha = <real_t>c.la_alpha, avg_rate = <real_t>(1.0 - c.avg_keep)
    cdef real_t g_eff, m_new, v_new, w_new
    cdef Py_ssize_t i
    for i in range(n):
        g_eff = (g[i] + l2 * w[i]) * clip
        m_new = beta1 * m[i] + one_minus_beta1 * g_eff
        v_new = beta2 * v[i] + one_minus_beta2 * g_eff * g_eff
        w_new = w[i] - pre_decay * w[i]
        if rect_flag is On:
            w_new = w_new - lr * (m_new / (root(v_new) + eps))
        else:
            w_new = w_new - lr * m_new
        w_new = w_new - post_decay * w_new
        m[i] = m_new
        v[i] = v_new
        g[i] = 0
        w[i] = finish(w_new, i, avg, slow, la_alpha, avg_rate, has_avg, has_sync)


cdef void sgd_loop(real_t* w, real_t* g, real_t* avg, real_t* slow,
                   Py_ssize_t n, const Coefs* c) noexcept nogil:
    cdef On on = On(0)
    cdef Off off = Off(0)
    if avg == NULL:
        if slow == NULL:
            sgd_pass(w, g, avg, slow, n, c, off, off)
        else:
            sgd_pass(w, g, avg, slow, n, c, off, on)
    elif slow == NULL:
        sgd_pass(w, g, avg, slow, n, c, on, off)
    else:
        sgd_pass(w, g, avg, slow, n, c, on, on)


cdef void adam_dispatch(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                        real_t* slow, Py_ssize_t n, const Coefs* c,
                        rect_flag rectified) noexcept nogil:
    cdef On on = On(0)
    cdef Off off = Off(0)
    if avg == NULL:
        if slow == NULL:
            adam_pass(w, g, m, v, avg, slow, n, c, off, off, rectified)
        else:
            adam_pass(w, g, m, v, avg, slow, n, c, off, on, rectified)
    elif slow == NULL:
        adam_pass(w, g, m, v, avg, slow, n, c, on, off, rectified)
    else:
        adam_pass(w, g, m, v, avg, slow, n, c, on, on, rectified)


cdef void adam_loop(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                    real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil:
    adam_dispatch(w, g, m, v, avg, slow, n, c, On(0))  # pre_decay is 0 for Adam


cdef void radam_loop(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                     real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil:
    if c.rectified:
        adam_dispatch(w, g, m, v, avg, slow, n, c, On(0))
    else:
        adam_dispatch(w, g, m, v, avg, slow, n, c, Off(0))


cdef inline double lane_tree(double* lanes) noexcept nogil:
    """Fold NORM_LANES partial sums pairwise: lanes[j] += lanes[j + half], half = 16..1.

    A warp's __shfl_down_sync tree on the GPU adds in exactly this order.
    """
    cdef int half = NORM_LANES // 2, j
    while half > 0:
        for j in range(half):
            lanes[j] = lanes[j] + lanes[j + half]
        half //= 2
    return lanes[0]


cdef double chunk_sum_squares(const real_t* g, const real_t* w, real_t l2,
                              Py_ssize_t n) noexcept nogil:
    """One chunk (n <= NORM_CHUNK) of the clip norm: lane j sums the squares of elements
    j, j + 32, j + 64, ... in double, then lane_tree. Each term is formed in real_t."""
    cdef double lanes[NORM_LANES]
    cdef double x
    cdef Py_ssize_t i, j, full = n - n % NORM_LANES
    for j in range(NORM_LANES):
        lanes[j] = 0.0
    for i in range(full // NORM_LANES):
        for j in range(NORM_LANES):
            x = <double>(g[i * NORM_LANES + j] + l2 * w[i * NORM_LANES + j])
            lanes[j] += x * x
    for j in range(n - full):
        x = <double>(g[full + j] + l2 * w[full + j])
        lanes[j] += x * x
    return lane_tree(lanes)


cdef double sum_squares(const real_t* g, const real_t* w, double l2,
                        Py_ssize_t n) noexcept nogil:
    """sum((g + l2*w)**2) in the fixed order of docs/numerics.md ("The clip norm"):
    chunks of NORM_CHUNK elements, each summed by chunk_sum_squares; the chunk sums are
    combined by the same lane rule (chunk c goes to lane c % 32), then lane_tree."""
    cdef double lanes[NORM_LANES]
    cdef Py_ssize_t c, start, n_chunks = (n + NORM_CHUNK - 1) // NORM_CHUNK
    for c in range(NORM_LANES):
        lanes[c] = 0.0
    for c in range(n_chunks):
        start = c * NORM_CHUNK
        lanes[c % NORM_LANES] += chunk_sum_squares(g + start, w + start, <real_t>l2,
                                                   min(<Py_ssize_t>NORM_CHUNK, n - start))
    return lane_tree(lanes)


cdef void run_update(Kind kind, real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                     real_t* slow, Py_ssize_t n, Coefs* c, double grad_clip) noexcept nogil:
    """Clip factor (if clipping), then the fused loop of `kind`."""
    if grad_clip > 0.0:
        c.clip_scale = clip_factor(sum_squares(g, w, c.l2, n), grad_clip)
    if kind == KIND_SGD:
        sgd_loop(w, g, avg, slow, n, c)
    elif kind == KIND_ADAM:
        adam_loop(w, g, m, v, avg, slow, n, c)
    else:
        radam_loop(w, g, m, v, avg, slow, n, c)


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
                   double lr_scale) except -1:
    """Validate one update's arguments and fill `task`; touches no array memory."""
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
    task.c = make_coefs(h, t, lr_scale)
    return 0


cdef void run_task(Task* task, Kind kind, double grad_clip) noexcept nogil:
    if task.dtype == cnp.NPY_FLOAT32:
        run_update(kind, <float*>task.w, <float*>task.g, <float*>task.m, <float*>task.v,
                   <float*>task.avg, <float*>task.slow, task.n, &task.c, grad_clip)
    else:
        run_update(kind, <double*>task.w, <double*>task.g, <double*>task.m, <double*>task.v,
                   <double*>task.avg, <double*>task.slow, task.n, &task.c, grad_clip)


# ---------------------------------------------------------------- Python entry points

def step(Hyper hyper, object key, object weights, object gradient, object mom1,
         object mom2, object average, object slow, long t, double lr_scale=1.0) -> None:
    """Update `weights` in place and zero `gradient`: the t-th update of `key`.

    mom1/mom2 are required for Adam and RAdam (None for SGD); average is None when
    averages are off; slow (the lookahead weights) is read only on sync steps.
    """
    cdef Task task
    fill_task(&task, hyper, key, weights, gradient, mom1, mom2, average, slow, t, lr_scale)
    cdef Kind kind = hyper._kind()
    cdef double grad_clip = hyper.grad_clip
    if task.n >= GIL_FREE_SIZE:
        with nogil:
            run_task(&task, kind, grad_clip)
    else:
        run_task(&task, kind, grad_clip)


def step_many(Hyper hyper, list keys, list weights, list gradients, list mom1, list mom2,
              list averages, list slows, list counts, double lr_scale=1.0) -> None:
    """Update many tensors in one call: validates them all, then loops without the GIL.

    Each list holds one entry per key (None where a state array is absent); counts[i]
    is the update number t of keys[i]. Same results as calling `step` in order.
    """
    cdef Py_ssize_t i, n = len(keys)
    for name, seq in (("weights", weights), ("gradients", gradients), ("mom1", mom1),
                      ("mom2", mom2), ("averages", averages), ("slows", slows),
                      ("counts", counts)):
        if len(seq) != n:
            raise ValueError(f"step_many: {len(seq)} {name} for {n} keys")
    cdef Pool mem = Pool()
    cdef Task* tasks = <Task*>mem.alloc(max(n, 1), sizeof(Task))
    for i in range(n):
        fill_task(&tasks[i], hyper, keys[i], weights[i], gradients[i], mom1[i], mom2[i],
                  averages[i], slows[i], counts[i], lr_scale)
    cdef Kind kind = hyper._kind()
    cdef double grad_clip = hyper.grad_clip
    with nogil:
        for i in range(n):
            run_task(&tasks[i], kind, grad_clip)


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
