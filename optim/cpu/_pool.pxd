# optim/_pool.h: run fn(arg, i) for every piece i on up to n_threads threads.
cdef extern from "_pool.h" nogil:
    ctypedef void (*optim_piece_fn)(void* arg, Py_ssize_t piece) noexcept nogil
    void optim_parallel(optim_piece_fn fn, void* arg, Py_ssize_t n_pieces, int n_threads)
    const int OPTIM_POOL  # 1: a thread pool; 0: this build runs everything inline
