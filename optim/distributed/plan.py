"""The ownership and layout plan of `optim.distributed`: which rank keeps each key's
state (sharded), and how one step's tensors lie in the flat buckets.

Everything here is a function of keys, sizes, dtypes, the world size and the rank: no
process group, no arrays, so every rank computes the same plan from the same step
(tests/distributed/test_distributed_plan.py checks it without processes).
"""
import math
from typing import (Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

import numpy

from . import flat

KeyT = Hashable
DEFAULT_BUCKET_MB = 25.0  # torch DDP's default bucket size


def bucket_elems(bucket_mb: float, dtype: numpy.dtype) -> int:
    """Elements of `dtype` in a bucket of `bucket_mb` MiB (at least one)."""
    return max(1, int(bucket_mb * 2 ** 20) // dtype.itemsize)


def assign_owners(keys: Iterable[KeyT], nbytes: Mapping[KeyT, int],
                  loads: Sequence[int]) -> Dict[KeyT, int]:
    """Owners for `keys`: largest first (ties by repr), each to the least-loaded rank
    (ties to the lowest), counting from `loads` (the bytes each rank owns already, one
    per rank; not changed). Depends on the keys and sizes, not the call order."""
    world_size = len(loads)
    loads = list(loads)
    owners = {}
    for key in sorted(keys, key=lambda k: (-nbytes[k], repr(k))):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[key] = rank
        loads[rank] += nbytes[key]
    return owners


def state_owners(keys: List[KeyT], shapes: Mapping[KeyT, Tuple[int, ...]],
                 dtypes: Mapping[KeyT, Optional[numpy.dtype]], world_size: int
                 ) -> Tuple[Dict[KeyT, int], Dict[KeyT, int]]:
    """Owners of a whole state's keys (a checkpoint's: no rank owns anything yet), and
    each key's bytes (4 per element for a key without state arrays)."""
    nbytes = {k: math.prod(shapes[k]) * (dtypes[k].itemsize if dtypes[k] else 4)
              for k in keys}
    return assign_owners(keys, nbytes, [0] * world_size), nbytes


def layouts(dtypes: Sequence[Optional[numpy.dtype]], sizes: Sequence[int],
            owners: Sequence[int], world_size: int, xp: Any = numpy) -> List[flat.Layout]:
    """One `flat.Layout` per dtype (by `dtype.str`) of the positions that have one (None:
    the position does not travel), each dtype's tensors grouped by owner."""
    out = []
    for dtype in sorted({d.str for d in dtypes if d is not None}):
        index = [i for i, d in enumerate(dtypes) if d is not None and d.str == dtype]
        out.append(flat.Layout(dtype, index, sizes, owners, world_size, xp))
    return out


class StepPlan:
    """How one step's tensors travel: cached while the keys and shapes repeat."""

    __slots__ = ("keys", "shapes", "typenums", "layouts", "local", "local_ends")

    def __init__(self, keys: List[KeyT], shapes: List[Tuple[int, ...]], typenums: Any,
                 layouts: List[flat.Layout], local: List[int]) -> None:
        self.keys = keys          # the step's keys, in call order
        self.shapes = shapes      # their shapes
        self.typenums = typenums  # their NumPy type numbers (int32 array)
        self.layouts = layouts    # one per dtype: the non-empty tensors, grouped by owner
        self.local = local        # positions this rank updates (call order)
        mine = set(local)         # per layout: (where each local tensor ends, its position)
        self.local_ends = [[(int(layout.starts[j + 1]), i) for j, i in enumerate(layout.index)
                            if i in mine] for layout in layouts]

    def repeats(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                check: Callable[[KeyT, Any, Any], Any]) -> bool:
        """Whether a step of these keys and arrays is this plan's (same keys, shapes and
        dtypes), its arrays validated: host arrays in C, device arrays by `check(key,
        weights, gradient)`, which raises on a misfit."""
        if keys != self.keys:
            return False
        if not self.layouts or self.layouts[0].xp is numpy:
            from . import _flat

            return _flat.check_pairs(weights, gradients, self.shapes, self.typenums) < 0
        if not len(weights) == len(gradients) == len(keys):
            return False
        for key, w, g in zip(keys, weights, gradients):  # device arrays: in Python
            check(key, w, g)
        return ([tuple(g.shape) for g in gradients] == self.shapes
                and [numpy.dtype(g.dtype).num for g in gradients] == list(self.typenums))


def summed_positions(ends: List[Tuple[int, int]]) -> Callable[[int], List[int]]:
    """For a layout's all-reduce in buckets: `summed(done)` is the positions of the local
    tensors (`StepPlan.local_ends`' (end, position)) that end by element `done` and were
    not returned before, in layout order."""
    returned = 0

    def summed(done: int) -> List[int]:
        nonlocal returned
        first = returned
        while returned < len(ends) and ends[returned][0] <= done:
            returned += 1
        return [i for _, i in ends[first:returned]]

    return summed


def step_plan(keys: Sequence[KeyT], shapes: Sequence[Tuple[int, ...]],
              dtypes: Sequence[Any], owners: Mapping[KeyT, int], world_size: int, rank: int,
              sharded: bool, xp: Any = numpy) -> StepPlan:
    """The plan of a step updating `keys` (call order) with gradients of these shapes and
    dtypes; `owners`: the owner of every key whose gradient is not empty. An empty
    gradient travels nowhere and is updated nowhere."""
    sizes = [math.prod(shape) for shape in shapes]
    dtypes = [numpy.dtype(d) for d in dtypes]
    owner_of = [owners.get(k, -1) for k in keys]
    travel = [d if n else None for d, n in zip(dtypes, sizes)]
    local = [i for i, n in enumerate(sizes) if n and (not sharded or owner_of[i] == rank)]
    typenums = numpy.array([d.num for d in dtypes], dtype=numpy.intc)
    return StepPlan(list(keys), [tuple(s) for s in shapes], typenums,
                    layouts(travel, sizes, owner_of, world_size, xp), local)


class Ownership:
    """Every key the steps have shown (the same on every rank): its shape, its dtype
    (None: loaded without state arrays) and owner rank, in first-seen order; and the
    bytes each rank owns."""

    __slots__ = ("shapes", "dtypes", "owner", "loads", "order")

    def __init__(self) -> None:
        self.shapes: Dict[KeyT, Tuple[int, ...]] = {}
        self.dtypes: Dict[KeyT, Optional[numpy.dtype]] = {}
        self.owner: Dict[KeyT, int] = {}
        self.loads: List[int] = []  # bytes per rank
        self.order: List[KeyT] = []

    def propose(self, new_keys: List[KeyT], nbytes: Mapping[KeyT, int],
                world_size: int) -> Dict[KeyT, int]:
        """Owners for keys not seen yet (`assign_owners` after what each rank owns);
        nothing is committed."""
        if len(self.loads) != world_size:
            self.loads = [0] * world_size
        return assign_owners(new_keys, nbytes, self.loads)

    def commit(self, new_keys: List[KeyT], owners: Mapping[KeyT, int],
               nbytes: Mapping[KeyT, int]) -> None:
        """Take the new keys (in the order given) with their agreed owners."""
        for key in new_keys:
            self.owner[key] = owners[key]
            self.loads[owners[key]] += nbytes[key]
            self.order.append(key)

    def see(self, key: KeyT, shape: Tuple[int, ...], dtype: Any) -> None:
        """The shape and dtype of `key`'s last non-empty gradient."""
        self.shapes[key] = tuple(shape)
        self.dtypes[key] = numpy.dtype(dtype)

    def reset(self, keys: List[KeyT], shapes: Dict[KeyT, Tuple[int, ...]],
              dtypes: Dict[KeyT, Optional[numpy.dtype]], owners: Dict[KeyT, int],
              nbytes: Mapping[KeyT, int], world_size: int) -> None:
        """Take a whole state's keys (in order), shapes, dtypes and owners."""
        self.order, self.shapes, self.dtypes, self.owner = keys, shapes, dtypes, owners
        self.loads = [0] * world_size
        for key, owner in owners.items():
            self.loads[owner] += nbytes[key]

    def rename(self, mapping: Mapping[KeyT, KeyT]) -> None:
        """Keys renamed (`remap_keys`), everything else kept."""
        rename = lambda k: mapping.get(k, k)  # noqa: E731
        self.order = [rename(k) for k in self.order]
        for store in (self.shapes, self.dtypes, self.owner):
            items = [(rename(k), v) for k, v in store.items()]
            store.clear()
            store.update(items)

    def ordered(self, keys: Iterable[KeyT]) -> List[KeyT]:
        """`keys` in first-seen order, those never seen last (in their order)."""
        keys = list(keys)
        present = set(keys)
        return ([k for k in self.order if k in present]
                + [k for k in keys if k not in self.owner])

    def with_state(self) -> List[KeyT]:
        """The keys with state arrays, in first-seen order."""
        return [k for k in self.order if self.dtypes.get(k) is not None]

    def state_layouts(self, keys: List[KeyT], world_size: int, xp: Any = numpy
                      ) -> List[flat.Layout]:
        """The layouts of `keys`' state arrays (keys with a dtype), grouped by owner."""
        return layouts([self.dtypes[k] for k in keys],
                       [math.prod(self.shapes[k]) for k in keys],
                       [self.owner[k] for k in keys], world_size, xp)
