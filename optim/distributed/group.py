"""The process group: join the one torchrun describes, and run optim's few collectives.

torch is imported only when a group of more than one process is joined. NumPy arrays
travel through Gloo zero-copy (`torch.from_numpy`); CuPy arrays through NCCL via DLPack
(`torch.from_dlpack`), a path written to torch's documented API but not run on a GPU yet.
"""
import atexit
import datetime
import hashlib
import os
import sys
from typing import Any, List, Optional

import numpy

DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other ranks
TIMEOUT_ENV = "OPTIM_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the ranks disagree."""


class Group:
    """One process's view of its process group and the collectives optim uses.

    World size 1 needs no torch: every collective is then the identity.
    """

    __slots__ = ("rank", "world_size", "timeout", "_pg", "_owned", "_error")

    def __init__(self, rank: int = 0, world_size: int = 1, timeout: float = DEFAULT_TIMEOUT,
                 process_group: Any = None, owned: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._pg = process_group
        self._owned = owned
        self._error: Optional[str] = None

    def __repr__(self) -> str:
        return f"<optim.distributed.Group rank {self.rank} of {self.world_size}>"

    # ------------------------------------------------------------ collectives

    def all_reduce(self, array: Any, what: str) -> None:
        """Sum `array` over the group in place."""
        self.start_all_reduce(array, what).wait()

    def start_all_reduce(self, array: Any, what: str) -> "Pending":
        """Begin summing `array` in place; `.wait()` on the result finishes it."""
        if self.world_size == 1:
            return Pending(self, None, array, what)
        dist = self._dist(what)
        tensor = as_tensor(array)
        try:
            work = dist.all_reduce(tensor, group=self._pg, async_op=True)
        except RuntimeError as err:
            raise self._failed(what, err) from err
        return Pending(self, work, array, what)

    def broadcast(self, array: Any, src: int, what: str) -> None:
        """Overwrite `array` on every rank with rank `src`'s."""
        if self.world_size == 1:
            return
        dist = self._dist(what)
        _synchronize_device(array)
        try:
            dist.broadcast(as_tensor(array), src=self._global_rank(src), group=self._pg)
        except RuntimeError as err:
            raise self._failed(what, err) from err
        _synchronize_device(array)

    def all_min(self, value: int, what: str) -> int:
        """The smallest of every rank's integer `value`."""
        if self.world_size == 1:
            return int(value)
        out = numpy.array([-int(value)], dtype=numpy.int64)
        self._max_int64(out, what)
        return int(-out[0])

    def check_same(self, description: str, what: str) -> None:
        """Raise DistributedError on every rank unless all ranks pass the same text."""
        if self.world_size == 1:
            return
        digest = hashlib.blake2b(description.encode("utf8"), digest_size=7).digest()
        value = int.from_bytes(digest, "little")
        both = numpy.array([value, -value], dtype=numpy.int64)
        self._max_int64(both, what)
        if both[0] != value or -both[1] != value:
            raise DistributedError(
                f"optim.distributed: rank {self.rank} of {self.world_size}: the ranks disagree "
                f"on {what}. Every rank must pass the same keys with the same shapes and "
                f"dtypes, in the same order (same model, built the same way, on every rank). "
                f"This rank has: {_shorten(description)}"
            )

    def all_gather_bytes(self, data: bytes, what: str) -> List[bytes]:
        """Every rank's `data`, in rank order."""
        if self.world_size == 1:
            return [bytes(data)]
        dist = self._dist(what)
        import torch

        sizes = torch.zeros(self.world_size, dtype=torch.int64)
        sizes[self.rank] = len(data)
        try:
            dist.all_reduce(sizes, group=self._pg)
            longest = int(sizes.max())
            mine = numpy.zeros(longest, dtype=numpy.uint8)
            mine[: len(data)] = numpy.frombuffer(data, dtype=numpy.uint8)
            parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(parts, torch.from_numpy(mine), group=self._pg)
        except RuntimeError as err:
            raise self._failed(what, err) from err
        return [part.numpy()[: int(n)].tobytes() for part, n in zip(parts, sizes)]

    def barrier(self, what: str) -> None:
        self.all_min(0, what)

    # ------------------------------------------------------------ internals

    def _max_int64(self, values: numpy.ndarray, what: str) -> None:
        dist = self._dist(what)
        try:
            dist.all_reduce(as_tensor(values), op=dist.ReduceOp.MAX, group=self._pg)
        except RuntimeError as err:
            raise self._failed(what, err) from err

    def _dist(self, what: str) -> Any:
        if self._error is not None:
            raise DistributedError(
                f"optim.distributed: cannot run {what}: the process group failed earlier "
                f"({self._error}); restart all ranks"
            )
        import torch.distributed as dist

        return dist

    def _global_rank(self, rank: int) -> int:
        if self._pg is None:
            return rank
        import torch.distributed as dist

        return dist.get_global_rank(self._pg, rank)

    def _failed(self, what: str, err: BaseException) -> DistributedError:
        """The error to raise after a collective failed; the group is unusable after it."""
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self._error = detail
        if self._owned:  # a broken Gloo group aborts the process at exit unless destroyed
            _destroy_process_group()
        return DistributedError(
            f"optim.distributed: rank {self.rank} of {self.world_size} failed in {what}: "
            f"another rank died, or did not join this collective within the "
            f"{self.timeout:g} s timeout (it hung, or called a different collective). "
            f"Check the other ranks' logs. The backend said: {detail}"
        )


class Pending:
    """A collective in flight."""

    __slots__ = ("group", "work", "array", "what")

    def __init__(self, group: Group, work: Any, array: Any, what: str) -> None:
        self.group, self.work, self.array, self.what = group, work, array, what

    def wait(self) -> Any:
        if self.work is not None:
            try:
                self.work.wait()
            except RuntimeError as err:
                raise self.group._failed(self.what, err) from err
            _synchronize_device(self.array)
            self.work = None
        return self.array


# ---------------------------------------------------------------- arrays <-> tensors

def as_tensor(array: Any) -> Any:
    """A torch tensor sharing `array`'s memory: from_numpy on the host, DLPack on a GPU."""
    import torch

    if isinstance(array, numpy.ndarray):
        return torch.from_numpy(array)
    _synchronize_device(array)
    return torch.from_dlpack(array)


def _synchronize_device(array: Any) -> None:
    """Order CuPy's stream and torch's around a NCCL collective (host arrays: nothing)."""
    if isinstance(array, numpy.ndarray):
        return
    import cupy
    import torch

    cupy.cuda.get_current_stream().synchronize()
    torch.cuda.current_stream().synchronize()


# ---------------------------------------------------------------- joining

_default: Optional[Group] = None


def join(timeout: Optional[float] = None, backend: Optional[str] = None) -> Group:
    """The default group: the initialised torch.distributed one, else the one torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) describes, else this process
    alone. Joining initialises torch.distributed with `timeout` seconds per collective and
    Gloo for host arrays (plus NCCL for CUDA ones when torch sees a GPU)."""
    global _default
    if _default is not None:
        return _default
    timeout = resolve_timeout(timeout)
    if "torch" in sys.modules or "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            _default = from_process_group(None, timeout=timeout)
            return _default
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        _default = Group(0, 1, timeout)
        return _default
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(
            f"optim.distributed: WORLD_SIZE is {world_size} but {', '.join(missing)} "
            "not set; start the processes with torchrun, or call "
            "torch.distributed.init_process_group yourself"
        )
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise ImportError(
            f"optim.distributed: WORLD_SIZE is {world_size}, and a group of processes needs "
            "torch: pip install 'thinc-optim[distributed]'"
        ) from err
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as err:  # rendezvous failed or timed out
        raise DistributedError(
            f"optim.distributed: rank {os.environ['RANK']} could not join the group of "
            f"{world_size} at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"within {timeout:g} s: {err}"
        ) from err
    atexit.register(_destroy_process_group)
    _default = Group(dist.get_rank(), dist.get_world_size(), timeout, owned=True)
    return _default


def from_process_group(process_group: Any, timeout: Optional[float] = None) -> Group:
    """A Group over an initialised torch.distributed group (None: the default one)."""
    import torch.distributed as dist

    return Group(dist.get_rank(process_group), dist.get_world_size(process_group),
                 resolve_timeout(timeout), process_group=process_group)


def resolve_timeout(timeout: Optional[float]) -> float:
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _destroy_process_group() -> None:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # already torn down
                pass


def _shorten(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


__all__ = ["Group", "DistributedError", "join", "from_process_group", "DEFAULT_TIMEOUT",
           "as_tensor"]
