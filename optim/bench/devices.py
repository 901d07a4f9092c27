"""Devices (array namespace, synchronisation, roofline) and the machine description."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional

import numpy

from .cases import Config
from .errors import UsageError


class Device:
    """Array namespace, synchronisation and roofline for a device."""

    name = "cpu"

    def __init__(self) -> None:
        self.xp = numpy

    def sync(self) -> None:
        pass

    def filled(self, n: int, dtype: str, value: float) -> Any:
        # empty + fill, not zeros: calloc'd zero pages would make reads look free.
        arr = self.xp.empty(n, dtype=dtype)
        arr.fill(value)
        return arr

    def roofline(self, tensors: List[List[Any]], read_index: Optional[int]) -> Callable:
        from .._roofline import Plan

        plan = Plan(tensors, read_index=read_index)

        def run(number: int = 1, threads: int = 1) -> None:
            plan.run(number, threads=threads)

        return run

    def describe(self) -> str:
        return cpu_name()


class CupyDevice(Device):
    name = "gpu"

    def __init__(self, cupy: Any) -> None:
        self.xp = cupy

    def sync(self) -> None:
        self.xp.cuda.Device().synchronize()

    def roofline(self, tensors: List[List[Any]], read_index: Optional[int]) -> Callable:
        cp = self.xp
        k = len(tensors[0])
        names = "abcdef"[:k]
        if k == 1:
            body = "a = -a;"
        else:
            body = "T t = a; " + " ".join(
                f"{names[i]} = {names[i + 1]};" for i in range(k - 1)) + f" {names[-1]} = t;"
        rotate = cp.ElementwiseKernel(
            "", ", ".join(f"T {c}" for c in names), body, f"optim_roofline_rw{k}")
        reduce_or = cp.ReductionKernel(
            "T x", "T y", "x", "a | b", "y = a", "0", "optim_roofline_or")
        utype = cp.uint32 if tensors[0][0].dtype.itemsize == 4 else cp.uint64

        def run(number: int = 1, threads: int = 1) -> None:
            for _ in range(number):
                for arrays in tensors:
                    if read_index is not None:
                        reduce_or(arrays[read_index].view(utype))
                    rotate(*arrays)

        return run

    def describe(self) -> str:
        cp = self.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props.get("name", b"CUDA device")
        return name.decode() if isinstance(name, bytes) else str(name)


def get_device(name: str) -> Device:
    if name == "cpu":
        return Device()
    try:
        import cupy
    except ImportError as err:
        raise UsageError(f"--device gpu needs CuPy, which is not importable ({err}); "
                         "install optim's cuda extra, e.g. pip install optim[cuda12x]")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError without a driver
        raise UsageError(f"--device gpu: CuPy sees no CUDA device ({err})")
    if count < 1:
        raise UsageError("--device gpu: CuPy sees no CUDA device")
    return CupyDevice(cupy)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dev: Device, cfg: Config) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "device": dev.name,
        "processor": dev.describe(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import optim
        from optim import cpu

        info["optim"] = getattr(optim, "__version__", None)
        info["optim_cpu"] = cpu.config()
        info["optim_cpu"]["threads"] = cfg.threads
    except ImportError:
        info["optim"] = None
    for peer, module in (("thinc", "thinc"), ("torch", "torch")):
        if peer in cfg.compare and module in sys.modules:
            info[peer] = getattr(sys.modules[module], "__version__", None)
    return info
