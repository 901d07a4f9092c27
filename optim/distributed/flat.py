"""Flat buckets: many tensors as a few contiguous ranges of one reusable buffer.

A `Layout` lays one dtype's tensors end to end, grouped by the rank that owns them (each
rank's tensors form one contiguous region). Collectives run over buckets: ranges of at
most `bucket_elems` elements of that concatenation, copied into a reusable buffer by
`optim.distributed._flat` (C loops; a NumPy/CuPy fallback for device arrays).
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy

from .group import Group


class Layout:
    """One dtype's tensors end to end, grouped by owner rank."""

    __slots__ = ("dtype", "index", "starts", "regions", "xp")

    def __init__(self, dtype: Any, index: List[int], sizes: Sequence[int],
                 owners: Sequence[int], world_size: int, xp: Any = numpy) -> None:
        """index: positions in the caller's lists; sizes/owners: per position."""
        self.dtype = numpy.dtype(dtype)
        self.xp = xp
        self.index = sorted(index, key=lambda i: (owners[i], i))
        self.starts = numpy.zeros(len(self.index) + 1, dtype=numpy.int64)
        numpy.cumsum([sizes[i] for i in self.index], out=self.starts[1:])
        self.regions: List[Tuple[int, int]] = []
        for rank in range(world_size):
            mine = [j for j, i in enumerate(self.index) if owners[i] == rank]
            if mine:
                self.regions.append((int(self.starts[mine[0]]), int(self.starts[mine[-1] + 1])))
            else:
                at = self.regions[-1][1] if self.regions else 0
                self.regions.append((at, at))

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def take(self, items: Sequence[Any]) -> List[Any]:
        """The caller's items in this layout's order."""
        return [items[i] for i in self.index]


def chunks(lo: int, hi: int, size: int) -> List[Tuple[int, int]]:
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


# ---------------------------------------------------------------- copies

def copy_in(arrays: List[Any], layout: Layout, lo: int, hi: int, buf: Any) -> None:
    """buf[:hi - lo] = concatenation(arrays)[lo:hi]."""
    if layout.xp is numpy:
        from . import _flat

        _flat.copy_in(arrays, layout.starts, lo, hi, buf)
        return
    for array, a, b, s in _pieces(arrays, layout, lo, hi):
        buf[a - lo:b - lo] = array.reshape(-1)[a - s:b - s]


def copy_out(arrays: List[Any], layout: Layout, lo: int, hi: int, buf: Any,
             divisor: int = 1) -> None:
    """concatenation(arrays)[lo:hi] = buf[:hi - lo] / divisor, in the arrays' dtype."""
    if layout.xp is numpy:
        from . import _flat

        _flat.copy_out(arrays, layout.starts, lo, hi, buf, divisor)
        return
    xp = layout.xp
    for array, a, b, s in _pieces(arrays, layout, lo, hi):
        out = array.reshape(-1)[a - s:b - s]
        if divisor == 1:
            out[...] = buf[a - lo:b - lo]
        else:
            xp.divide(buf[a - lo:b - lo], layout.dtype.type(divisor), out=out)


def fill_zero(arrays: List[Any], layout: Layout, lo: int, hi: int) -> None:
    if layout.xp is numpy:
        from . import _flat

        _flat.fill_zero(arrays, layout.starts, lo, hi, layout.dtype)
        return
    for array, a, b, s in _pieces(arrays, layout, lo, hi):
        array.reshape(-1)[a - s:b - s] = 0


def _pieces(arrays: List[Any], layout: Layout, lo: int, hi: int):
    starts = layout.starts
    for i, array in enumerate(arrays):
        a, b = max(lo, int(starts[i])), min(hi, int(starts[i + 1]))
        if b > a:
            yield array, a, b, int(starts[i])


# ---------------------------------------------------------------- buffers

class Buffers:
    """Reusable flat buffers, two per (array module, dtype) so one can be filled while
    the other's collective is in flight. They grow to the largest bucket asked for."""

    __slots__ = ("_store",)

    def __init__(self) -> None:
        self._store: Dict[Tuple[Any, str, int], Any] = {}

    def get(self, layout: Layout, size: int, slot: int = 0) -> Any:
        key = (layout.xp.__name__, layout.dtype.str, slot)
        buf = self._store.get(key)
        if buf is None or buf.size < size:
            buf = layout.xp.empty(size, dtype=layout.dtype)
            self._store[key] = buf
        return buf[:size]

    def clear(self) -> None:
        self._store.clear()

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self._store.values())


# ---------------------------------------------------------------- collectives

def reduce(group: Group, layout: Layout, arrays: List[Any], buffers: Buffers,
           bucket_elems: int, divisor: int, keep: Tuple[int, int], what: str,
           ready: Optional[Callable[[int], None]] = None) -> None:
    """Sum `arrays` (in layout order) over the group, bucket by bucket, and write the sum
    divided by `divisor` back into the range `keep` of their concatenation (the rest is
    left as it was). While one bucket's all-reduce runs, the next is packed, and
    `ready(hi)` is called once [0, hi) is written back (to update those tensors)."""
    in_flight = None
    for k, (lo, hi) in enumerate(chunks(0, layout.total, bucket_elems)):
        buf = buffers.get(layout, hi - lo, slot=k % 2)
        copy_in(arrays, layout, lo, hi, buf)
        pending = group.start_all_reduce(buf, f"{what}, bucket {k + 1}")
        if in_flight is not None:
            _finish(in_flight, arrays, layout, divisor, keep, ready)
        in_flight = (pending, lo, hi)
    if in_flight is not None:
        _finish(in_flight, arrays, layout, divisor, keep, ready)


def _finish(in_flight: Any, arrays: List[Any], layout: Layout, divisor: int,
            keep: Tuple[int, int], ready: Optional[Callable[[int], None]]) -> None:
    pending, lo, hi = in_flight
    buf = pending.wait()
    a, b = max(lo, keep[0]), min(hi, keep[1])
    if b > a:
        copy_out(arrays, layout, a, b, buf[a - lo:], divisor)
    if ready is not None:
        ready(hi)


def share(group: Group, layout: Layout, arrays: List[Any], buffers: Buffers,
          bucket_elems: int, what: str) -> None:
    """Every rank's region of `arrays` (in layout order) overwritten everywhere by that
    rank's values: broadcasts from each owner in turn, bucket by bucket."""
    for owner, (lo, hi) in enumerate(layout.regions):
        for a, b in chunks(lo, hi, bucket_elems):
            buf = buffers.get(layout, b - a)
            if owner == group.rank:
                copy_in(arrays, layout, a, b, buf)
            group.broadcast(buf, owner, f"{what} from rank {owner}")
            if owner != group.rank:
                copy_out(arrays, layout, a, b, buf)


def broadcast_arrays(arrays: Sequence[Any], src: int = 0, group: Any = None,
                     bucket_mb: float = 25.0) -> None:
    """Overwrite `arrays` (float32/float64, NumPy or CuPy) in place on every rank with
    rank `src`'s, in buckets: e.g. the initial weights. A collective."""
    from .group import join

    group = join() if group is None else group
    arrays = list(arrays)
    if group.world_size == 1:
        return
    group.check_same(describe((i, a.shape, a.dtype) for i, a in enumerate(arrays)),
                     "the arrays to broadcast")
    xp = numpy
    if arrays and not isinstance(arrays[0], numpy.ndarray):
        import cupy as xp
    buffers = Buffers()
    for dtype in sorted({numpy.dtype(a.dtype).str for a in arrays}):
        index = [i for i, a in enumerate(arrays) if numpy.dtype(a.dtype).str == dtype]
        layout = Layout(dtype, index, [a.size for a in arrays], [src] * len(arrays),
                        group.world_size, xp)
        elems = max(1, int(bucket_mb * 2 ** 20) // layout.dtype.itemsize)
        share(group, layout, layout.take(arrays), buffers, elems,
              f"the broadcast of {len(arrays)} arrays from rank {src}")


def describe(items: Sequence[Tuple[Any, Any, Any]]) -> str:
    """A canonical text of (name, shape, dtype) triples, compared across ranks."""
    return "; ".join(f"{name!r}:{tuple(shape)}:{numpy.dtype(dtype).str}"
                     for name, shape, dtype in items)


__all__ = ["Layout", "Buffers", "chunks", "copy_in", "copy_out", "fill_zero", "reduce",
           "share", "describe", "broadcast_arrays"]
