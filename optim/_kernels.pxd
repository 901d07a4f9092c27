# The C-level interface of optim._kernels: the hyperparameters the loops read, one
# update's task, and the functions that validate and run tasks. optim.cpu._batch
# (step_many's kept batch) is built on it.
from optim.cpu._loops cimport Coefs, Kind


# What an update does with a gradient holding a NaN or an inf (Hyper.nonfinite), and
# what became of a task (Task.outcome). The one definition: `cpdef` makes each name a
# plain int of the Python module optim._kernels too, which the Python code (per_tensor,
# the device backends) and the CUDA source generator (optim/_kernels_cuda.py) import.
cpdef enum:
    NONFINITE_APPLY = 0  # Thinc's numbers: the update runs whatever the gradient holds
    NONFINITE_SKIP = 1   # nothing changes but the gradient, which is zeroed
    NONFINITE_RAISE = 2  # nothing changes; the caller raises FloatingPointError
    OUTCOME_UPDATED = 0
    OUTCOME_NAN = 1      # skipped or refused: the gradient holds a NaN
    OUTCOME_INF = 2      # skipped or refused: an inf (and no NaN)
    OUTCOME_FROZEN = 3   # frozen weights: the gradient was zeroed, nothing else


cdef class Hyper:
    cdef public double learn_rate, beta1, beta2, eps, L2, grad_clip, weight_decay
    cdef public double lookahead_alpha
    cdef public long lookahead_k
    cdef public bint L2_is_weight_decay, use_radam, frozen
    cdef public int nonfinite
    # beta1**t and beta2**t of the last make_coefs (keys of one step share t)
    cdef long powers_t
    cdef double powers_beta1, powers_beta2, beta1_t, beta2_t

    cdef Kind _kind(self) noexcept


cdef class StateDicts:  # per-key state, read by the hot paths (optim.state.KeyStates)
    cdef public dict mom1, mom2, lookahead, shapes
    cdef public object averages   # a dict, or None without averages
    cdef public object nr_update  # a dict (Thinc's defaultdict(int)): key -> updates


cdef struct Task:  # one update: its arrays (data pointers), size, dtype, count, settings
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
    Kind kind         # from the key's Hyper (a group may be SGD in an Adam optimizer)
    double grad_clip  # 0: no clipping
    int nonfinite     # NONFINITE_APPLY / _SKIP / _RAISE
    int outcome       # set by run_tasks: OUTCOME_UPDATED / _NAN / _INF


cdef int n_threads() noexcept
cdef double power_of(double x, long n) noexcept nogil
cdef Coefs make_coefs(Hyper h, long t, double lr_scale) noexcept
cdef bint syncs(Hyper h, long t) noexcept
cdef int check_call(object key, long t, double lr_scale) except -1
cdef int fill_task(Task* task, Hyper h, object key, object weights, object gradient,
                   object mom1, object mom2, object average, object slow, long t,
                   double lr_scale, const Task* previous=*) except -1
cdef bint run_tasks(Task* tasks, const Py_ssize_t* sizes, Py_ssize_t n_tasks,
                    int n_threads, bint raising) noexcept nogil
