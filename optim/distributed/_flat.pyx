"""Flat buckets for optim.distributed: many arrays <-> one contiguous buffer, in C.

A bucket is a range [lo, hi) of the virtual concatenation of a list of arrays, whose
boundaries are `starts` (prefix sums of their sizes). Each function validates every
array it touches (exact ndarray, C-contiguous, writeable where written, the buffer's
dtype, the planned size) before it copies anything.
"""
from libc.string cimport memcpy, memset
from libc.stdint cimport int64_t

cimport numpy as cnp

cnp.import_array()

ctypedef fused real:
    float
    double


cdef int check_array(object x, int typenum, Py_ssize_t size, bint write) except -1:
    if type(x) is not cnp.ndarray:
        raise TypeError(f"expected a numpy.ndarray, got {type(x).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>x
    if cnp.PyArray_TYPE(a) != typenum:
        raise TypeError(f"array has dtype {a.dtype}, the bucket holds "
                        f"{cnp.PyArray_DescrFromType(typenum)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError("array is not C-contiguous")
    if write and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError("array is read-only")
    if cnp.PyArray_SIZE(a) != size:
        raise ValueError(f"array has {cnp.PyArray_SIZE(a)} elements, the plan says {size}")
    return 0


cdef Py_ssize_t first_index(const int64_t[:] starts, Py_ssize_t lo) noexcept:
    """The array holding element lo: the last i with starts[i] <= lo (binary search)."""
    cdef Py_ssize_t a = 0, b = starts.shape[0] - 1, mid
    while b - a > 1:
        mid = (a + b) // 2
        if starts[mid] <= lo:
            a = mid
        else:
            b = mid
    return a


cdef int check_range(list arrays, const int64_t[:] starts, Py_ssize_t lo, Py_ssize_t hi,
                     int typenum, bint write) except -1:
    cdef Py_ssize_t i, n = len(arrays)
    if starts.shape[0] != n + 1 or starts[0] != 0:
        raise ValueError(f"starts must hold {n + 1} prefix sums from 0")
    for i in range(n):
        if starts[i + 1] < starts[i]:
            raise ValueError("starts must not decrease")
    if not (0 <= lo <= hi <= starts[n]):
        raise ValueError(f"range [{lo}, {hi}) is outside [0, {starts[n]})")
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError("buckets hold float32 or float64, not "
                        f"{cnp.PyArray_DescrFromType(typenum)}")
    if lo == hi:
        return 0
    i = first_index(starts, lo)
    while i < n and starts[i] < hi:
        try:
            check_array(arrays[i], typenum, starts[i + 1] - starts[i], write)
        except (TypeError, ValueError) as err:
            raise type(err)(f"array {i} of the bucket: {err}") from None
        i += 1
    return 0


cdef int check_buffer(cnp.ndarray buf, Py_ssize_t size) except -1:
    if type(buf) is not cnp.ndarray or not cnp.PyArray_IS_C_CONTIGUOUS(buf):
        raise TypeError("the buffer must be a C-contiguous numpy.ndarray")
    if not cnp.PyArray_ISWRITEABLE(buf):
        raise ValueError("the buffer is read-only")
    if cnp.PyArray_SIZE(buf) < size:
        raise ValueError(f"the buffer holds {cnp.PyArray_SIZE(buf)} elements, the range {size}")
    return 0


cdef void copy_range(list arrays, const int64_t[:] starts, Py_ssize_t lo, Py_ssize_t hi,
                     char* buf, Py_ssize_t itemsize, bint into_buffer):
    cdef Py_ssize_t i = first_index(starts, lo), a, b
    cdef char* data
    while i < len(arrays) and starts[i] < hi:
        a = max(lo, starts[i])
        b = min(hi, starts[i + 1])
        if b > a:
            data = <char*>cnp.PyArray_DATA(<cnp.ndarray>arrays[i]) + (a - starts[i]) * itemsize
            if into_buffer:
                memcpy(buf + (a - lo) * itemsize, data, (b - a) * itemsize)
            else:
                memcpy(data, buf + (a - lo) * itemsize, (b - a) * itemsize)
        i += 1


cdef void divide_out(list arrays, const int64_t[:] starts, Py_ssize_t lo, Py_ssize_t hi,
                     real* buf, real divisor):
    cdef Py_ssize_t i = first_index(starts, lo), a, b, j
    cdef real* data
    while i < len(arrays) and starts[i] < hi:
        a = max(lo, starts[i])
        b = min(hi, starts[i + 1])
        data = <real*>cnp.PyArray_DATA(<cnp.ndarray>arrays[i]) + (a - starts[i])
        for j in range(b - a):
            data[j] = buf[a - lo + j] / divisor
        i += 1


def copy_in(list arrays, const int64_t[:] starts, Py_ssize_t lo, Py_ssize_t hi,
            cnp.ndarray buf) -> None:
    """buf[:hi - lo] = concatenation(arrays)[lo:hi]."""
    check_buffer(buf, hi - lo)
    check_range(arrays, starts, lo, hi, cnp.PyArray_TYPE(buf), False)
    copy_range(arrays, starts, lo, hi, <char*>cnp.PyArray_DATA(buf), buf.itemsize, True)


def copy_out(list arrays, const int64_t[:] starts, Py_ssize_t lo, Py_ssize_t hi,
             cnp.ndarray buf, long divisor=1) -> None:
    """concatenation(arrays)[lo:hi] = buf[:hi - lo] / divisor (in the arrays' dtype)."""
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    check_buffer(buf, hi - lo)
    check_range(arrays, starts, lo, hi, cnp.PyArray_TYPE(buf), True)
    if divisor == 1:
        copy_range(arrays, starts, lo, hi, <char*>cnp.PyArray_DATA(buf), buf.itemsize, False)
    elif cnp.PyArray_TYPE(buf) == cnp.NPY_FLOAT32:
        divide_out(arrays, starts, lo, hi, <float*>cnp.PyArray_DATA(buf), <float>divisor)
    else:
        divide_out(arrays, starts, lo, hi, <double*>cnp.PyArray_DATA(buf), <double>divisor)


def fill_zero(list arrays, const int64_t[:] starts, Py_ssize_t lo, Py_ssize_t hi,
              object dtype) -> None:
    """concatenation(arrays)[lo:hi] = 0, for arrays of `dtype` (float32 or float64)."""
    cdef cnp.dtype descr = cnp.dtype(dtype)
    check_range(arrays, starts, lo, hi, descr.type_num, True)
    cdef Py_ssize_t i = first_index(starts, lo), a, b
    cdef Py_ssize_t itemsize = descr.itemsize
    while i < len(arrays) and starts[i] < hi:
        a = max(lo, starts[i])
        b = min(hi, starts[i + 1])
        if b > a:
            memset(<char*>cnp.PyArray_DATA(<cnp.ndarray>arrays[i]) + (a - starts[i]) * itemsize,
                   0, (b - a) * itemsize)
        i += 1


cdef bint has_shape(cnp.ndarray a, tuple shape):
    cdef int d, ndim = cnp.PyArray_NDIM(a)
    if len(shape) != ndim:
        return False
    for d in range(ndim):
        if cnp.PyArray_DIMS(a)[d] != <cnp.npy_intp>shape[d]:
            return False
    return True


def check_pairs(list weights, list gradients, list shapes, const int[:] typenums) -> int:
    """The index of the first (weights, gradient) pair that is not two writeable
    C-contiguous ndarrays of typenums[i] with shape shapes[i]; -1 if all are."""
    cdef Py_ssize_t i, n = len(shapes)
    if len(weights) != n or len(gradients) != n or typenums.shape[0] != n:
        return 0 if n else -1
    cdef cnp.ndarray w, g
    for i in range(n):
        if type(weights[i]) is not cnp.ndarray or type(gradients[i]) is not cnp.ndarray:
            return i
        w = <cnp.ndarray>weights[i]
        g = <cnp.ndarray>gradients[i]
        if (cnp.PyArray_TYPE(w) != typenums[i] or cnp.PyArray_TYPE(g) != typenums[i]
                or not cnp.PyArray_IS_C_CONTIGUOUS(w) or not cnp.PyArray_IS_C_CONTIGUOUS(g)
                or not cnp.PyArray_ISWRITEABLE(w) or not cnp.PyArray_ISWRITEABLE(g)
                or not has_shape(w, shapes[i]) or not has_shape(g, shapes[i])):
            return i
    return -1
