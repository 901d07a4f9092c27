"""Host-side work of the GPU path: the per-call scalars of the GPU kernels (the CPU
kernels' `make_coefs`, as flat doubles), and the loops that run once per tensor per
step_many call.

`step_many` on many small device tensors is bound by what the host does per tensor:
reading each array's attributes to check it against its key's plan, and checking the
key's state by identity. These loops do that without the interpreter; they never touch
device memory and need no CuPy.
"""
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject

from optim._kernels cimport (
    NONFINITE_APPLY, NONFINITE_RAISE, NONFINITE_SKIP, Hyper, check_call, make_coefs, syncs,
)
from optim.cpu._loops cimport Coefs

from optim._kernels import KIND_NAMES

# What a call's Hypers ask beyond apply mode, as or-ed bits (`plan_modes`,
# `device_coef_table`); `cpdef`: plain ints of this module for the Python code too.
cpdef enum:
    HAS_FROZEN = 1         # a frozen tensor
    HAS_SKIP = 2           # a tensor in skip mode
    HAS_RAISE = 4          # a tensor in raise mode
    HAS_CLIP = 8           # a tensor that clips its gradient
    HAS_MIXED_KERNELS = 16  # more than one kernel code among the rows that are not frozen


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
    general path plans it again), else what the Hypers ask beyond apply mode: HAS_FROZEN,
    HAS_SKIP, HAS_RAISE (or-ed)."""
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
            mask |= HAS_FROZEN
            continue
        if plan.frozen or plan.kind_code != <int>h._kind():
            return -1
        if h.nonfinite == NONFINITE_SKIP:
            mask |= HAS_SKIP
        elif h.nonfinite == NONFINITE_RAISE:
            mask |= HAS_RAISE
    return mask


# ---------------------------------------------------------------- GPU per-call scalars
# For the GPU kernels (optim/_kernels_cuda.py): the same `make_coefs` numbers,
# as flat doubles in a fixed order the generated CUDA source indexes by name.

DEVICE_COEFS = ("lr", "beta1", "beta2", "eps", "l2", "pre_decay", "post_decay", "avg_keep",
                "la_alpha")
# A step_many coefficient row: the coefs, then what the launch needs per tensor besides
# (docs/gpu.md, "Groups and the non-finite skip"):
#   clip       the clip factor (1.0; the clip norm kernel writes it)
#   grad_clip  the tensor's grad_clip (its Hyper's; 0: no clipping)
#   status     DEVICE_GO: update; DEVICE_FROZEN: only zero the gradient; the clip norm
#              kernel of a checking tensor writes DEVICE_NAN / DEVICE_INF (skipped or
#              refused) or DEVICE_OUT (a device count outside the uploaded window)
#   check      the Hyper's nonfinite mode (optim._kernels' NONFINITE_APPLY / _SKIP /
#              _RAISE): other than apply, the clip norm kernel decides the status
#   kernel     which update kernel runs the row: kind * 4 + variant bits (-1: frozen)
#   t          the update count the row's coefs are for
#   pick       the row (index in the launch's rows) whose coefs the update uses: itself,
#              or, for a skip-mode tensor, the row of its count on the device
#   extra      the index of the tensor's window row for t + 1 (windows of > 1 row)
#   window     how many counts t, t + 1, ... the tensor's rows cover (1 but in skip mode)
#   counter    the device count: -2 none (apply, raise, frozen); -1 use it as it is;
#              >= 0 set it to this first (skip mode, when the host knows the count)
DEVICE_SLOTS = ("clip", "grad_clip", "status", "check", "kernel", "t", "pick", "extra",
                "window", "counter")
DEVICE_ROW = len(DEVICE_COEFS) + len(DEVICE_SLOTS)
DEVICE_GO, DEVICE_FROZEN, DEVICE_NAN, DEVICE_INF, DEVICE_OUT = 1.0, 0.0, -1.0, -2.0, -3.0
DEVICE_KINDS = KIND_NAMES  # DEVICE_SLOTS' kernel = DEVICE_KINDS.index(kind) * 4 + variant
cdef Py_ssize_t SLOT0 = len(DEVICE_COEFS)


def device_coefs(Hyper hyper, long t, double lr_scale=1.0, object key=None) -> tuple:
    """(variant, *DEVICE_COEFS) for the t-th update of `key`, as Python floats.

    variant = rectified | lookahead_sync << 1: which of a kind's 4 kernels runs.
    """
    check_call(key, t, lr_scale)
    cdef Coefs c = make_coefs(hyper, t, lr_scale)
    return ((1 if c.rectified else 0) | (2 if syncs(hyper, t) else 0), c.lr, c.beta1,
            c.beta2, c.eps, c.l2, c.pre_decay, c.post_decay, c.avg_keep, c.la_alpha)


def device_coef_table(object hypers, list keys, list counts, double lr_scale,
                      double[:, ::1] out, unsigned char[::1] variants) -> int:
    """Fill one DEVICE_ROW row of `out` and one `variants` entry per key (step_many on
    the GPU): row i holds the coefs of update counts[i] of keys[i] with hypers[i] (a
    list, one Hyper per key, or one Hyper for all), then its DEVICE_SLOTS: clip 1.0,
    its grad_clip, status GO (FROZEN for a frozen Hyper), check = its nonfinite mode,
    its kernel code, t, pick = i, extra 0, window 1, counter -2.

    Returns a mask of what the rows hold: HAS_FROZEN, HAS_SKIP, HAS_RAISE, HAS_CLIP,
    HAS_MIXED_KERNELS (or-ed)."""
    cdef Py_ssize_t i, n = len(keys)
    cdef long t
    cdef Coefs c
    cdef Hyper h
    cdef Hyper one = hypers if isinstance(hypers, Hyper) else None
    cdef list per_key = None if one is not None else hypers
    cdef int mask = 0, bits
    cdef double code, first_code = -1.0
    if per_key is not None and len(per_key) != n:
        raise ValueError("device_coef_table: keys and hypers disagree")
    if len(counts) != n or out.shape[0] != n or out.shape[1] != DEVICE_ROW or variants.shape[0] != n:
        raise ValueError("device_coef_table: keys, counts, out and variants disagree")
    for i in range(n):
        h = one if one is not None else <Hyper?>per_key[i]
        t = counts[i]
        check_call(keys[i], t, lr_scale)
        c = make_coefs(h, t, lr_scale)
        bits = (1 if c.rectified else 0) | (2 if syncs(h, t) else 0)
        variants[i] = bits
        out[i, 0] = c.lr
        out[i, 1] = c.beta1
        out[i, 2] = c.beta2
        out[i, 3] = c.eps
        out[i, 4] = c.l2
        out[i, 5] = c.pre_decay
        out[i, 6] = c.post_decay
        out[i, 7] = c.avg_keep
        out[i, 8] = c.la_alpha
        out[i, SLOT0] = 1.0                                   # clip
        out[i, SLOT0 + 1] = h.grad_clip if h.grad_clip > 0.0 else 0.0
        out[i, SLOT0 + 5] = <double>t                          # t
        out[i, SLOT0 + 6] = <double>i                          # pick
        out[i, SLOT0 + 7] = 0.0                                # extra
        out[i, SLOT0 + 8] = 1.0                                # window
        out[i, SLOT0 + 9] = -2.0                               # counter
        if h.frozen:
            mask |= HAS_FROZEN
            out[i, SLOT0 + 1] = 0.0  # no clip norm either
            out[i, SLOT0 + 2] = DEVICE_FROZEN
            out[i, SLOT0 + 3] = NONFINITE_APPLY
            out[i, SLOT0 + 4] = -1.0
            continue
        code = <double>(<int>h._kind() * 4 + bits)
        out[i, SLOT0 + 2] = DEVICE_GO
        out[i, SLOT0 + 3] = <double>h.nonfinite
        out[i, SLOT0 + 4] = code
        if h.nonfinite == NONFINITE_SKIP:
            mask |= HAS_SKIP
        elif h.nonfinite == NONFINITE_RAISE:
            mask |= HAS_RAISE
        if h.grad_clip > 0.0:
            mask |= HAS_CLIP
        if first_code < 0.0:
            first_code = code
        elif code != first_code:
            mask |= HAS_MIXED_KERNELS
    return mask
