"""Fixtures shared by the test files."""
from typing import Any

import pytest

from optim import backends


@pytest.fixture
def use():
    """use(backend): make `backend` the GPU backend for the test (the previous one is
    put back afterwards)."""
    previous = []

    def install(backend: Any) -> Any:
        previous.append(backends.set_gpu_backend(backend))
        return backend

    yield install
    for p in reversed(previous):
        backends.set_gpu_backend(p)
