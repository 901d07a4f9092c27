"""Child processes for the tests: optim run in a fresh interpreter, and memory that
faults on any access, to show that a loop does not read an array (a read kills the
child, not the test run)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import optim


def run_python(code: str, **env):
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(optim.__file__)), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120)


# Python source defining unreadable(n, dtype): an array on pages that fault on any
# access, to show a loop does not read it (run in a child: a read kills the process).
UNREADABLE = """
import ctypes, mmap, numpy
def unreadable(n, dtype):
    size = -(-n * numpy.dtype(dtype).itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
    x = numpy.frombuffer(mmap.mmap(-1, size), dtype, n)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(x.ctypes.data), ctypes.c_size_t(size), 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    return x
"""


needs_mprotect = pytest.mark.skipif(os.name != "posix", reason="needs mmap and mprotect")


def run_unreadable(code: str):
    """Run `code` after UNREADABLE in a child; check that reading such an array kills."""
    faults = run_python(UNREADABLE + "print(unreadable(4, 'float32')[1])")
    assert faults.returncode == -signal.SIGSEGV, faults
    return run_python(UNREADABLE + textwrap.dedent(code))
