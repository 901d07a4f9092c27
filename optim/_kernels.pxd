# The C-level interface of optim's CPU kernels. The .pyx implements it.
# Every loop makes ONE pass over memory: it reads and writes each array once.

ctypedef fused real_t:
    float
    double

# Per-call scalars: computed once per (key, update) by make_coefs, read by every loop.
cdef struct Coefs:
    double lr          # step on the update direction, lr_scale and bias correction included
    double beta1
    double beta2
    double eps
    double l2          # coupled L2: gradient += l2 * weights (0 = off)
    double clip_scale  # gradient *= clip_scale (1 = no clipping this call)
    double pre_decay   # RAdam weight_decay: weights -= pre_decay * weights, before the step
    double post_decay  # decoupled L2: weights -= post_decay * weights, after the step
    bint rectified     # RAdam: adaptive step (True) or momentum-only step (False)
    double avg_keep    # averages: avg -= (1 - avg_keep) * (avg - weights)
    double la_alpha    # lookahead: slow += la_alpha * (weights - slow); weights = slow

cdef void sgd_loop(real_t* w, real_t* g, real_t* avg, real_t* slow,
                   Py_ssize_t n, const Coefs* c) noexcept nogil
cdef void adam_loop(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                    real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil
cdef void radam_loop(real_t* w, real_t* g, real_t* m, real_t* v, real_t* avg,
                     real_t* slow, Py_ssize_t n, const Coefs* c) noexcept nogil
cdef double sum_squares(const real_t* g, const real_t* w, double l2,
                        Py_ssize_t n) noexcept nogil
