"""Timing: blocks of back-to-back updates, sampled interleaved, on one of two clocks."""
from __future__ import annotations

import math
import statistics
import time
from itertools import repeat as _repeat
from typing import Any, Callable, Dict, List, Tuple


def _loop(step: Callable[[], Any]) -> Callable[[int], None]:
    """A block of `number` updates. A step with a `threads` attribute runs with optim's
    thread count set to it for the block (and set back after)."""
    threads = getattr(step, "threads", None)
    if threads is None:
        def block(number: int) -> None:
            for _ in _repeat(None, number):
                step()

        return block

    def block_on_threads(number: int) -> None:
        import optim

        saved = optim.get_num_threads()
        optim.set_num_threads(threads)
        try:
            for _ in _repeat(None, number):
                step()
        finally:
            optim.set_num_threads(saved)

    return block_on_threads


CLOCKS = ("auto", "cpu", "wall")


def _time_block(block: Callable[[int], Any], number: int,
                sync: Callable[[], None]) -> Tuple[float, float]:
    """(wall, thread CPU) seconds per update over a block of `number` updates."""
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    block(number)
    sync()
    t1 = time.perf_counter_ns()
    c1 = time.thread_time_ns()
    return (t1 - t0) / number / 1e9, (c1 - c0) / number / 1e9


def measure(blocks: Dict[str, Callable[[int], Any]], repeats: int, min_block_s: float,
            sync: Callable[[], None], clock: str = "wall",
            warmup: int = 2) -> Dict[str, dict]:
    """Median seconds per update of each block, sampled interleaved.

    clock "cpu" reports this thread's CPU time (time.thread_time_ns): on a shared machine
    it leaves out the time the OS gave our core to someone else, which wall-clock medians
    of multi-millisecond samples do not. Both clocks are recorded.
    """
    numbers = {}
    for name, block in blocks.items():
        for _ in range(warmup):
            block(1)
        sync()
        once = _time_block(block, 1, sync)[0]
        numbers[name] = 1 if once >= min_block_s else min(
            10**6, math.ceil(min_block_s / max(once, 1e-9)))
    wall: Dict[str, List[float]] = {name: [] for name in blocks}
    cpu: Dict[str, List[float]] = {name: [] for name in blocks}
    for _ in range(repeats):
        for name, block in blocks.items():
            w, c = _time_block(block, numbers[name], sync)
            wall[name].append(w)
            cpu[name].append(c)
    out = {}
    for name in blocks:
        # Thread CPU time can read 0 for a block shorter than its tick on some systems.
        use_cpu = clock == "cpu" and min(cpu[name]) > 0
        samples = cpu[name] if use_cpu else wall[name]
        out[name] = {"time_s": statistics.median(samples), "times_s": samples,
                     "wall_time_s": statistics.median(wall[name]),
                     "clock": "cpu" if use_cpu else "wall", "number": numbers[name]}
    return out


def _threadpool_limits(threads: int) -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads)
