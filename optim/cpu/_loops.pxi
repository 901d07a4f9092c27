# The hot loops: included by optim/_loops_baseline.pyx, _loops_avx2.pyx and
# _loops_avx512.pyx, which setup.py compiles with that level's flags (never FMA
# contraction, never fast-math), so each module holds the same loops built for one SIMD
# level. Every level gives the same bits: IEEE +, -, *, / and sqrt are correctly rounded
# at any vector width, and no loop reassociates (the clip norm's lanes are independent
# sums; docs/numerics.md). The includer defines ISA (a C string: its level's name) first.
from cpython.pycapsule cimport PyCapsule_New
from libc.math cimport sqrt, sqrtf
from libc.stdint cimport uint32_t, uint64_t

from optim.cpu._loops cimport (
    KIND_ADAM, KIND_SGD, NORM_LANES, OPTIM_LOOPS_CAPSULE, Coefs, Coupled, GradientOnly, Kind,
    Loops, lane_tree, norm_term, real_t, term,
)


cdef inline real_t root(real_t x) noexcept nogil:
    """Square root in the array's own precision (sqrtf keeps float32 loops vectorised)."""
    if real_t is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# Optional parts of a pass (averages, lookahead sync, which Adam/RAdam step) are
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

# Which step adam_pass takes: Adam's; RAdam's rectified one (Adam's after pre_decay);
# RAdam's un-rectified, momentum-only one (after pre_decay).
cdef struct AdamStep:
    char unused

cdef struct RectifiedStep:
    char unused

cdef struct MomentumStep:
    char unused

ctypedef fused step_kind:
    AdamStep
    RectifiedStep
    MomentumStep


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
                    step_kind step) noexcept nogil:
    """Adam, and RAdam (pre_decay, then the rectified or the momentum-only step)."""
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
        if step_kind is AdamStep:
            w_new = w[i]
        else:
            w_new = w[i] - pre_decay * w[i]
        if step_kind is MomentumStep:
            w_new = w_new - lr * m_new
        else:
            w_new = w_new - lr * (m_new / (root(v_new) + eps))
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
                        step_kind step) noexcept nogil:
    cdef On on = On(0)
    cdef Off off = Off(0)
    if avg == NULL:
        if slow == NULL:
            adam_pass(w, g, m, v, avg, slow, n, c, off, off, step)
        else:
            adam_pass(w, g, m, v, avg, slow, n, c, off, on, step)
    elif slow == NULL:
        adam_pass(w, g, m, v, avg, slow, n, c, on, off, step)
    else:
        adam_pass(w, g, m, v, avg, slow, n, c, on, on, step)


cdef void adam_loop(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                    real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil:
    adam_dispatch(w, g, m, v, avg, slow, n, c, AdamStep(0))


cdef void radam_loop(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                     real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil:
    if c.rectified:
        adam_dispatch(w, g, m, v, avg, slow, n, c, RectifiedStep(0))
    else:
        adam_dispatch(w, g, m, v, avg, slow, n, c, MomentumStep(0))


cdef inline void add_squares(double* lanes, const real_t* g, const real_t* w, real_t l2,
                             Py_ssize_t n, norm_term kind) noexcept nogil:
    """Lane j += the squares of the terms of elements j, j + 32, j + 64, ... (in double)."""
    cdef double x
    cdef Py_ssize_t i, j, full = n - n % NORM_LANES
    for i in range(full // NORM_LANES):
        for j in range(NORM_LANES):
            x = <double>term(g, w, l2, i * NORM_LANES + j, kind)
            lanes[j] += x * x
    for j in range(n - full):
        x = <double>term(g, w, l2, full + j, kind)
        lanes[j] += x * x


cdef double chunk_sum_squares(const real_t* g, const real_t* w, real_t l2,
                              Py_ssize_t n) noexcept nogil:
    """One chunk (n <= NORM_CHUNK) of the clip norm: NORM_LANES sums of squares (lane j:
    elements j, j + 32, ...), then lane_tree; terms g + l2*w, or g alone when w is NULL.
    Both kinds of term fill one lanes array, folded once: with a lane_tree per kind,
    clang 14 kept the g-alone lanes in 2-wide registers spilled to the stack (1.3x)."""
    cdef double lanes[NORM_LANES]
    cdef int j
    for j in range(NORM_LANES):
        lanes[j] = 0.0
    if w == NULL:
        add_squares(lanes, g, w, l2, n, GradientOnly(0))
    else:
        add_squares(lanes, g, w, l2, n, Coupled(0))
    return lane_tree(lanes)


cdef bint finite_terms(const real_t* g, const real_t* w, real_t l2, Py_ssize_t n,
                       norm_term kind) noexcept nogil:
    """x - x is 0 for a finite x and NaN for an inf or a NaN: the sum of them is 0 exactly
    when every term is finite (NORM_LANES independent sums, so it vectorises)."""
    cdef real_t lanes[NORM_LANES]
    cdef real_t x
    cdef Py_ssize_t i, j, full = n - n % NORM_LANES
    for j in range(NORM_LANES):
        lanes[j] = 0
    for i in range(full // NORM_LANES):
        for j in range(NORM_LANES):
            x = term(g, w, l2, i * NORM_LANES + j, kind)
            lanes[j] += x - x
    for j in range(n - full):
        x = term(g, w, l2, full + j, kind)
        lanes[j] += x - x
    for j in range(1, NORM_LANES):
        lanes[0] += lanes[j]
    return lanes[0] == 0


cdef bint all_finite(const real_t* g, const real_t* w, real_t l2, Py_ssize_t n) noexcept nogil:
    """Whether every clip norm term (g + l2*w, or g when w is NULL) is finite."""
    if w == NULL:
        return finite_terms(g, w, l2, n, GradientOnly(0))
    return finite_terms(g, w, l2, n, Coupled(0))


cdef void update(Kind kind, real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                 real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil:
    """The fused loop of `kind` over n elements (clip_scale already in `c`)."""
    if kind == KIND_SGD:
        sgd_loop(w, g, avg, slow, n, c)
    elif kind == KIND_ADAM:
        adam_loop(w, g, m, v, avg, slow, n, c)
    else:
        radam_loop(w, g, m, v, avg, slow, n, c)


# The roofline's loops (optim/_roofline.pyx explains them): plain C with restrict-
# qualified parameters so they vectorise without alias checks, built at the same level
# as the optimizer loops they are compared with.
cdef extern from *:
    """
    #if defined(_MSC_VER)
    #  define OPTIM_RL_R __restrict
    #else
    #  define OPTIM_RL_R __restrict__
    #endif

    #define OPTIM_RL_LOOP(body) \\
        for (Py_ssize_t i = 0; i < n; i++) { body }

    #define OPTIM_RL_DEFINE(T, S) \\
    static void optim_rl_rw1_##S(T* OPTIM_RL_R a, Py_ssize_t n) { \\
        OPTIM_RL_LOOP(a[i] = -a[i];) } \\
    static void optim_rl_rw2_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, Py_ssize_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = t;) } \\
    static void optim_rl_rw3_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 Py_ssize_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = t;) } \\
    static void optim_rl_rw4_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 T* OPTIM_RL_R d, Py_ssize_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = d[i]; d[i] = t;) } \\
    static void optim_rl_rw5_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 T* OPTIM_RL_R d, T* OPTIM_RL_R e, Py_ssize_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = d[i]; d[i] = e[i]; \\
                      e[i] = t;) } \\
    static void optim_rl_rw6_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 T* OPTIM_RL_R d, T* OPTIM_RL_R e, T* OPTIM_RL_R f, \\
                                 Py_ssize_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = d[i]; d[i] = e[i]; \\
                      e[i] = f[i]; f[i] = t;) } \\
    static int optim_rl_rw_##S(void** p, int k, Py_ssize_t n) { \\
        switch (k) { \\
        case 1: optim_rl_rw1_##S((T*)p[0], n); return 0; \\
        case 2: optim_rl_rw2_##S((T*)p[0], (T*)p[1], n); return 0; \\
        case 3: optim_rl_rw3_##S((T*)p[0], (T*)p[1], (T*)p[2], n); return 0; \\
        case 4: optim_rl_rw4_##S((T*)p[0], (T*)p[1], (T*)p[2], (T*)p[3], n); return 0; \\
        case 5: optim_rl_rw5_##S((T*)p[0], (T*)p[1], (T*)p[2], (T*)p[3], (T*)p[4], n); \\
                return 0; \\
        case 6: optim_rl_rw6_##S((T*)p[0], (T*)p[1], (T*)p[2], (T*)p[3], (T*)p[4], \\
                                 (T*)p[5], n); return 0; \\
        default: return -1; \\
        } \\
    }

    OPTIM_RL_DEFINE(float, f32)
    OPTIM_RL_DEFINE(double, f64)

    static uint64_t optim_rl_read_u32(const uint32_t* OPTIM_RL_R a, Py_ssize_t n) {
        uint32_t acc = 0;
        for (Py_ssize_t i = 0; i < n; i++) acc |= a[i];
        return acc;
    }

    static uint64_t optim_rl_read_u64(const uint64_t* OPTIM_RL_R a, Py_ssize_t n) {
        uint64_t acc = 0;
        for (Py_ssize_t i = 0; i < n; i++) acc |= a[i];
        return acc;
    }
    """
    int optim_rl_rw_f32(void** p, int k, Py_ssize_t n) noexcept nogil
    int optim_rl_rw_f64(void** p, int k, Py_ssize_t n) noexcept nogil
    uint64_t optim_rl_read_u32(const uint32_t* a, Py_ssize_t n) noexcept nogil
    uint64_t optim_rl_read_u64(const uint64_t* a, Py_ssize_t n) noexcept nogil


cdef Loops TABLE
TABLE.isa = ISA
TABLE.update_f32 = update[float]
TABLE.update_f64 = update[double]
TABLE.chunk_sum_squares_f32 = chunk_sum_squares[float]
TABLE.chunk_sum_squares_f64 = chunk_sum_squares[double]
TABLE.all_finite_f32 = all_finite[float]
TABLE.all_finite_f64 = all_finite[double]
TABLE.roofline_rw_f32 = optim_rl_rw_f32
TABLE.roofline_rw_f64 = optim_rl_rw_f64
TABLE.roofline_read_u32 = optim_rl_read_u32
TABLE.roofline_read_u64 = optim_rl_read_u64

LOOPS = PyCapsule_New(&TABLE, OPTIM_LOOPS_CAPSULE, NULL)
"""This level's `Loops` table (optim/_loops.pxd), for optim._kernels."""
