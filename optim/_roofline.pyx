# cython: language_level=3
"""The speed of light for an optimizer update: ``python -m optim bench``'s roofline.

An update of n parameters has to read and write a fixed set of arrays once (weights,
gradient, moments, averages ...), plus, with gradient clipping, read the gradient once
more for its norm. Whatever the arithmetic, it cannot be faster than moving those bytes.
A :class:`Plan` holds pointers to arrays of the same sizes and dtype as the update's and
``Plan.run()`` moves exactly those bytes with no arithmetic worth the name:

* the read/write pass *rotates* the k arrays of each tensor element by element
  (``a0[i], a1[i], ..., a(k-1)[i] = a1[i], ..., a(k-1)[i], a0[i]``; ``a0[i] = -a0[i]`` when
  k == 1), so every array is loaded and stored once per element, the values stay the ones
  the caller put there (no overflow, no denormals) and the compiler cannot drop a load or a
  store;
* the optional read-only pass (clipping's norm) OR-reduces the array's bits as unsigned
  integers: integer OR is associative, so the compiler vectorises it, while a strict-IEEE
  float sum would be latency-bound and slower than memory.

Both loops are plain C with ``restrict``-qualified parameters (so they vectorise without
alias checks), written in the extern block below and compiled with the same flags as the
optimizer kernels. ``Plan.run()`` releases the GIL and walks its pointer table, so the
many-small-tensors layout pays no Python cost per tensor either: the roofline is a limit
on memory traffic, not on call overhead.
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #if defined(_MSC_VER)
    #  define OPTIM_RL_R __restrict
    #else
    #  define OPTIM_RL_R __restrict__
    #endif

    #define OPTIM_RL_LOOP(body) \\
        for (ptrdiff_t i = 0; i < n; i++) { body }

    #define OPTIM_RL_DEFINE(T, S) \\
    static void optim_rl_rw1_##S(T* OPTIM_RL_R a, ptrdiff_t n) { \\
        OPTIM_RL_LOOP(a[i] = -a[i];) } \\
    static void optim_rl_rw2_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, ptrdiff_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = t;) } \\
    static void optim_rl_rw3_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 ptrdiff_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = t;) } \\
    static void optim_rl_rw4_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 T* OPTIM_RL_R d, ptrdiff_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = d[i]; d[i] = t;) } \\
    static void optim_rl_rw5_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 T* OPTIM_RL_R d, T* OPTIM_RL_R e, ptrdiff_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = d[i]; d[i] = e[i]; \\
                      e[i] = t;) } \\
    static void optim_rl_rw6_##S(T* OPTIM_RL_R a, T* OPTIM_RL_R b, T* OPTIM_RL_R c, \\
                                 T* OPTIM_RL_R d, T* OPTIM_RL_R e, T* OPTIM_RL_R f, \\
                                 ptrdiff_t n) { \\
        OPTIM_RL_LOOP(T t = a[i]; a[i] = b[i]; b[i] = c[i]; c[i] = d[i]; d[i] = e[i]; \\
                      e[i] = f[i]; f[i] = t;) } \\
    static int optim_rl_rw_##S(void** p, int k, ptrdiff_t n) { \\
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

    static uint64_t optim_rl_read_u32(const uint32_t* OPTIM_RL_R a, ptrdiff_t n) {
        uint32_t acc = 0;
        for (ptrdiff_t i = 0; i < n; i++) acc |= a[i];
        return acc;
    }

    static uint64_t optim_rl_read_u64(const uint64_t* OPTIM_RL_R a, ptrdiff_t n) {
        uint64_t acc = 0;
        for (ptrdiff_t i = 0; i < n; i++) acc |= a[i];
        return acc;
    }
    """
    int optim_rl_rw_f32(void** p, int k, Py_ssize_t n) nogil
    int optim_rl_rw_f64(void** p, int k, Py_ssize_t n) nogil
    uint64_t optim_rl_read_u32(const uint32_t* a, Py_ssize_t n) nogil
    uint64_t optim_rl_read_u64(const uint64_t* a, Py_ssize_t n) nogil


MAX_ARRAYS = 6


cdef class Plan:
    """Move the bytes of one update, on arrays the caller allocated.

    tensors: a sequence of tensors, each a sequence of 1 to 6 NumPy arrays that the update
        reads and writes once (for example ``(w, g, m, v)`` for lean Adam). All arrays must
        be C-contiguous, writeable and of one dtype, float32 or float64; the arrays of one
        tensor must have the same size. The plan keeps references to them.
    read_index: index, within each tensor, of an array read once more *before* the
        read/write pass (clipping's gradient norm); ``None`` for no such pass.

    ``run(repeat)`` makes ``repeat`` passes over every tensor without the GIL. It changes
    the arrays' contents (rotates them), never their values' set.
    """
    cdef void** ptrs
    cdef Py_ssize_t* sizes
    cdef Py_ssize_t n_tensors
    cdef int k
    cdef int itemsize
    cdef int read_index
    cdef object _refs
    cdef readonly Py_ssize_t n_params
    cdef readonly Py_ssize_t bytes_per_pass
    cdef readonly unsigned long long sink

    def __cinit__(self, tensors, read_index=None):
        self.ptrs = NULL
        self.sizes = NULL
        tensors = [tuple(arrays) for arrays in tensors]
        if not tensors:
            raise ValueError("Plan needs at least one tensor")
        k = len(tensors[0])
        if not 1 <= k <= MAX_ARRAYS:
            raise ValueError(f"each tensor needs 1 to {MAX_ARRAYS} arrays, got {k}")
        if read_index is not None and not 0 <= read_index < k:
            raise ValueError(f"read_index {read_index} is not an index into {k} arrays")
        dtype = tensors[0][0].dtype
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise TypeError(f"arrays must be float32 or float64, got {dtype}")
        self.k = k
        self.itemsize = dtype.itemsize
        self.read_index = -1 if read_index is None else read_index
        self.n_tensors = len(tensors)
        self.ptrs = <void**>calloc(self.n_tensors * k, sizeof(void*))
        self.sizes = <Py_ssize_t*>calloc(self.n_tensors, sizeof(Py_ssize_t))
        if self.ptrs == NULL or self.sizes == NULL:
            raise MemoryError()
        refs = []
        cdef Py_ssize_t t, j, n_params = 0
        for t, arrays in enumerate(tensors):
            if len(arrays) != k:
                raise ValueError(f"tensor {t} has {len(arrays)} arrays, tensor 0 has {k}")
            size = arrays[0].size
            for j, arr in enumerate(arrays):
                if arr.dtype != dtype:
                    raise TypeError(f"tensor {t} array {j}: dtype {arr.dtype}, not {dtype}")
                if arr.size != size:
                    raise ValueError(f"tensor {t} array {j}: size {arr.size}, not {size}")
                if not (arr.flags.c_contiguous and arr.flags.writeable):
                    raise ValueError(f"tensor {t} array {j} is not C-contiguous and writeable")
                self.ptrs[t * k + j] = <void*><size_t>arr.__array_interface__["data"][0]
                refs.append(arr)
            self.sizes[t] = size
            n_params += size
        self._refs = refs
        self.n_params = n_params
        self.bytes_per_pass = n_params * self.itemsize * (
            2 * k + (1 if read_index is not None else 0))
        self.sink = 0

    def __dealloc__(self):
        free(self.ptrs)
        free(self.sizes)

    def run(self, Py_ssize_t repeat=1):
        """Make ``repeat`` passes over all tensors; returns None."""
        cdef Py_ssize_t r, t
        cdef uint64_t acc = 0
        cdef void** p
        cdef int k = self.k, ri = self.read_index, f32 = self.itemsize == 4
        cdef Py_ssize_t n_tensors = self.n_tensors
        with nogil:
            for r in range(repeat):
                for t in range(n_tensors):
                    p = self.ptrs + t * k
                    if ri >= 0:
                        if f32:
                            acc |= optim_rl_read_u32(<const uint32_t*>p[ri], self.sizes[t])
                        else:
                            acc |= optim_rl_read_u64(<const uint64_t*>p[ri], self.sizes[t])
                    if f32:
                        optim_rl_rw_f32(p, k, self.sizes[t])
                    else:
                        optim_rl_rw_f64(p, k, self.sizes[t])
        self.sink |= acc
