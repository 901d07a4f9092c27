# The C-level interface between optim/_kernels.pyx (validation, dispatch, threads) and
# the hot loops of optim/_loops.pxi, which setup.py compiles once per SIMD level
# (optim/_loops_baseline.pyx, _loops_avx2.pyx, _loops_avx512.pyx). Each level's module
# exports one `Loops` table in a PyCapsule named OPTIM_LOOPS_CAPSULE; _kernels picks one
# at import. Every loop makes ONE pass over memory: it reads and writes each array once.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    #define OPTIM_LOOPS_CAPSULE "optim.cpu._loops.Loops"
    """
    const char* OPTIM_LOOPS_CAPSULE

ctypedef fused real_t:
    float
    double

cdef enum Kind:
    KIND_SGD = 0
    KIND_ADAM = 1
    KIND_RADAM = 2

# The clip norm's fixed summation order (docs/numerics.md), shared with the GPU kernels.
cdef enum:
    NORM_CHUNK = 4096  # elements per chunk
    NORM_LANES = 32    # partial sums per chunk (a GPU warp's lanes)

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

# One level's loops. update_*: the fused pass of `kind` over n elements (avg and slow
# may be NULL: averages off, no lookahead sync). chunk_sum_squares_*: one chunk (n <=
# NORM_CHUNK) of the clip norm, terms g + l2*w, or g alone (w not read) when w is NULL.
# all_finite_*: whether every such term of n elements is finite (the non-finite check
# without clipping: one read, in the arrays' own width).
# roofline_*: optim.bench._roofline's memory-traffic loops.
cdef struct Loops:
    const char* isa
    void (*update_f32)(Kind kind, float* w, float* g, float* m, float* v, float* avg,
                       float* slow, Py_ssize_t n, const Coefs* c) noexcept nogil
    void (*update_f64)(Kind kind, double* w, double* g, double* m, double* v, double* avg,
                       double* slow, Py_ssize_t n, const Coefs* c) noexcept nogil
    double (*chunk_sum_squares_f32)(const float* g, const float* w, float l2,
                                    Py_ssize_t n) noexcept nogil
    double (*chunk_sum_squares_f64)(const double* g, const double* w, double l2,
                                    Py_ssize_t n) noexcept nogil
    bint (*all_finite_f32)(const float* g, const float* w, float l2,
                           Py_ssize_t n) noexcept nogil
    bint (*all_finite_f64)(const double* g, const double* w, double l2,
                           Py_ssize_t n) noexcept nogil
    int (*roofline_rw_f32)(void** arrays, int k, Py_ssize_t n) noexcept nogil
    int (*roofline_rw_f64)(void** arrays, int k, Py_ssize_t n) noexcept nogil
    uint64_t (*roofline_read_u32)(const uint32_t* a, Py_ssize_t n) noexcept nogil
    uint64_t (*roofline_read_u64)(const uint64_t* a, Py_ssize_t n) noexcept nogil

cdef enum:
    # A threaded pass cuts its tensor into pieces of whole norm chunks, each at least
    # PIECE_MIN elements (below that, handing work to another thread costs more than it
    # saves; measured in docs/cpu.md), up to PIECES_PER_THREAD per thread so that the
    # threads that run take over the share of one the OS has not scheduled yet.
    PIECE_MIN = 1 << 15
    PIECES_PER_THREAD = 4
    MAX_THREADS = 256
    MAX_PIECES = PIECES_PER_THREAD * MAX_THREADS


# The clip norm's term: g + l2*w with coupled L2, g alone when l2 == 0, a loop that never
# reads the weights;
# shared by the loops and optim._kernels' confirmation scan (Thinc adds L2 * weights to the gradient only when L2 is coupled and
# not 0; docs/numerics.md).
cdef struct Coupled:
    char unused

cdef struct GradientOnly:
    char unused

ctypedef fused norm_term:
    Coupled
    GradientOnly


cdef inline real_t term(const real_t* g, const real_t* w, real_t l2, Py_ssize_t i,
                        norm_term kind) noexcept nogil:
    """Element i's clip norm term, in real_t."""
    if norm_term is Coupled:
        return g[i] + l2 * w[i]
    else:
        return g[i]


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


cdef inline Py_ssize_t pieces_for(Py_ssize_t n, int n_threads) noexcept nogil:
    """How many pieces a pass over n elements is cut into on up to n_threads threads
    (1: the calling thread does it all)."""
    cdef Py_ssize_t most = n // PIECE_MIN
    if n_threads <= 1 or most <= 1:
        return 1
    return min(most, <Py_ssize_t>PIECES_PER_THREAD * n_threads)


cdef inline Py_ssize_t piece_start(Py_ssize_t n, Py_ssize_t n_pieces, Py_ssize_t i) noexcept nogil:
    """Start of piece i of n elements cut into n_pieces pieces of whole norm chunks
    (piece n_pieces starts at n)."""
    cdef Py_ssize_t n_chunks = (n + NORM_CHUNK - 1) // NORM_CHUNK
    return min(n, (n_chunks * i // n_pieces) * <Py_ssize_t>NORM_CHUNK)


cdef inline Py_ssize_t deal(const Py_ssize_t* sizes, Py_ssize_t count, int n_threads,
                            Py_ssize_t* first) noexcept nogil:
    """Cut the tensors too small to split (pieces_for(size) == 1) into contiguous groups
    of about equal total size, as many as pieces_for gives their total. Group b is
    tensors first[b] .. first[b + 1] - 1, large ones skipped; `first` has room for
    MAX_PIECES + 1. Returns the number of groups."""
    cdef Py_ssize_t i, small = 0, seen = 0, b = 1, n_groups
    for i in range(count):
        if pieces_for(sizes[i], n_threads) == 1:
            small += sizes[i]
    n_groups = pieces_for(small, n_threads)
    first[0] = 0
    for i in range(count):
        if pieces_for(sizes[i], n_threads) == 1:
            while b < n_groups and seen >= small * b // n_groups:
                first[b] = i
                b += 1
            seen += sizes[i]
    while b <= n_groups:
        first[b] = count
        b += 1
    return n_groups

