"""Thinc's hyperparameters and their schedules, read at the optimizer's step: the part
of the `Optimizer` that Thinc 8.3 and 9 code talks to (`learn_rate`, `step_schedules()`,
`last_score`, `learn_rate(step=...)` through optim.thinc), with no arrays in it.

Values live in a `_kernels.Hyper` (what the kernels read); a schedule is optim's
`Schedule` (by step), a Thinc 9 callable (by step, and per key if it may depend on the
key) or an iterator (Thinc 8.3: one value per `step_schedules()`). A subclass learns
that the update kind changed (e.g. beta1 scheduled up from 0) through `_after_kind`.
"""
import itertools
import numbers
from typing import Any, Dict, Iterable, Optional, Tuple

from .. import _kernels
from .defaults import HYPERPARAMETERS, KeyT, check_flag, check_value
from ..schedules import (Schedule, depends_on_key, is_step_schedule, read_step_schedule,
                        sequence)


class ScheduledHyperparameters:
    """Hyperparameter values and schedules at a step; the Optimizer's base class."""

    __slots__ = ("schedules", "_hyper", "_schedule_start", "_keyed", "_step", "_last_score")

    def _init_hyperparameters(self) -> None:
        self.schedules: Dict[str, Any] = {}
        self._hyper = _kernels.Hyper()
        self._schedule_start: Dict[str, int] = {}
        self._keyed: Dict[str, Any] = {}  # read per key at each update
        self._step = 0
        self._last_score: Optional[Tuple[int, float]] = None

    def _after_kind(self, previous: str) -> None:
        """Called after a change of hyperparameters; `previous` is the update kind before."""

    def _children(self) -> Iterable["ScheduledHyperparameters"]:
        """Schedules that advance with this one's step and see its last_score (groups)."""
        return ()

    def set_hyperparameter(self, name: str, value: Any, *, absolute: bool = False) -> None:
        """Set hyperparameter `name` (`optimizer.learn_rate = value` does this): a
        number, or a schedule whose value at the current step is taken now (Thinc).
        absolute=True reads a schedule at the optimizer's step rather than from its own
        start (Thinc 9's rule, which optim.thinc's Thinc 9 face follows)."""
        kind = self._hyper.kind
        self._assign(name, value, absolute)
        self._after_kind(kind)

    def _assign(self, name: str, value: Any, absolute: bool = False) -> None:
        if isinstance(value, numbers.Real):
            self.schedules.pop(name, None)
            self._schedule_start.pop(name, None)
            self._keyed.pop(name, None)
            setattr(self._hyper, name, check_value(name, value))
        else:
            self._add_schedule(name, value, start=0, absolute=absolute)

    def _add_schedule(self, name: str, schedule: Any, *, start: int,
                      absolute: bool = False) -> None:
        """Follow `schedule` for `name`. start=0: its first value applies now; start=-1:
        from the next `step_schedules()` on (the `schedules=` argument's behaviour).
        absolute=True, and always for a Thinc 9 style callable: the value at step s is
        the schedule's at s (an iterator skips to it)."""
        if name not in HYPERPARAMETERS:
            raise ValueError(
                f"cannot schedule {name!r}: schedulable are {', '.join(HYPERPARAMETERS)}"
            )
        if isinstance(schedule, (list, tuple)):
            if not schedule:
                raise ValueError(f"invalid schedule for {name!r}: the list is empty")
            schedule = sequence([check_value(name, v) for v in schedule])
        keyed = False
        if isinstance(schedule, Schedule):
            self._schedule_start[name] = (0 if absolute else
                                          schedule._cursor + start - self._step)
        elif is_step_schedule(schedule):  # Thinc 9: schedule(step, key=..., last_score=...)
            self._schedule_start[name] = 0
            keyed = depends_on_key(schedule)
        else:
            if isinstance(schedule, (str, bytes, dict)):
                raise ValueError(f"invalid schedule for {name!r}: expected numbers, got "
                                 f"{type(schedule).__name__}: {schedule!r}")
            try:
                schedule = iter(schedule)
            except TypeError:
                raise ValueError(
                    f"invalid value for {name!r}: expected a number, a list of numbers, an "
                    f"iterator or a schedule, got {type(schedule).__name__}"
                ) from None
            self._schedule_start[name] = start
            try:
                first = check_value(name, next(schedule))
            except StopIteration:
                raise ValueError(f"invalid schedule for {name!r}: it yields no values") from None
            if absolute:  # Thinc 9 reads item `step` (the last one once they run out)
                for value in itertools.islice(schedule, self._step):
                    first = check_value(name, value)
            if start == 0:
                setattr(self._hyper, name, first)
            else:  # checked now, used at the next step_schedules()
                schedule = itertools.chain([first], schedule)
        self.schedules[name] = schedule
        self._keyed.pop(name, None)
        if keyed:
            self._keyed[name] = schedule
        elif _indexed(schedule):
            self._evaluate_schedules((name,))

    def _evaluate_schedules(self, names: Iterable[str]) -> None:
        """Set each named hyperparameter to its schedule's value at the current step
        (schedules read per key are left to the updates)."""
        for name in names:
            schedule = self.schedules[name]
            if name in self._keyed or not _indexed(schedule):
                continue
            index = self._step + self._schedule_start[name]
            if index >= 0:
                value = _read(schedule, index, last_score=self._last_score)
                setattr(self._hyper, name, check_value(name, value))

    def _apply_keyed(self, key: KeyT) -> None:
        """Set the hyperparameters read per key to their values for `key` (Thinc 9's
        `schedule(step, key=key, last_score=last_score)`, once per update)."""
        kind = self._hyper.kind
        step, last_score = self._step, self._last_score
        for name, schedule in self._keyed.items():
            value = read_step_schedule(schedule, step, key=key, last_score=last_score)
            setattr(self._hyper, name, check_value(name, value))
        self._after_kind(kind)

    def step_schedules(self) -> None:
        """Advance the step: every scheduled hyperparameter takes its next value."""
        for child in self._children():
            child.step_schedules()
        kind = self._hyper.kind
        self._step += 1
        for name, schedule in self.schedules.items():
            if not _indexed(schedule):
                try:
                    value = next(schedule)
                except StopIteration:  # exhausted: keep the last value, as Thinc does
                    continue
                setattr(self._hyper, name, check_value(name, value))
        self._evaluate_schedules(self.schedules)
        self._after_kind(kind)

    def hyperparameter(self, name: str, step: Optional[int] = None, **extra: Any) -> float:
        """The value `name` takes at `step` (default: the current one), as Thinc 9's
        `optimizer.learn_rate(step=step, **extra)`: a schedule is called with `extra`
        (key, last_score); an iterator can only be read at the current step."""
        if name not in HYPERPARAMETERS:
            raise ValueError(f"unknown hyperparameter {name!r}: known are "
                             f"{', '.join(HYPERPARAMETERS)}")
        if step is None:
            step = self._step
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        schedule = self.schedules.get(name)
        if schedule is None:
            return getattr(self._hyper, name)
        if not _indexed(schedule):
            if step != self._step:
                raise ValueError(f"{name} follows an iterator: it can only be read at the "
                                 f"current step {self._step}, not at step {step}")
            return getattr(self._hyper, name)
        index = step + self._schedule_start[name]
        if index < 0:  # a `schedules=` entry before the first step_schedules()
            return getattr(self._hyper, name)
        return check_value(name, _read(schedule, index, **extra))

    @property
    def step(self) -> int:
        """How many times `step_schedules()` has been called."""
        return self._step

    @property
    def last_score(self) -> Optional[Tuple[int, float]]:
        """(step, score) of the last evaluation, as Thinc 9 keeps it."""
        return self._last_score

    @last_score.setter
    def last_score(self, score: float) -> None:
        for child in self._children():
            child.last_score = score
        kind = self._hyper.kind
        self._last_score = (self._step, float(score))
        self._evaluate_schedules(self.schedules)
        self._after_kind(kind)

    def _hyper_get(name: str):  # noqa: N805 - builds properties below
        def get(self: "ScheduledHyperparameters") -> "Hyperparameter":
            keyed = self._keyed.get(name)
            if keyed is not None:  # no key here: the schedule's own default
                value = check_value(name, read_step_schedule(keyed, self._step,
                                                             last_score=self._last_score))
            else:
                value = getattr(self._hyper, name)
            return Hyperparameter(value, self, name)

        def set(self: "ScheduledHyperparameters", value: Any) -> None:
            if isinstance(value, Hyperparameter):
                if value.owner is self and value.name == name:
                    return  # optimizer.learn_rate = optimizer.learn_rate: no change
                value = float(value)  # another's value: the number it reads as
            self.set_hyperparameter(name, value)

        return property(get, set, doc=f"The current {name}: a number that is also its "
                                      f"schedule, {name}(step=..., key=...); set a number "
                                      "or a schedule.")

    learn_rate = _hyper_get("learn_rate")
    beta1 = b1 = _hyper_get("beta1")
    beta2 = b2 = _hyper_get("beta2")
    eps = _hyper_get("eps")
    L2 = _hyper_get("L2")
    grad_clip = _hyper_get("grad_clip")
    weight_decay = _hyper_get("weight_decay")
    lookahead_alpha = _hyper_get("lookahead_alpha")
    del _hyper_get

    def _flag(name: str, doc: str):  # noqa: N805 - builds properties below
        def get(self: "ScheduledHyperparameters") -> bool:
            return bool(getattr(self._hyper, name))

        def set(self: "ScheduledHyperparameters", value: Any) -> None:
            kind = self._hyper.kind
            setattr(self._hyper, name, check_flag(name, value))
            self._after_kind(kind)

        return property(get, set, doc=doc)

    use_radam = _flag("use_radam", "Whether updates are RAdam's (set it: the next update "
                                   "follows, as in Thinc).")
    L2_is_weight_decay = _flag("L2_is_weight_decay", "Whether L2 is decoupled weight "
                                                     "decay (True) or added to the gradient.")
    del _flag

    @property
    def kind(self) -> str:
        """The update the hyperparameters describe: "sgd", "adam" or "radam"."""
        return self._hyper.kind


class Hyperparameter(float):
    """A hyperparameter's current value that is also its schedule: a float for Thinc 8.3
    code (`optimizer.learn_rate * 2`) and callable for Thinc 9 code
    (`optimizer.learn_rate(step=..., key=..., last_score=...)`, which reads the
    optimizer's schedule at that step). Pickles and copies as a plain float."""

    __slots__ = ("owner", "name")

    def __new__(cls, value: float, owner: ScheduledHyperparameters,
                name: str) -> "Hyperparameter":
        self = float.__new__(cls, value)
        self.owner = owner
        self.name = name
        return self

    def __call__(self, step: Optional[int] = None, **extra: Any) -> float:
        return self.owner.hyperparameter(self.name, step, **extra)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (float, (float(self),))


def _read(schedule: Any, step: int, **extra: Any) -> float:
    """An indexed schedule's value at `step` (optim's, or a Thinc 9 style callable)."""
    if isinstance(schedule, Schedule):
        return schedule(step, **extra)
    return read_step_schedule(schedule, step, **extra)


def _indexed(schedule: Any) -> bool:
    """A schedule read by step (optim's or a callable), not an iterator."""
    return isinstance(schedule, Schedule) or is_step_schedule(schedule)
