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
        from ._roofline import Plan

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
        """ONE launch moving the bytes of the update of all the tensors: each of the k
        arrays read and written once over every parameter (the tensors laid end to
        end), plus one more read of a parameter-sized array when clipping. A launch per
        tensor would measure launch overhead, not the limit."""
        cp = self.xp
        dtype = tensors[0][0].dtype
        n = sum(int(arrays[0].size) for arrays in tensors)
        k = len(tensors[0])
        arrays = [self.filled(n, dtype.name, 0.5 + j) for j in range(k)]
        extra = [self.filled(n, dtype.name, 0.25), cp.zeros(1, dtype=numpy.uint32)] \
            if read_index is not None else []
        kernel = cp.RawKernel(roofline_source(dtype.name, k, bool(extra)), "optim_roofline",
                              options=("--fmad=false",))
        args = tuple(arrays + extra + [n])
        grid = (max(1, min((n + 255) // 256, 2**31 - 1)),)

        def run(number: int = 1, threads: int = 1) -> None:
            for _ in range(number):
                kernel(grid, (256,), args)

        run.args = args  # type: ignore[attr-defined]  (for the tests)
        return run

    def describe(self) -> str:
        cp = self.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props.get("name", b"CUDA device")
        return name.decode() if isinstance(name, bytes) else str(name)


def roofline_source(dtype: str, k: int, extra_read: bool) -> str:
    """The GPU roofline kernel: rotate k arrays (k = 1: negate), and read one more array
    whose value can never trigger the write (so the read is not optimised away)."""
    names = [f"a{j}" for j in range(k)]
    params = [f"T* __restrict__ {a}" for a in names]
    if k == 1:
        body = "a0[i] = -a0[i];"
    else:
        body = "const T first = a0[i]; " + " ".join(
            f"{names[j]}[i] = {names[j + 1]}[i];" for j in range(k - 1)) + \
            f" {names[-1]}[i] = first;"
    if extra_read:
        params += ["const T* __restrict__ extra", "unsigned int* __restrict__ seen"]
        body += " if (extra[i] != extra[i]) { seen[0] = 1u; }"
    ctype = {"float32": "float", "float64": "double"}[dtype]
    return (f"typedef {ctype} T;\n"
            f'extern "C" __global__ void optim_roofline({", ".join(params + ["long long n"])}) {{\n'
            "  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;"
            " i < n;\n       i += static_cast<long long>(gridDim.x) * blockDim.x) {\n"
            f"    {body}\n  }}\n}}\n")


def get_device(name: str) -> Device:
    if name == "cpu":
        return Device()
    try:
        import cupy
    except ImportError as err:
        raise UsageError(f"--device gpu needs CuPy, which is not importable ({err}); "
                         "install optim's cuda extra, e.g. pip install "
                         "'thinc-optim[cuda12x]'")
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
