"""Hyperparameter schedules: step-indexed, iterable, and serializable.

A `Schedule` is a value of a step: `schedule(step)`. It is also an iterator
(`next(schedule)` gives steps 0, 1, 2, ...) so it works wherever Thinc 8.3 expects a
generator, and once Thinc 9 is imported it passes `isinstance(x, thinc.api.Schedule)`, so
Thinc 9's own optimizers take it too. Its name and arguments are enough to rebuild it, so
an optimizer that holds one can be saved and resumed exactly. Values follow Thinc 8.3's
generators; `plateau` follows Thinc 9. `from_thinc` maps Thinc 9's registered schedules
onto these (without importing Thinc).
"""
import inspect
import itertools
import sys
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy

from . import _kernels
from .registry import registry

ScoreT = Optional[Tuple[int, float]]


class Schedule:
    """A hyperparameter as a function of the training step."""

    __slots__ = ("name", "func", "attrs", "state", "_cursor")

    def __init__(self, name: str, func: Callable, attrs: Dict[str, Any],
                 state: Optional[Dict[str, Any]] = None) -> None:
        self.name = name  # the registry name that rebuilds it from attrs, e.g. "decaying.v1"
        self.func = func
        self.attrs = attrs
        self.state = state  # mutable state (plateau); saved with the optimizer
        self._cursor = 0

    def __call__(self, step: int, *, last_score: ScoreT = None, **extra: Any) -> float:
        """The value at `step`; `extra` (Thinc 9 passes `key`) is accepted and unused."""
        if step < 0:
            raise ValueError(f"schedule {self.name}: step must be >= 0, got {step}")
        return self.func(self, step, last_score=last_score)

    @property
    def __class__(self) -> type:  # type: ignore[override]
        """Thinc 9's `Schedule` once Thinc 9 is imported, else the real class.

        Thinc 9's Optimizer and config validation accept only `isinstance(x,
        thinc.api.Schedule)`; isinstance consults `__class__` when the real type does not
        match, so optim's schedules pass without optim importing Thinc. `type(x)` and
        isinstance checks against optim's classes are unaffected.
        """
        thinc_schedules = sys.modules.get("thinc.schedules")
        thinc_class = getattr(thinc_schedules, "Schedule", None)
        return thinc_class if isinstance(thinc_class, type) else type(self)

    def __reduce__(self) -> Tuple[Any, ...]:
        # By the real class: pickle compares __newobj__'s class with __class__.
        state = {name: getattr(self, name) for name in Schedule.__slots__}
        return (_blank, (type(self),), (None, state))

    def to_generator(self, start: int = 0, step_size: int = 1, **extra: Any) -> Iterator[float]:
        """Values at start, start + step_size, ... (Thinc 9's `Schedule.to_generator`)."""
        if start < 0 or step_size < 0:
            raise ValueError(f"schedule {self.name}: start and step_size must be >= 0, "
                             f"got {start} and {step_size}")
        return (self(step, **extra) for step in itertools.count(start, step_size))

    def __iter__(self) -> "Schedule":
        return self

    def __next__(self) -> float:
        value = self(self._cursor)
        self._cursor += 1
        return value

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        return f"<Schedule {self.name}({args})>"

    def to_dict(self) -> Dict[str, Any]:
        """Name, arguments (nested schedules included), state and iterator position."""
        attrs = {k: v.to_dict() if isinstance(v, Schedule) else v for k, v in self.attrs.items()}
        return {"name": self.name, "attrs": attrs, "state": self.state, "cursor": self._cursor}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Schedule":
        """Rebuild a schedule saved by `to_dict` through the registry."""
        try:
            name, attrs = data["name"], data["attrs"]
            factory = registry.schedules.get(name)
        except (KeyError, TypeError, LookupError) as err:
            raise ValueError(f"cannot rebuild schedule from {data!r}: {err}") from None
        attrs = {k: cls.from_dict(v) if isinstance(v, dict) and "name" in v else v
                 for k, v in attrs.items()}
        try:
            schedule = factory(**attrs)
        except TypeError as err:
            raise ValueError(f"cannot rebuild schedule {name}: {err}") from None
        if data.get("state") is not None:
            schedule.state = dict(data["state"])
        schedule._cursor = int(data.get("cursor", 0))
        return schedule


def power(x: float, n: int) -> float:
    """x**n for a whole n, by squaring in double (`optim._kernels.power`, the kernels'
    own): the same bits under any libm. A negative n gives 1 / x**-n."""
    if n < 0:
        return 1.0 / _kernels.power(x, -n)
    return _kernels.power(x, n)


def _blank(cls: type) -> Schedule:
    return cls.__new__(cls)


def _inner(schedule: Schedule, step: int, last_score: ScoreT) -> float:
    return schedule.attrs["schedule"](step, last_score=last_score)


def _clip(value: float, start: float, stop: float) -> float:
    return max(value, stop) if start > stop else min(value, stop)


@registry.schedules("constant.v1")
def constant(rate: float) -> Schedule:
    """The same value at every step."""
    return Schedule("constant.v1", _constant, {"rate": rate})


def _constant(s: Schedule, step: int, last_score: ScoreT) -> float:
    return s.attrs["rate"]


@registry.schedules("constant_then.v1")
def constant_then(rate: float, steps: int, schedule: Schedule, *,
                  restart: bool = True) -> Schedule:
    """`rate` for `steps` steps, then `schedule`: from its own step 0 (restart=True, as
    Thinc 8.3's generator), or at the same step (restart=False, as Thinc 9)."""
    if not isinstance(restart, bool):
        raise TypeError(f"constant_then: restart must be True or False, got {restart!r}")
    attrs = {"rate": rate, "steps": steps, "schedule": _as_schedule(schedule)}
    if not restart:  # only then: files of 8.3-style schedules stay as older optims wrote them
        attrs["restart"] = False
    return Schedule("constant_then.v1", _constant_then, attrs)


def _constant_then(s: Schedule, step: int, last_score: ScoreT) -> float:
    steps = s.attrs["steps"]
    if step < steps:
        return s.attrs["rate"]
    return _inner(s, step - steps if s.attrs.get("restart", True) else step, last_score)


@registry.schedules("decaying.v1")
def decaying(base_rate: float, decay: float, *, t: float = 0.0) -> Schedule:
    """base_rate * 1 / (1 + decay * (t + step))."""
    return Schedule("decaying.v1", _decaying, {"base_rate": base_rate, "decay": decay, "t": t})


def _decaying(s: Schedule, step: int, last_score: ScoreT) -> float:
    a = s.attrs
    return a["base_rate"] * (1.0 / (1.0 + a["decay"] * (a["t"] + step)))


@registry.schedules("compounding.v1")
def compounding(start: float, stop: float, compound: float, *, t: float = 0.0) -> Schedule:
    """start * compound**(t + step), clipped at stop. The power is taken by squaring
    (`power`), so `t` must be a whole number."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t).is_integer():
        raise ValueError(f"compounding: t must be a whole number (the power is taken by "
                         f"squaring, the same bits on every machine), got {t!r}")
    return Schedule("compounding.v1", _compounding,
                    {"start": start, "stop": stop, "compound": compound, "t": t})


def _compounding(s: Schedule, step: int, last_score: ScoreT) -> float:
    a = s.attrs
    return _clip(float(a["start"]) * power(a["compound"], int(a["t"]) + step),
                 a["start"], a["stop"])


@registry.schedules("warmup_linear.v1")
def warmup_linear(initial_rate: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warm-up from 0 over warmup_steps, then linear decay to 0 at total_steps."""
    return Schedule("warmup_linear.v1", _warmup_linear,
                    {"initial_rate": initial_rate, "warmup_steps": warmup_steps,
                     "total_steps": total_steps})


def _warmup_linear(s: Schedule, step: int, last_score: ScoreT) -> float:
    a = s.attrs
    warmup, total = a["warmup_steps"], a["total_steps"]
    if step < warmup:
        factor = step / max(1, warmup)
    else:
        factor = max(0.0, (total - step) / max(1.0, total - warmup))
    return factor * a["initial_rate"]


@registry.schedules("slanted_triangular.v1")
def slanted_triangular(max_rate: float, num_steps: Optional[int] = None, *,
                       cut_frac: float = 0.1, ratio: int = 32, decay: float = 1.0,
                       t: float = 0.0, cut: Optional[int] = None) -> Schedule:
    """Howard and Ruder's slanted triangular rate (`decay` is accepted and unused, as in Thinc).

    The peak is at step `cut` = int(num_steps * cut_frac); Thinc 9 keeps `cut` instead
    of num_steps, so either may be given (both: they must agree).
    """
    attrs = {"max_rate": max_rate, "num_steps": num_steps, "cut_frac": cut_frac,
             "ratio": ratio, "decay": decay, "t": t}
    if num_steps is None:
        if cut is None:
            raise TypeError("slanted_triangular: give num_steps (or cut)")
        attrs["cut"] = cut
    elif cut is not None and int(num_steps * cut_frac) != cut:
        raise ValueError(f"slanted_triangular: cut={cut!r} but int(num_steps * cut_frac) = "
                         f"{int(num_steps * cut_frac)}")
    return Schedule("slanted_triangular.v1", _slanted_triangular, attrs)


def _slanted_triangular(s: Schedule, step: int, last_score: ScoreT) -> float:
    a = s.attrs
    cut_frac, ratio = a["cut_frac"], a["ratio"]
    cut = a["cut"] if "cut" in a else int(a["num_steps"] * cut_frac)
    t = a["t"] + step + 1
    if t < cut:
        p = t / cut
    else:
        p = 1 - ((t - cut) / (cut * (1 / cut_frac - 1)))
    return a["max_rate"] * (1 + p * (ratio - 1)) * (1 / ratio)


@registry.schedules("cyclic_triangular.v1")
def cyclic_triangular(min_lr: float, max_lr: float, period: int) -> Schedule:
    """A triangle wave between min_lr and max_lr with the given half period."""
    return Schedule("cyclic_triangular.v1", _cyclic_triangular,
                    {"min_lr": min_lr, "max_lr": max_lr, "period": period})


def _cyclic_triangular(s: Schedule, step: int, last_score: ScoreT) -> float:
    a = s.attrs
    it, period = step + 1, a["period"]
    cycle = numpy.floor(1 + it / (2 * period))
    x = numpy.abs(it / period - 2 * cycle + 1)
    relative = max(0, 1 - x)
    return float(a["min_lr"] + (a["max_lr"] - a["min_lr"]) * relative)


@registry.schedules("plateau.v1")
def plateau(max_patience: int, scale: float, schedule: Schedule) -> Schedule:
    """`schedule` scaled by scale**n_plateaus; a plateau is max_patience scores without a new best.

    Scores arrive through the optimizer's `last_score` as (step, score), as in Thinc 9.
    """
    state = {"best_score": None, "last_score_step": None, "patience": 0, "n_plateaus": 0}
    return Schedule("plateau.v1", _plateau,
                    {"max_patience": max_patience, "scale": scale,
                     "schedule": _as_schedule(schedule)}, state)


def _plateau(s: Schedule, step: int, last_score: ScoreT) -> float:
    state = s.state
    if last_score is not None:
        score_step, score = last_score
        if state["best_score"] is None or state["last_score_step"] is None or score > state["best_score"]:
            state["best_score"] = score
            state["patience"] = 0
        elif score_step < state["last_score_step"]:
            raise ValueError(
                f"plateau: expected a score with step >= {state['last_score_step']}, got {score_step}"
            )
        elif score_step > state["last_score_step"]:
            state["patience"] += 1
            if state["patience"] == s.attrs["max_patience"]:
                state["n_plateaus"] += 1
                state["patience"] = 0
        state["last_score_step"] = score_step
    return power(s.attrs["scale"], state["n_plateaus"]) * _inner(s, step, last_score)


@registry.schedules("sequence.v1")
def sequence(values: Sequence[float]) -> Schedule:
    """The given values in order; the last one holds once they run out."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("sequence: at least one value is needed")
    return Schedule("sequence.v1", _sequence, {"values": values})


def _sequence(s: Schedule, step: int, last_score: ScoreT) -> float:
    values = s.attrs["values"]
    return values[min(step, len(values) - 1)]


def _as_schedule(value: Any) -> Schedule:
    """Schedules pass through; lists and tuples become `sequence` schedules."""
    if isinstance(value, (list, tuple)):
        return sequence(value)
    if isinstance(value, Schedule):
        return value
    raise TypeError(
        f"expected an optim schedule or a list of numbers, got {type(value).__name__}: "
        "a generator cannot be indexed by step or saved"
    )


# ---------------------------------------------------------------- Thinc 9's schedules

def is_step_schedule(value: Any) -> bool:
    """A Thinc 9 style schedule: callable as `value(step, **extra)`, not an iterator."""
    return (callable(value) and not isinstance(value, (Schedule, type))
            and not hasattr(type(value), "__next__") and not hasattr(type(value), "__iter__"))


def _thinc_function(schedule: Any) -> Optional[str]:
    """The name of a Thinc 9 schedule's function if it is one of `thinc.schedules`'."""
    func = getattr(schedule, "_schedule", None)
    if type(schedule).__module__ != "thinc.schedules" or getattr(func, "__module__", None) \
            != "thinc.schedules":
        return None
    return getattr(func, "__qualname__", None)


def _plateau_from_thinc(a: Dict[str, Any]) -> Schedule:
    schedule = plateau(a["max_patience"], a["scale"], from_thinc(a["schedule"]))
    state = a["state"]
    schedule.state = {name: getattr(state, name) for name in schedule.state}
    return schedule


# Thinc 9.1's schedule functions (thinc/schedules.py) -> optim's equivalent, same floats.
_FROM_THINC: Dict[str, Callable[[Dict[str, Any]], Schedule]] = {
    "_constant_schedule": lambda a: constant(a["rate"]),
    "_constant_then_schedule": lambda a: constant_then(
        a["rate"], a["steps"], from_thinc(a["schedule"]), restart=False),
    "_decaying_schedule": lambda a: decaying(a["base_rate"], a["decay"], t=a["t"]),
    "_compounding_schedule": lambda a: compounding(a["start"], a["stop"], a["compound"],
                                                   t=a["t"]),
    "_warmup_linear_schedule": lambda a: warmup_linear(
        a["initial_rate"], a["warmup_steps"], a["total_steps"]),
    "_slanted_triangular_schedule": lambda a: slanted_triangular(
        a["max_rate"], cut=a["cut"], cut_frac=a["cut_frac"], ratio=a["ratio"], t=a["t"]),
    "_cyclic_triangular_schedule": lambda a: cyclic_triangular(
        a["min_lr"], a["max_lr"], a["period"]),
    "_plateau_schedule": _plateau_from_thinc,
}


def from_thinc(schedule: Any) -> Schedule:
    """optim's equivalent of a Thinc 9 registered schedule (nested ones and plateau's
    state included): the same value at every step. optim schedules pass through.

    Raises ValueError naming the (possibly nested) schedule that has no equivalent.
    """
    if isinstance(schedule, Schedule):
        return schedule
    function = _thinc_function(schedule)
    convert = _FROM_THINC.get(function or "")
    if convert is None:
        name = getattr(schedule, "name", None)
        func = getattr(schedule, "_schedule", schedule)
        where = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
        raise ValueError(
            f"schedule {name or type(schedule).__name__!r} ({where}) has no optim "
            "equivalent: optim can save its own schedules and Thinc 9's registered ones "
            f"({', '.join(sorted(f[1:-9] for f in _FROM_THINC))})"
        )
    return convert(schedule.attrs)


_KEYWORDS: "weakref.WeakKeyDictionary[Any, Tuple[Optional[frozenset], bool]]" = \
    weakref.WeakKeyDictionary()


def _keywords(schedule: Any) -> Tuple[Optional[frozenset], bool]:
    """(the keywords a step schedule takes, None for any; whether `key` is required)."""
    try:
        return _KEYWORDS[schedule]
    except (KeyError, TypeError):
        pass
    try:
        params = inspect.signature(schedule).parameters.values()
    except (TypeError, ValueError):  # no signature to read: give it everything
        found: Tuple[Optional[frozenset], bool] = (None, False)
    else:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        named = frozenset(p.name for p in params if p.kind in kinds)
        key_required = any(p.name == "key" and p.default is inspect.Parameter.empty
                           for p in params if p.kind in kinds)
        found = (None if takes_any else named, key_required)
    try:
        _KEYWORDS[schedule] = found
    except TypeError:  # not weakly referable: read again next time
        pass
    return found


def read_step_schedule(schedule: Any, step: int, **extra: Any) -> float:
    """A Thinc 9 style schedule's value: `schedule(step=step, **extra)`, passing only the
    keywords it takes (Thinc 9 code writes `lambda *, step, key: ...`), and key=None
    where it requires a key that the reader has not got."""
    names, key_required = _keywords(schedule)
    if names is not None:
        extra = {k: v for k, v in extra.items() if k in names}
    if key_required and "key" not in extra:
        extra["key"] = None
    return schedule(step=step, **extra)


def depends_on_key(schedule: Any) -> bool:
    """Whether `schedule` may give different values per parameter key: True unless it is
    an optim schedule or built only from Thinc 9's registered schedules."""
    try:
        from_thinc(schedule)
    except (ValueError, KeyError, TypeError, AttributeError):
        return True
    return False


__all__ = ["Schedule", "constant", "constant_then", "decaying", "compounding",
           "warmup_linear", "slanted_triangular", "cyclic_triangular", "plateau", "sequence",
           "from_thinc", "is_step_schedule", "depends_on_key", "read_step_schedule"]
