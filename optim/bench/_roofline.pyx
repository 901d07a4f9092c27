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
alias checks), in optim/_loops.pxi: they are built at every SIMD level with the optimizer
loops, and a run uses the level optim runs now (a fair limit). ``Plan.run()`` releases the
GIL and walks its pointer table, so the many-small-tensors layout pays no Python cost per
tensor either: the roofline is a limit on memory traffic, not on call overhead. With
``threads > 1`` it splits the work as optim's updates do: a large tensor into blocks of
whole norm chunks, small tensors dealt to threads in groups of about equal size.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free

from optim.cpu._loops cimport (
    MAX_PIECES, MAX_THREADS, OPTIM_LOOPS_CAPSULE, Loops, deal, piece_start, pieces_for,
)
from optim.cpu._pool cimport optim_parallel

from optim import _kernels

cdef enum:
    MAX_ARRAYS_C = 6


MAX_ARRAYS = MAX_ARRAYS_C


cdef class Plan:
    """Move the bytes of one update, on arrays the caller allocated.

    tensors: a sequence of tensors, each a sequence of 1 to 6 NumPy arrays that the update
        reads and writes once (for example ``(w, g, m, v)`` for lean Adam). All arrays must
        be C-contiguous, writeable and of one dtype, float32 or float64; the arrays of one
        tensor must have the same size. The plan keeps references to them.
    read_index: index, within each tensor, of an array read once more *before* the
        read/write pass (clipping's gradient norm); ``None`` for no such pass.

    ``run(repeat, threads)`` makes ``repeat`` passes over every tensor without the GIL.
    It changes the arrays' contents (rotates them), never their values' set.
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

    def run(self, Py_ssize_t repeat=1, int threads=1):
        """Make ``repeat`` passes over all tensors on up to ``threads`` threads."""
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be in 1..{MAX_THREADS}, got {threads}")
        cdef Job job
        job.loops = <const Loops*>PyCapsule_GetPointer(_kernels.ACTIVE_LOOPS,
                                                       OPTIM_LOOPS_CAPSULE)
        job.ptrs = self.ptrs
        job.sizes = self.sizes
        job.k = self.k
        job.itemsize = self.itemsize
        job.read_index = self.read_index
        job.threads = threads
        job.acc = 0
        cdef Py_ssize_t r
        with nogil:
            for r in range(repeat):
                run_pass(&job, self.n_tensors)
        self.sink |= job.acc


cdef struct Job:
    const Loops* loops
    void** ptrs
    const Py_ssize_t* sizes
    int k
    int itemsize
    int read_index
    int threads
    uint64_t acc  # the read passes' OR, written only by the calling thread
    Py_ssize_t tensor  # the tensor being split (Job.pieces pieces)
    Py_ssize_t pieces
    const Py_ssize_t* first  # the groups of small tensors
    uint64_t* piece_acc


cdef void run_pass(Job* job, Py_ssize_t n_tensors) noexcept nogil:
    """One pass over all tensors, split as optim splits an update (optim/_kernels.pyx
    run_tasks): large tensors cut into pieces, small ones dealt out in groups."""
    cdef Py_ssize_t t, i, n_groups
    cdef Py_ssize_t first[MAX_PIECES + 1]
    cdef uint64_t piece_acc[MAX_PIECES]
    job.first = &first[0]
    job.piece_acc = &piece_acc[0]
    for t in range(n_tensors):
        job.pieces = pieces_for(job.sizes[t], job.threads)
        if job.pieces > 1:
            job.tensor = t
            if job.read_index >= 0:
                optim_parallel(read_piece, job, job.pieces, job.threads)
                for i in range(job.pieces):
                    job.acc |= piece_acc[i]
            optim_parallel(rotate_piece, job, job.pieces, job.threads)
    n_groups = deal(job.sizes, n_tensors, job.threads, first)
    for i in range(n_groups):
        piece_acc[i] = 0
    optim_parallel(group_piece, job, n_groups, job.threads)
    for i in range(n_groups):
        job.acc |= piece_acc[i]


cdef void read_piece(void* arg, Py_ssize_t i) noexcept nogil:
    cdef Job* job = <Job*>arg
    cdef Py_ssize_t n = job.sizes[job.tensor]
    job.piece_acc[i] = move(job, job.tensor, piece_start(n, job.pieces, i),
                            piece_start(n, job.pieces, i + 1), True)


cdef void rotate_piece(void* arg, Py_ssize_t i) noexcept nogil:
    cdef Job* job = <Job*>arg
    cdef Py_ssize_t n = job.sizes[job.tensor]
    move(job, job.tensor, piece_start(n, job.pieces, i), piece_start(n, job.pieces, i + 1),
         False)


cdef void group_piece(void* arg, Py_ssize_t b) noexcept nogil:
    """The small tensors of group b, each read (if any) and rotated on this thread."""
    cdef Job* job = <Job*>arg
    cdef Py_ssize_t t
    cdef uint64_t acc = 0
    for t in range(job.first[b], job.first[b + 1]):
        if pieces_for(job.sizes[t], job.threads) == 1:
            if job.read_index >= 0:
                acc |= move(job, t, 0, job.sizes[t], True)
            move(job, t, 0, job.sizes[t], False)
    job.piece_acc[b] = acc


cdef uint64_t move(const Job* job, Py_ssize_t t, Py_ssize_t start, Py_ssize_t stop,
                   bint read) noexcept nogil:
    """Elements [start, stop) of tensor t: the read pass (read=True) or the rotation."""
    cdef void* p[MAX_ARRAYS_C]
    cdef int j
    for j in range(job.k):
        p[j] = <char*>job.ptrs[t * job.k + j] + start * job.itemsize
    if read:
        if job.itemsize == 4:
            return job.loops.roofline_read_u32(<const uint32_t*>p[job.read_index],
                                               stop - start)
        return job.loops.roofline_read_u64(<const uint64_t*>p[job.read_index], stop - start)
    if job.itemsize == 4:
        job.loops.roofline_rw_f32(p, job.k, stop - start)
    else:
        job.loops.roofline_rw_f64(p, job.k, stop - start)
    return 0
