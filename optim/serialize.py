"""Optimizer state as srsly msgpack: versioned, validated on load, written atomically.

This module is the file format only: `Optimizer.state()` gives an `OptimizerState` (plain
data), `encode` makes it a message, `decode` validates a message back into one, and
`Optimizer.from_state` builds the optimizer. It does not import the optimizer.

No pickle anywhere: arrays travel as srsly's msgpack-numpy records (raw bytes, dtype and
shape), keys as tagged lists, schedules as registry names with their arguments (a Thinc 9
schedule as optim's equivalent: `optim.schedules.from_thinc`).
"""
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy
import srsly

from .settings.defaults import HYPERPARAMETERS, check_value
from .schedules import Schedule, from_thinc, is_step_schedule
from .state import ARRAYS

FORMAT_NAME = "optim.Optimizer"
FORMAT_VERSION = 2  # 2: groups, nonfinite, skip counts, paths (version 1 still reads)
NONFINITE_MODES = ("apply", "skip", "raise")
STATE_ARRAYS = ARRAYS  # a key's state arrays (optim/state.py), by their names in the file
FLOAT_DTYPES = ("float32", "float64")


class StateError(ValueError):
    """A state file or payload that cannot be loaded."""


# ------------------------------------------------------------------ keys

def encode_key(key: Any) -> Any:
    """Thinc's (int, str) keys and other hashables of int/str/float/bool/None/tuple."""
    if isinstance(key, tuple):
        return ["tuple", [encode_key(k) for k in key]]
    if key is None or isinstance(key, (bool, int, float, str)):
        return ["atom", key]
    raise ValueError(f"cannot save key {key!r}: keys must be built from tuples, int, str, "
                     "float, bool or None")


def decode_key(data: Any) -> Any:
    tag, value = _expect(data, list, "key")
    if tag == "tuple":
        return tuple(decode_key(item) for item in _expect(value, list, "key"))
    if tag == "atom" and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    raise StateError(f"invalid key record {data!r}")


# ------------------------------------------------------------------ the state, as data

@dataclass
class KeyState:
    """One key's saved state: its shape, update count and host arrays (None: absent)."""

    key: Any
    shape: Tuple[int, ...]
    nr_update: int
    arrays: Dict[str, Optional[numpy.ndarray]]  # STATE_ARRAYS -> array or None


@dataclass
class OptimizerState:
    """Everything that determines an optimizer's future updates, as plain data: what
    `Optimizer.state()` gives and `Optimizer.from_state` takes; `encode`/`decode` turn
    it into the file format and back."""

    kind: str
    hyperparameters: Dict[str, float]
    flags: Dict[str, Any]  # L2_is_weight_decay, use_radam, use_averages, lookahead_k
    ops: Optional[str]
    step: int
    last_score: Optional[Tuple[int, float]]
    schedules: Dict[str, Tuple[Any, int]]  # name -> (schedule, start)
    keys: List[KeyState]
    groups: List["GroupState"] = field(default_factory=list)
    nonfinite: str = "apply"
    max_consecutive_skips: Optional[int] = None
    skip_run: int = 0  # consecutive steps that skipped an update, so far
    skipped: List[Tuple[Any, int]] = field(default_factory=list)  # (key, updates skipped)
    paths: List[Tuple[Any, str]] = field(default_factory=list)  # (key, bound path)


@dataclass
class GroupState:
    """One per-parameter group: as written (name, match, learn_rate_scale, frozen, the
    hyperparameters it sets) with its own schedules' positions."""

    name: str
    match: str
    learn_rate_scale: float
    frozen: bool
    values: Dict[str, float]  # each hyperparameter the group sets: its current value
    schedules: Dict[str, Tuple[Any, int]]  # name -> (schedule, start)


def encode(state: OptimizerState) -> Dict[str, Any]:
    """The msgpack-ready message of `state` (a Thinc 9 schedule saved as optim's)."""
    keys = []
    for record in state.keys:
        entry: Dict[str, Any] = {"key": encode_key(record.key), "shape": list(record.shape),
                                 "nr_update": int(record.nr_update)}
        entry.update(record.arrays)
        keys.append(entry)
    groups = encode_groups(state.groups)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": state.kind,
        "hyperparameters": dict(state.hyperparameters),
        "flags": dict(state.flags),
        "ops": state.ops,
        "step": state.step,
        "last_score": None if state.last_score is None else list(state.last_score),
        "schedules": _encode_schedules(state.schedules, ""),
        "keys": keys,
        "groups": groups,
        "nonfinite": state.nonfinite,
        "max_consecutive_skips": state.max_consecutive_skips,
        "skip_run": state.skip_run,
        "skipped": [[encode_key(k), int(n)] for k, n in state.skipped],
        "paths": [[encode_key(k), str(p)] for k, p in state.paths],
    }


def encode_groups(groups: List[GroupState]) -> List[Dict[str, Any]]:
    """The groups' part of the message."""
    return [{"name": g.name, "match": g.match, "learn_rate_scale": g.learn_rate_scale,
             "frozen": g.frozen, "values": dict(g.values),
             "schedules": _encode_schedules(g.schedules, f"group {g.name!r}: ")}
            for g in groups]


def _encode_schedules(held: Dict[str, Tuple[Any, int]], where: str) -> Dict[str, Any]:
    schedules = {}
    for name, (schedule, start) in held.items():
        if is_step_schedule(schedule):  # a Thinc 9 schedule: saved as optim's equivalent
            try:
                schedule = from_thinc(schedule)
            except ValueError as err:
                raise ValueError(f"{where}cannot save the schedule of {name!r}: {err}") from None
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"{where}cannot save the schedule of {name!r}: it is a {type(schedule).__name__}, "
                "whose position cannot be restored. Use a registered schedule (for example "
                "optim.decaying(...) or a @schedules block in the config) or a list of values."
            )
        schedules[name] = {"schedule": schedule.to_dict(), "start": start}
    return schedules


def decode(msg: Any) -> OptimizerState:
    """Validate a message (format, version, types, every array) into an OptimizerState;
    StateError naming the problem."""
    try:
        return _decode(msg)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
        raise StateError(f"invalid optimizer state: {type(err).__name__}: {err}") from None


def loads(data: bytes) -> OptimizerState:
    """`decode` of msgpack bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"optimizer state must be bytes, got {type(data).__name__}")
    try:
        msg = srsly.msgpack_loads(bytes(data))
    except Exception as err:  # msgpack raises many types on corrupt input
        raise StateError(f"optimizer state is not valid msgpack ({type(err).__name__}: {err})") from None
    return decode(msg)


def _decode(msg: Any) -> OptimizerState:
    msg = _expect(msg, dict, "state")
    if msg.get("format") != FORMAT_NAME:
        raise StateError(f"not an optim optimizer state (format {msg.get('format')!r})")
    version = msg.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise StateError(f"optimizer state version {version!r} is not supported by this optim "
                         f"(reads up to version {FORMAT_VERSION}); upgrade optim")
    hyper = _expect(msg["hyperparameters"], dict, "hyperparameters")
    flags = _expect(msg["flags"], dict, "flags")
    for name in ("use_averages", "use_radam", "L2_is_weight_decay"):
        _expect(flags[name], bool, name)
    last_score = None
    if msg["last_score"] is not None:
        score_step, score = _expect(msg["last_score"], list, "last_score")
        last_score = (_count(score_step, "last_score step"), float(score))
    schedules = _decode_schedules(msg["schedules"])
    keys, seen = [], set()
    for record in _expect(msg["keys"], list, "keys"):
        state = _decode_key(_expect(record, dict, "key record"))
        if state.key in seen:
            raise StateError(f"key {state.key!r} appears twice")
        seen.add(state.key)
        keys.append(state)
    state = OptimizerState(
        kind=msg["kind"], ops=msg["ops"], step=_count(msg["step"], "step"),
        hyperparameters={name: check_value(name, hyper[name]) for name in HYPERPARAMETERS},
        flags={"L2_is_weight_decay": flags["L2_is_weight_decay"],
               "use_radam": flags["use_radam"], "use_averages": flags["use_averages"],
               "lookahead_k": flags["lookahead_k"]},
        last_score=last_score, schedules=schedules, keys=keys)
    if version >= 2:
        for record in _expect(msg["groups"], list, "groups"):
            record = _expect(record, dict, "group")
            values = _expect(record["values"], dict, "group values")
            state.groups.append(GroupState(
                name=_expect(record["name"], str, "group name"),
                match=_expect(record["match"], str, "group match"),
                learn_rate_scale=float(record["learn_rate_scale"]),
                frozen=_expect(record["frozen"], bool, "group frozen"),
                values={name: check_value(name, v) for name, v in values.items()},
                schedules=_decode_schedules(record["schedules"])))
        if msg["nonfinite"] not in NONFINITE_MODES:
            raise StateError(f"invalid nonfinite {msg['nonfinite']!r}")
        state.nonfinite = msg["nonfinite"]
        limit = msg["max_consecutive_skips"]
        state.max_consecutive_skips = None if limit is None else _count(limit, "skip limit")
        state.skip_run = _count(msg["skip_run"], "skip_run")
        state.skipped = [(decode_key(k), _count(n, "skip count"))
                         for k, n in _expect(msg["skipped"], list, "skipped")]
        state.paths = [(decode_key(k), _expect(p, str, "path"))
                       for k, p in _expect(msg["paths"], list, "paths")]
    return state


def _decode_schedules(msg: Any) -> Dict[str, Tuple[Any, int]]:
    schedules = {}
    for name, record in _expect(msg, dict, "schedules").items():
        record = _expect(record, dict, "schedule")
        start = record["start"]
        if not isinstance(start, int) or isinstance(start, bool):
            raise StateError(f"schedule {name!r}: invalid start {start!r}")
        schedule = Schedule.from_dict(_expect(record["schedule"], dict, "schedule"))
        if name not in HYPERPARAMETERS:
            raise StateError(f"cannot schedule {name!r}")
        schedules[name] = (schedule, start)
    return schedules


def _decode_key(record: Dict[str, Any]) -> KeyState:
    key = decode_key(record["key"])
    shape = tuple(_count(d, "dimension") for d in _expect(record["shape"], list, "shape"))
    size = math.prod(shape)
    arrays: Dict[str, Optional[numpy.ndarray]] = {}
    dtype = None
    for name in STATE_ARRAYS:
        array = record[name]
        if array is None:
            arrays[name] = None
            continue
        if not isinstance(array, numpy.ndarray):
            raise StateError(f"key {key!r}: {name} is not an array")
        if array.dtype.name not in FLOAT_DTYPES or not array.dtype.isnative:
            raise StateError(f"key {key!r}: {name} has dtype {array.dtype.str}")
        if array.shape != shape or array.size != size:
            raise StateError(f"key {key!r}: {name} has shape {array.shape}, declared {shape}")
        if dtype is not None and array.dtype != dtype:
            raise StateError(f"key {key!r}: state arrays disagree on dtype")
        dtype = array.dtype
        arrays[name] = numpy.array(array, copy=True)  # msgpack's arrays are read-only
    return KeyState(key, shape, _count(record["nr_update"], "nr_update"), arrays)


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise StateError(f"invalid {what}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"invalid {what}: {value!r}")
    return value


# ------------------------------------------------------------------ files

def write_atomic(path: Any, data: Union[bytes, Iterable[bytes]]) -> None:
    """Write `data` (bytes, or byte strings written one after another: no joined copy)
    to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give what open() would: 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            for piece in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def read_file(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


__all__ = ["StateError", "OptimizerState", "KeyState", "GroupState", "encode", "decode", "loads",
           "write_atomic", "read_file", "encode_key", "decode_key"]
