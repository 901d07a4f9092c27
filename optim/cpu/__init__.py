"""Where the CPU kernels run: their SIMD level and thread count (docs/cpu.md).

At import, optim runs the loops of the best SIMD level that is built and that the CPU
supports, unless ``OPTIM_ISA`` names a level (baseline, avx2, avx512). Large updates use
up to ``get_num_threads()`` threads: ``OPTIM_NUM_THREADS`` if set, else the cores this
process may use, at most 8. Results are bitwise the same at every level and thread count.
"""
import os
from typing import Any, Dict, Tuple

from .. import _kernels

ISA_ENV = "OPTIM_ISA"
THREADS_ENV = "OPTIM_NUM_THREADS"
DEFAULT_MAX_THREADS = 8


def available_isas() -> Tuple[str, ...]:
    """The SIMD levels that are built and that this CPU runs, lowest first."""
    supported = _kernels.isa_supported()
    return tuple(level for level in _kernels.isa_built() if level in supported)


def _set_isa(level: str, source: str = "SIMD level") -> None:
    """Run the loops of `level` from now on (for tests and OPTIM_ISA; not thread-safe)."""
    if level not in _kernels.ISA_LEVELS:
        raise ValueError(f"{source} {level!r} is unknown; choose from "
                         f"{', '.join(_kernels.ISA_LEVELS)}")
    if level not in _kernels.isa_built():
        raise ValueError(f"{source} {level!r}: this build of optim has no {level} loops (the "
                         f"compiler lacked the flags, or this is not x86-64); built: "
                         f"{', '.join(_kernels.isa_built())}")
    if level not in _kernels.isa_supported():
        raise ValueError(f"{source} {level!r}: this CPU does not support it; it runs "
                         f"{', '.join(available_isas())}")
    _kernels.use_isa(level)


def default_num_threads() -> int:
    """The cores this process may use (its CPU affinity), at most DEFAULT_MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, DEFAULT_MAX_THREADS))


def set_num_threads(n: int) -> None:
    """Let one large update (or a step_many batch) use up to `n` threads.

    Tensors below a size where threads pay (docs/cpu.md) always run on the calling
    thread. A build without the thread pool (no POSIX threads) runs every update on one
    thread whatever `n`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be an integer >= 1, got {n!r}")
    _kernels.set_threads(n)


def get_num_threads() -> int:
    """The most threads one update may use now (1 without the thread pool)."""
    return _kernels.get_threads()


def config() -> Dict[str, Any]:
    """The CPU kernels' configuration: SIMD level running, levels built and supported,
    threads, thread pool."""
    return {
        "isa": _kernels.isa(),
        "isa_available": list(available_isas()),
        "isa_built": list(_kernels.isa_built()),
        "isa_supported": list(_kernels.isa_supported()),
        "threads": get_num_threads(),
        "thread_pool": _kernels.has_pool(),
    }


def describe() -> str:
    """config() in one line, e.g. for a benchmark's header."""
    c = config()
    return (f"SIMD {c['isa']} (available: {', '.join(c['isa_available'])}) | "
            f"threads {c['threads']}{'' if c['thread_pool'] else ' (no thread pool)'}")


def show_config() -> None:
    """Print where optim's CPU kernels run (SIMD level, threads)."""
    c = config()
    print(f"optim CPU kernels\n"
          f"  SIMD level:      {c['isa']}  (set {ISA_ENV} to force one)\n"
          f"  levels built:    {', '.join(c['isa_built'])}\n"
          f"  CPU supports:    {', '.join(c['isa_supported'])}\n"
          f"  threads:         {c['threads']}  (set {THREADS_ENV} or "
          f"optim.set_num_threads)\n"
          f"  thread pool:     "
          f"{'yes (POSIX threads)' if c['thread_pool'] else 'no (single-threaded build)'}")


def _threads_from_env() -> int:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return default_num_threads()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: expected a whole number >= 1")
    return n


def _configure_from_env() -> None:
    level = os.environ.get(ISA_ENV, "").strip().lower()
    if level:
        _set_isa(level, source=ISA_ENV)
    else:
        _set_isa(available_isas()[-1])
    set_num_threads(_threads_from_env())


_configure_from_env()
