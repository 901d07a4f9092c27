"""`DistributedOptimizer`: data-parallel updates over torch.distributed.

Every rank holds the same weights and its own gradients. A step sums the gradients over
the group in a few flat buckets, divides by the world size (`reduce="mean"`, as DDP
does) or not (`"sum"`), then runs one local `Optimizer.step_many`: every rank computes
the same update from the same numbers, so the weights stay bitwise equal.

With `sharded=True` (ZeRO stage 1) each key is owned by one rank, which alone keeps its
state (moments, averages, lookahead weights) and updates it; the owners then broadcast
the updated weights in buckets. Same numbers, bitwise, as the replicated mode.

When weights change: `step_many` updates before it returns. The per-tensor call
`optimizer(key, weights, gradient)` (Thinc's `finish_update`) only records the tensors;
`flush()` or `step_schedules()` updates all recorded ones together (docs/distributed.md).
"""
import math
import numbers
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy
import srsly

from .. import optimizer as _optimizer
from .. import serialize
from ..backends import NUMPY, backend_for
from ..settings.defaults import any_empty, is_empty, shape_error
from ..optimizer import Optimizer
from . import flat
from .group import Group, DistributedError, from_process_group, join
from .factories import distributed_factory, forwarded
from .plan import (DEFAULT_BUCKET_MB, Ownership, StepPlan, bucket_elems, state_owners,
                   step_plan, summed_positions)

KeyT = Hashable
REDUCTIONS = ("mean", "sum")


class DistributedOptimizer:
    """An `optim.Optimizer` whose updates use gradients averaged over a process group.

    optimizer: the local optimizer (its hyperparameters and schedules apply unchanged).
    reduce: "mean" (default) or "sum" of the ranks' gradients.
    sharded: keep each key's state on one rank only (ZeRO stage 1).
    bucket_mb: the most MiB one collective moves (and the size of the reusable buffer).
    group: an `optim.distributed.Group`, a torch ProcessGroup, or None to join the
        group torchrun describes (world size 1 without it: no collectives).
    timeout: seconds a collective waits for the other ranks before failing (groups
        joined here only; default `optim.distributed.DEFAULT_TIMEOUT`).
    """

    __slots__ = ("optimizer", "reduce", "sharded", "bucket_mb", "timeout", "_group",
                 "_pending", "_pending_keys", "_plan", "_keys", "_buffers", "_averages", "_xp",
                 "__weakref__")

    def __init__(self, optimizer: Optimizer, *, reduce: str = "mean", sharded: bool = False,
                 bucket_mb: float = DEFAULT_BUCKET_MB, group: Any = None,
                 timeout: Optional[float] = None) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a ThincOptimizer's inner one
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DistributedOptimizer wraps an optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if not isinstance(sharded, bool):
            raise TypeError(f"sharded must be True or False, got {sharded!r}")
        if (isinstance(bucket_mb, bool) or not isinstance(bucket_mb, numbers.Real)
                or not (0 < bucket_mb < math.inf)):
            raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, numbers.Real) or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.optimizer = optimizer
        self.reduce = reduce
        self.sharded = sharded
        self.bucket_mb = float(bucket_mb)
        self.timeout = None if timeout is None else float(timeout)
        self._group: Optional[Group] = group if isinstance(group, Group) or group is None \
            else from_process_group(group, timeout)
        self._pending: List[Tuple[KeyT, Any, Any, float]] = []
        self._pending_keys: set = set()
        self._plan: Optional[StepPlan] = None
        self._keys = Ownership()  # every key seen, on every rank: shape, dtype, owner
        self._buffers = flat.Buffers()
        self._averages: Optional[Dict[KeyT, Any]] = None  # sharded: gathered, until a step
        self._xp: Any = numpy  # where the state lives: numpy, or cupy after GPU steps
        if optimizer.nr_update:  # it holds state already: spread it like a checkpoint
            self._adopt(optimizer.to_dict(), fresh=False)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a DistributedOptimizer cannot be pickled or copied: it holds a process group "
            "and this rank's part of a plan that the other ranks share. Save its state "
            "(to_bytes(), every rank calls it; or optim.thinc.save_checkpoint) and build "
            "a new one around the loaded optimizer in the other process")

    # ------------------------------------------------------------ the group

    @property
    def group(self) -> Group:
        """The process group (joined on first use)."""
        if self._group is None:
            self._group = join(self.timeout)
        return self._group

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def _bucket_elems(self, dtype: numpy.dtype) -> int:
        return bucket_elems(self.bucket_mb, dtype)

    # ------------------------------------------------------------ updates

    def __call__(self, key: KeyT, weights: Any, gradient: Any, *,
                 lr_scale: float = 1.0) -> Tuple[Any, Any]:
        """Record one tensor's update, run at the next `flush()` / `step_schedules()`.

        Returns (weights, gradient) unchanged, as Thinc's `finish_update` expects; the
        update writes into these same arrays later. An empty gradient is a no-op, as in
        `Optimizer.__call__`: nothing is checked or recorded.
        """
        if is_empty(gradient):
            return weights, gradient
        if key in self._pending_keys:
            raise ValueError(
                f"key {key!r} was given twice before its update ran. optim.distributed "
                "defers per-tensor updates until optimizer.flush() or "
                "optimizer.step_schedules(): call one of them once after every "
                "model.finish_update(optimizer) (spaCy's training loop calls "
                "step_schedules() for you)"
            )
        self._check(key, weights, gradient)
        _check_lr_scale(lr_scale)
        self._pending.append((key, weights, gradient, float(lr_scale)))
        self._pending_keys.add(key)
        return weights, gradient

    def flush(self) -> None:
        """Run the recorded updates: one bucketed all-reduce, one local update. A
        collective: every rank must call it at the same point of its loop."""
        if not self._pending:
            return
        pending, self._pending, self._pending_keys = self._pending, [], set()
        keys, weights, gradients, scales = (list(x) for x in zip(*pending))
        self._run(keys, weights, gradients, scales, checked=True)

    def step_schedules(self) -> None:
        """Flush the recorded updates, then advance the schedules (as Thinc's). With a
        consecutive-skip limit and sharded state, the ranks first agree on whether the
        step skipped an update (each saw only its own keys): one small collective."""
        self.flush()
        opt = self.optimizer
        if opt.max_consecutive_skips is not None and self.sharded and self.world_size > 1:
            flags = self.group.all_gather_bytes(b"1" if opt.step_skipped else b"0",
                                                "the count of skipped updates")
            opt.step_skipped = b"1" in flags
        opt.step_schedules()

    def bind(self, obj: Any) -> "DistributedOptimizer":
        """`Optimizer.bind` (per-parameter groups): call it on every rank."""
        self.optimizer.bind(obj)
        return self

    def path_of(self, key: KeyT) -> str:
        return self.optimizer.path_of(key)

    def group_of(self, key: KeyT) -> Optional[str]:
        return self.optimizer.group_of(key)

    @property
    def skipped(self) -> Dict[KeyT, int]:
        """key -> updates skipped (non-finite gradient), over the whole group: sharded
        with several ranks, a collective (call it on every rank)."""
        counts = self.optimizer.skipped
        if self.sharded and self.world_size > 1:
            parts = self.group.all_gather_bytes(
                srsly.msgpack_dumps([[serialize.encode_key(k), n] for k, n in counts.items()]),
                "the gathering of skip counts")
            counts = {}
            for part in parts:
                for key, n in srsly.msgpack_loads(part):
                    key = serialize.decode_key(key)
                    counts[key] = counts.get(key, 0) + n
        return counts

    def peek_skipped(self) -> Dict[KeyT, int]:
        """This rank's `peek_skipped` (no collective: sharded, its own keys only)."""
        return self.optimizer.peek_skipped()

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def step_many(self, keys: Sequence[KeyT], weights: Sequence[Any],
                  gradients: Sequence[Any], *, lr_scale: float = 1.0) -> None:
        """Update many tensors now from gradients averaged over the group (a collective)."""
        if self._pending:
            raise ValueError(
                f"step_many: {len(self._pending)} per-tensor updates are still recorded; "
                "call optimizer.flush() (or step_schedules()) before step_many"
            )
        keys, weights, gradients = list(keys), list(weights), list(gradients)
        if not len(keys) == len(weights) == len(gradients):
            raise ValueError(f"step_many: {len(keys)} keys, {len(weights)} weights and "
                             f"{len(gradients)} gradients")
        _check_lr_scale(lr_scale)
        if any_empty(gradients):  # no-ops, as in Optimizer.step_many
            todo = [i for i, g in enumerate(gradients) if not is_empty(g)]
            keys, weights = [keys[i] for i in todo], [weights[i] for i in todo]
            gradients = [gradients[i] for i in todo]
        self._run(keys, weights, gradients, [float(lr_scale)] * len(keys), checked=False)

    def _run(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
             scales: List[float], checked: bool) -> None:
        plan = self._plan_for(keys, weights, gradients, checked)
        group = self.group
        if group.world_size == 1:
            self._update_local(plan.local, keys, weights, gradients, scales)
        else:
            divisor = group.world_size if self.reduce == "mean" else 1
            for layout, ends in zip(plan.layouts, plan.local_ends):
                keep = layout.regions[group.rank] if self.sharded else (0, layout.total)
                flat.reduce(group, layout, layout.take(gradients), self._buffers,
                            self._bucket_elems(layout.dtype), divisor, keep,
                            f"the gradient all-reduce of step {self.optimizer.step}",
                            self._updater(ends, keys, weights, gradients, scales))
        if group.world_size > 1 and self.sharded:
            for layout in plan.layouts:
                grads = layout.take(gradients)
                mine = layout.regions[group.rank]
                flat.fill_zero(grads, layout, 0, mine[0])
                flat.fill_zero(grads, layout, mine[1], layout.total)
                flat.share(group, layout, layout.take(weights), self._buffers,
                           self._bucket_elems(layout.dtype),
                           f"the weight broadcast of step {self.optimizer.step}")
        self._averages = None

    def _updater(self, ends: List[Tuple[int, int]], keys: List[KeyT], weights: List[Any],
                 gradients: List[Any], scales: List[float]) -> Callable[[int], None]:
        """`ready(done)` for flat.reduce: update the local tensors that end by `done`
        (their sums are back) while the next bucket's all-reduce runs."""
        summed = summed_positions(ends)

        def ready(done: int) -> None:
            self._update_local(summed(done), keys, weights, gradients, scales)

        return ready

    def _update_local(self, positions: List[int], keys: List[KeyT], weights: List[Any],
                      gradients: List[Any], scales: List[float]) -> None:
        """One local step_many per distinct lr_scale (one, normally), in the given order.
        Keys update independently, so splitting a step into several calls changes no bit."""
        by_scale: Dict[float, List[int]] = {}
        for i in positions:
            by_scale.setdefault(scales[i], []).append(i)
        for scale, index in by_scale.items():
            self.optimizer.step_many([keys[i] for i in index], [weights[i] for i in index],
                                     [gradients[i] for i in index], lr_scale=scale)

    # ------------------------------------------------------------ plans

    def _plan_for(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                  checked: bool) -> StepPlan:
        """The cached plan when this step repeats the last one (checked in C), else a new
        one, validated here and agreed on by all ranks, before any collective runs."""
        plan = self._plan
        if plan is not None and plan.repeats(keys, weights, gradients, self._check):
            return plan
        return self._new_plan(keys, weights, gradients, checked)

    def _new_plan(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                  checked: bool) -> StepPlan:
        if len(set(keys)) != len(keys):
            raise ValueError("step_many: each key may appear once per call")
        backends = []
        for key, w, g in zip(keys, weights, gradients):
            backends.append(self._check(key, w, g) if not checked else backend_for(w))
        if len(set(backends)) > 1:
            raise TypeError("optim.distributed: one step's tensors must all live on one "
                            "device (all NumPy or all CuPy arrays)")
        xp = numpy if not backends or backends[0] is NUMPY else _cupy()
        if xp is not numpy:
            self._xp = xp
        group, seen = self.group, self._keys
        new_keys = [key for key, g in zip(keys, gradients) if g.size and key not in seen.owner]
        nbytes = {k: int(g.size * g.dtype.itemsize) for k, g in zip(keys, gradients)}
        owners = seen.propose(new_keys, nbytes, group.world_size)
        group.check_same(flat.describe((k, g.shape, g.dtype) for k, g in zip(keys, gradients)),
                         "the keys, shapes and dtypes of a step")
        seen.commit(new_keys, owners, nbytes)  # agreed
        for key, g in zip(keys, gradients):
            if g.size:
                seen.see(key, g.shape, g.dtype)
        self._plan = step_plan(keys, [tuple(g.shape) for g in gradients],
                               [g.dtype for g in gradients], seen.owner, group.world_size,
                               group.rank, self.sharded, xp)
        return self._plan

    def _check(self, key: KeyT, weights: Any, gradient: Any) -> Any:
        """Validate one update (dtypes, contiguity, device, shapes) before anything runs."""
        backend = self.optimizer.check_pair(key, weights, gradient)
        shape = self._keys.shapes.get(key)  # (empty gradients never get here)
        if shape is not None and tuple(weights.shape) != shape:
            raise ValueError(shape_error(key, weights.shape, shape))
        dtype = self._keys.dtypes.get(key)
        if dtype is not None and numpy.dtype(gradient.dtype) != dtype:
            raise TypeError(f"key {key!r}: the gradient is {gradient.dtype}, but this key "
                            f"was updated as {dtype} before")
        return backend

    # ------------------------------------------------------------ state

    @property
    def averages(self) -> Optional[Dict[KeyT, Any]]:
        """The parameter averages of every key (None with use_averages=False).

        Sharded, with more than one rank, they are gathered from their owners: then
        reading this is a collective the first time after each step (every rank must read
        it; spaCy's loop does), and the gathered copy lives until the next step.
        """
        inner = self.optimizer.averages
        if inner is None or not self.sharded or self.group.world_size == 1:
            return inner
        if self._averages is None:
            self._averages = self._gather_averages()
        return self._averages

    def _gather_averages(self) -> Dict[KeyT, Any]:
        group, inner, seen = self.group, self.optimizer.averages, self._keys
        keys = seen.with_state()
        arrays = {}
        for key in keys:
            if seen.owner[key] == group.rank:
                arrays[key] = inner[key]
            else:
                arrays[key] = self._xp.empty(seen.shapes[key], dtype=seen.dtypes[key])
        for layout in seen.state_layouts(keys, group.world_size, self._xp):
            flat.share(group, layout, layout.take([arrays[k] for k in keys]), self._buffers,
                       self._bucket_elems(layout.dtype),
                       f"the gathering of the averages at step {self.optimizer.step}")
        return {key: arrays[key] for key in keys}

    def state_nbytes(self) -> int:
        """Bytes of optimizer state (moments, averages, lookahead weights) on this rank."""
        total = 0
        for store in (self.optimizer.mom1, self.optimizer.mom2, self.optimizer.averages,
                      self.optimizer.lookahead):
            for array in (store or {}).values():
                total += int(array.nbytes)
        return total

    def owner(self, key: KeyT) -> int:
        """The rank that keeps `key`'s state when sharded."""
        return self._keys.owner[key]

    # ------------------------------------------------------------ checkpoints

    def to_dict(self) -> Dict[str, Any]:
        """The single-process state (`Optimizer.to_dict`'s format) of the whole group.
        Sharded with several ranks, a collective: every rank gets the whole state."""
        self._check_flushed("to_dict")
        msg = self.optimizer.to_dict()
        records = msg["keys"]
        if self.sharded and self.group.world_size > 1:
            parts = self.group.all_gather_bytes(srsly.msgpack_dumps([records, msg["skipped"]]),
                                                "the gathering of a checkpoint")
            parts = [srsly.msgpack_loads(part) for part in parts]
            records = [record for part in parts for record in part[0]]
            msg["skipped"] = [pair for part in parts for pair in part[1]]
        by_key = {serialize.decode_key(r["key"]): r for r in records}
        msg["keys"] = [by_key[k] for k in self._keys.ordered(by_key)]
        return msg

    def to_bytes(self) -> bytes:
        """`to_dict()` as msgpack: loadable by `optim.load` / `Optimizer.from_bytes` in
        one process, or by `from_bytes` at any world size."""
        return srsly.msgpack_dumps(self.to_dict())

    def to_disk(self, path: Any) -> None:
        """Call on every rank: rank 0 writes the whole state, atomically."""
        data = self.to_bytes()
        if self.group.rank == 0:
            serialize.write_atomic(path, data)

    def from_bytes(self, data: bytes) -> "DistributedOptimizer":
        """Load single-process state (from any world size); each rank keeps what it owns."""
        self._check_flushed("from_bytes")
        loaded = Optimizer.load_bytes(data)
        if loaded.kind != self.optimizer.kind:
            raise ValueError(
                f"this state is for a {loaded.kind} optimizer, not {self.optimizer.kind}"
            )
        self._adopt(loaded.to_dict(), fresh=True)
        return self

    def from_disk(self, path: Any) -> "DistributedOptimizer":
        return self.from_bytes(serialize.read_file(path))

    def _adopt(self, msg: Dict[str, Any], fresh: bool) -> None:
        """Take a whole single-process state: owners are assigned over all its keys and
        this rank keeps the records it owns (all of them unless sharded)."""
        records = msg["keys"]
        keys = [serialize.decode_key(r["key"]) for r in records]
        shapes = {k: tuple(r["shape"]) for k, r in zip(keys, records)}
        dtypes = {}
        for key, record in zip(keys, records):
            arrays = [record[n] for n in serialize.STATE_ARRAYS if record[n] is not None]
            dtypes[key] = numpy.dtype(arrays[0].dtype) if arrays else None
        world_size, rank = self.group.world_size, self.group.rank
        owners, nbytes = state_owners(keys, shapes, dtypes, world_size)
        mine = [r for k, r in zip(keys, records) if not self.sharded or owners[k] == rank]
        if fresh or len(mine) != len(records):
            skipped = [pair for pair in msg.get("skipped", ())  # each count on one rank
                       if not self.sharded
                       or owners.get(serialize.decode_key(pair[0]), 0) == rank]
            self.optimizer.from_bytes(srsly.msgpack_dumps({**msg, "keys": mine,
                                                           "skipped": skipped}))
        self._keys.reset(keys, shapes, dtypes, owners, nbytes, world_size)
        self._plan = None
        self._averages = None

    def _check_flushed(self, what: str) -> None:
        if self._pending:
            raise ValueError(f"{what}: {len(self._pending)} per-tensor updates are still "
                             "recorded; call optimizer.flush() first")

    def remap_keys(self, mapping: Dict[KeyT, KeyT]) -> "DistributedOptimizer":
        """Rename keys (as `Optimizer.remap_keys`); call with the same mapping everywhere."""
        self._check_flushed("remap_keys")
        self.optimizer.remap_keys(mapping)
        self._keys.rename(mapping)
        self._plan = None
        self._averages = None
        return self

    def to_gpu(self) -> "DistributedOptimizer":
        self.optimizer.to_gpu()
        self._xp = _cupy()
        self._averages = None
        return self

    def to_cpu(self) -> "DistributedOptimizer":
        self.optimizer.to_cpu()
        self._xp = numpy
        self._averages = None
        return self

    @property
    def pending(self) -> int:
        """How many per-tensor updates wait for the next flush."""
        return len(self._pending)

    def __repr__(self) -> str:
        mode = "sharded" if self.sharded else "replicated"
        where = f"rank {self._group.rank} of {self._group.world_size}" if self._group else \
            "not joined yet"
        return f"<optim.distributed {mode} {self.reduce} over {where} of {self.optimizer!r}>"


# Read or set by Thinc and spaCy (see optim.thinc.FORWARDED): the local optimizer's.
for _name in ("learn_rate", "grad_clip", "b1", "b2", "beta1", "beta2", "eps", "L2",
              "weight_decay", "lookahead_alpha", "lookahead_k", "last_score", "nonfinite",
              "max_consecutive_skips"):
    setattr(DistributedOptimizer, _name, forwarded(_name, True))
for _name in ("use_radam", "use_averages", "L2_is_weight_decay", "mom1", "mom2", "lookahead",
              "nr_update", "schedules", "step", "ops", "groups", "paths"):
    setattr(DistributedOptimizer, _name, forwarded(_name, False))


def _check_lr_scale(lr_scale: Any) -> None:
    if (isinstance(lr_scale, bool) or not isinstance(lr_scale, numbers.Real)
            or not math.isfinite(lr_scale) or lr_scale < 0):
        raise ValueError(f"lr_scale must be a finite number >= 0, got {lr_scale!r}")


def _cupy() -> Any:
    import cupy

    return cupy


# ---------------------------------------------------------------- factories

SGD = distributed_factory(_optimizer.SGD, DistributedOptimizer)
Adam = distributed_factory(_optimizer.Adam, DistributedOptimizer)
RAdam = distributed_factory(_optimizer.RAdam, DistributedOptimizer)

__all__ = ["DistributedOptimizer", "DistributedError", "SGD", "Adam", "RAdam"]
