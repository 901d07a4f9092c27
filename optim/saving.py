"""Saving and loading an Optimizer: its whole state as plain data (`state()`,
`from_state`), the file format's message and bytes (optim/serialize.py), and files
written atomically. A base class of the Optimizer; no arrays are touched here but to
copy them to the host."""
from typing import TYPE_CHECKING, Any, Dict, List

import numpy
import srsly

from . import serialize
from .backends import backend_for
from .settings.defaults import HYPERPARAMETERS

if TYPE_CHECKING:
    from .optimizer import Optimizer


class Saving:
    """`state`, `to_bytes`, `to_disk`, `load`... for the Optimizer (which provides
    `_sync`, `_states`, the settings and `_attach`)."""

    __slots__ = ()


    def state(self) -> serialize.OptimizerState:
        """Everything that determines future updates, as plain data on the host."""
        self._sync()
        hyper = self._hyper
        keys = []
        states = self._states
        for key, shape in states.shapes.items():
            if not states.nr_update.get(key, 0):  # a device key whose first update was
                continue                           # skipped: as on the host, no state
            arrays = {name: None if array is None else
                      numpy.ascontiguousarray(backend_for(array).to_host(array))
                      for name, array in states.arrays(key).items()}
            keys.append(serialize.KeyState(key, shape, int(states.nr_update[key]), arrays))
        return serialize.OptimizerState(
            kind=hyper.kind, ops=self.ops, step=self._step, last_score=self._last_score,
            hyperparameters={name: getattr(hyper, name) for name in HYPERPARAMETERS},
            flags={"L2_is_weight_decay": bool(hyper.L2_is_weight_decay),
                   "use_radam": bool(hyper.use_radam),
                   "use_averages": states.averages is not None,
                   "lookahead_k": int(hyper.lookahead_k)},
            schedules={name: (schedule, self._schedule_start[name])
                       for name, schedule in self.schedules.items()},
            keys=keys,
            groups=self.group_states(),
            nonfinite=self.nonfinite, max_consecutive_skips=self._skip_limit,
            skip_run=self._skip_run, skipped=list(self._skipped.items()),
            paths=list(self._paths.items()))

    def group_states(self) -> List[serialize.GroupState]:
        """The groups as saved (with their schedules' positions)."""
        return [serialize.GroupState(
            name=g.name, match=g.match, learn_rate_scale=g.learn_rate_scale, frozen=g.frozen,
            values={n: getattr(g._hyper, n) for n in g.overrides},
            schedules={n: (sched, g._schedule_start[n]) for n, sched in g.schedules.items()})
            for g in self._groups]

    @classmethod
    def from_state(cls, state: serialize.OptimizerState) -> "Optimizer":
        """A new optimizer (on the host) holding `state` (from `state()` or `decode`)."""
        values = dict(state.hyperparameters)
        flags = state.flags
        groups = []
        for g in state.groups:
            table: Dict[str, Any] = {"name": g.name, "match": g.match, **g.values}
            if g.frozen:
                table["frozen"] = True
            elif g.learn_rate_scale != 1.0:
                table["learn_rate_scale"] = g.learn_rate_scale
            groups.append(table)
        opt = cls(values.pop("learn_rate"), ops=state.ops,
                  use_averages=flags["use_averages"], use_radam=flags["use_radam"],
                  L2_is_weight_decay=flags["L2_is_weight_decay"],
                  lookahead_k=flags["lookahead_k"], groups=groups,
                  nonfinite=state.nonfinite,
                  max_consecutive_skips=state.max_consecutive_skips, **values)
        if opt.kind != state.kind:
            raise serialize.StateError(f"state says {state.kind!r} but its flags describe "
                                       f"{opt.kind!r}")
        for held, saved in [(opt, state.schedules)] + [
                (group, g.schedules) for group, g in zip(opt._groups, state.groups)]:
            held._step, held._last_score = state.step, state.last_score
            for name, (schedule, start) in saved.items():
                if held is not opt and name not in held.overrides:
                    raise serialize.StateError(f"group {held.name!r}: a schedule for "
                                               f"{name!r}, which the group does not set")
                held.schedules[name] = schedule
                held._schedule_start[name] = start
        opt._after_kind(opt.kind)
        opt._skip_run = state.skip_run
        opt._skipped.update(state.skipped)
        opt._paths.update(state.paths)
        needed = {"mom1": opt.kind != "sgd", "mom2": opt.kind != "sgd",
                  "average": opt.averages is not None, "slow": opt.lookahead_k > 0}
        for record in state.keys:
            for name, array in record.arrays.items():
                if array is None and needed[name]:
                    raise serialize.StateError(f"key {record.key!r}: {name} is missing")
            opt._states.commit(record.key, record.shape, record.arrays, record.nr_update)
        return opt

    def to_dict(self) -> Dict[str, Any]:
        """`state()` as the file format's message (msgpack-ready)."""
        return serialize.encode(self.state())

    def to_bytes(self) -> bytes:
        """Everything that determines future updates, as msgpack bytes."""
        return srsly.msgpack_dumps(self.to_dict())

    @classmethod
    def from_dict(cls, msg: Any) -> "Optimizer":
        """A new optimizer from a `to_dict()` message (validated: StateError)."""
        return cls._built(serialize.decode(msg))

    @classmethod
    def load_bytes(cls, data: bytes) -> "Optimizer":
        """A new optimizer from `to_bytes()` (validated: StateError), on the host."""
        return cls._built(serialize.loads(data))

    @classmethod
    def _built(cls, state: serialize.OptimizerState) -> "Optimizer":
        try:
            return cls.from_state(state)
        except serialize.StateError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise serialize.StateError(f"invalid optimizer state: {type(err).__name__}: "
                                       f"{err}") from None

    def from_bytes(self, data: bytes) -> "Optimizer":
        """Replace this optimizer's whole state with `data`'s; returns self."""
        loaded = type(self).load_bytes(data)
        if self._on_gpu:
            loaded.to_gpu()
        if loaded.kind != self.kind:
            raise ValueError(
                f"this state is for a {loaded.kind} optimizer, not {self.kind}; "
                "use optim.load(path) or Optimizer.from_bytes on a matching optimizer"
            )
        for name in self._copied_slots():
            setattr(self, name, getattr(loaded, name))
        self._attach()  # over the new state and settings
        return self

    def to_disk(self, path: Any) -> None:
        """Write `to_bytes()` atomically: a crash mid-write leaves the old file intact."""
        serialize.write_atomic(path, self.to_bytes())

    def from_disk(self, path: Any) -> "Optimizer":
        return self.from_bytes(serialize.read_file(path))

    @classmethod
    def load(cls, path: Any) -> "Optimizer":
        """Build an optimizer from a saved state file, hyperparameters included."""
        return cls.load_bytes(serialize.read_file(path))

