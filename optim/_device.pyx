"""Host-side loops of the GPU path that run once per tensor per step_many call.

`step_many` on many small device tensors is bound by what the host does per tensor:
reading each array's attributes to check it against its key's plan, and checking the
key's state by identity. These loops do that without the interpreter; they never touch
device memory and need no CuPy.
"""
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject

from optim._kernels cimport Hyper


def array_pointers(list arrays, list dtypes, list shapes, long device):
    """Each array's data pointer, after checking that it has the expected dtype and
    shape (dtypes[i], shapes[i]), is C-contiguous (CuPy's `_c_contiguous`) and lives on
    `device`. Returns None at the first misfit (the caller then raises the precise
    error); raises ValueError if the lists disagree in length."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(arrays)
    if PyList_GET_SIZE(dtypes) != n or PyList_GET_SIZE(shapes) != n:
        raise ValueError("array_pointers: arrays, dtypes and shapes disagree")
    cdef list pointers = [None] * n
    cdef object x, data, dtype
    for i in range(n):
        x = <object>PyList_GET_ITEM(arrays, i)
        dtype = x.dtype
        if dtype is not <object>PyList_GET_ITEM(dtypes, i) and \
                dtype != <object>PyList_GET_ITEM(dtypes, i):
            return None
        if x.shape != <object>PyList_GET_ITEM(shapes, i):
            return None
        if not x._c_contiguous:
            return None
        data = x.data
        if data.device_id != device:
            return None
        pointers[i] = data.ptr
    return pointers


def same_state(dict store, list keys, list expected) -> bool:
    """True when store[keys[i]] (None if missing) is expected[i] for every i."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(keys)
    cdef PyObject* got
    if PyList_GET_SIZE(expected) != n:
        return False
    for i in range(n):
        got = PyDict_GetItem(store, <object>PyList_GET_ITEM(keys, i))
        if got == NULL:
            if <object>PyList_GET_ITEM(expected, i) is not None:
                return False
        elif got != PyList_GET_ITEM(expected, i):
            return False
    return True


def plan_modes(list plans, list hypers) -> int:
    """-1 if a key's plan no longer fits its Hyper (frozen or not, the update kind: the
    general path plans it again), else what the Hypers ask beyond apply mode: 1 a frozen
    key, 2 skip mode, 4 raise mode (or-ed)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(plans)
    cdef Hyper h
    cdef object plan
    cdef int mask = 0
    if PyList_GET_SIZE(hypers) != n:
        raise ValueError("plan_modes: plans and hypers disagree")
    for i in range(n):
        plan = <object>PyList_GET_ITEM(plans, i)
        h = <Hyper?><object>PyList_GET_ITEM(hypers, i)
        if h.frozen:
            if not plan.frozen:
                return -1
            mask |= 1
            continue
        if plan.frozen or plan.kind_code != <int>h._kind():
            return -1
        if h.nonfinite == 1:
            mask |= 2
        elif h.nonfinite == 2:
            mask |= 4
    return mask
