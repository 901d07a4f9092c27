"""Array backends: which kernels update an array, and where its state lives.

The optimizer picks the backend from the arrays it is given. NumPy arrays go to the
Cython kernels (a fast path in `Optimizer.__call__`); arrays of any other registered
backend (CuPy by default) go through the `Backend` protocol below.
"""
from typing import Any, Callable, List, NamedTuple, Optional, Protocol

import numpy


class Owner(NamedTuple):
    """What an optimizer lends its backends' updates objects, and all they may use of it:
    the Hyper of keys without a group, the key -> Hyper dict of resolved keys (None
    without groups), its per-key state (`optim.state.KeyStates`), the Hyper that
    updates a key (`hyper_for(key)`, resolving its group), and where an update that
    found a NaN or an inf is reported (`report(key, outcome, weights, count=1)`: counts
    a skip, raises in raise mode)."""

    hyper: Any
    key_hyper: Optional[dict]
    states: Any
    hyper_for: Callable[[Any], Any]
    report: Callable[..., None]


class Backend(Protocol):
    """A device backend (`optim.cuda.cupy.CupyBackend` is the one there is)."""

    name: str

    def is_array(self, x: Any) -> bool: ...
    def zeros_like(self, x: Any) -> Any: ...
    def copy(self, x: Any) -> Any: ...
    def to_host(self, x: Any) -> numpy.ndarray: ...
    def from_host(self, x: numpy.ndarray) -> Any: ...
    def plan(self, key: Any, kind: str, averages: bool, weights: Any, mom1: Any, mom2: Any,
             average: Any, slow: Any, frozen: bool = False) -> Any: ...
    def launch(self, plan: Any, hyper: Any, key: Any, weights: Any, gradient: Any, t: int,
               lr_scale: float) -> None: ...
    # hypers: one `_kernels.Hyper` per tensor (its group's settings); windows: skip
    # mode's counts per tensor; on_refused(i, outcome): raise mode (docs/gpu.md)
    def launch_many(self, batches: dict, hypers: Any, keys: List[Any], weights: List[Any],
                    gradients: List[Any], plans: List[Any], counts: List[int],
                    lr_scale: float, windows: Any = None, on_refused: Any = None) -> Any: ...
    # optional: RuntimeError when `what` would run under CUDA graph capture
    def refuse_capture(self, what: str) -> None: ...


class NumpyBackend:
    """Host arrays. Updates run in `optim._kernels`; this object only allocates and moves."""

    name = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, numpy.ndarray)

    def zeros_like(self, x: numpy.ndarray) -> numpy.ndarray:
        return numpy.zeros_like(x)

    def copy(self, x: numpy.ndarray) -> numpy.ndarray:
        return numpy.array(x, copy=True)

    def to_host(self, x: numpy.ndarray) -> numpy.ndarray:
        return x

    def from_host(self, x: numpy.ndarray) -> numpy.ndarray:
        return numpy.ascontiguousarray(x)


NUMPY = NumpyBackend()
_backends: List[Any] = []
_gpu_backend: Optional[Any] = None


def get_gpu_backend() -> Any:
    """The backend `Optimizer.to_gpu()` moves state to (CuPy unless replaced)."""
    global _gpu_backend
    if _gpu_backend is None:
        from ..cuda.cupy import CupyBackend

        _gpu_backend = CupyBackend()
    return _gpu_backend


def set_gpu_backend(backend: Any) -> Any:
    """Replace the GPU backend (tests inject a CPU-executed one); returns the previous."""
    global _gpu_backend
    previous, _gpu_backend = _gpu_backend, backend
    return previous


def register_backend(backend: Any) -> None:
    """Make arrays that `backend.is_array` accepts updatable by the optimizer."""
    if backend not in _backends:
        _backends.insert(0, backend)


def unregister_backend(backend: Any) -> None:
    if backend in _backends:
        _backends.remove(backend)


def backend_for(x: Any) -> Any:
    """The backend that owns array `x`; TypeError if none does."""
    if isinstance(x, numpy.ndarray) and type(x) is numpy.ndarray:
        return NUMPY
    for backend in _backends:
        if backend.is_array(x):
            return backend
    if _gpu_backend is not None and _gpu_backend.is_array(x):
        return _gpu_backend
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        return get_gpu_backend()
    if isinstance(x, numpy.ndarray):
        return NUMPY
    raise TypeError(
        f"optim updates numpy or cupy arrays, got {type(x).__module__}.{type(x).__name__}"
    )
