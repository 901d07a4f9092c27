"""Optimizer state as srsly msgpack: versioned, validated on load, written atomically.

No pickle anywhere: arrays travel as srsly's msgpack-numpy records (raw bytes, dtype and
shape), keys as tagged lists, schedules as registry names with their arguments (a Thinc 9
schedule as optim's equivalent: `optim.schedules.from_thinc`).
"""
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy
import srsly

from .backends import backend_for
from .optimizer import HYPERPARAMETERS
from .schedules import Schedule, from_thinc, is_step_schedule

FORMAT_NAME = "optim.Optimizer"
FORMAT_VERSION = 1
STATE_ARRAYS = ("mom1", "mom2", "average", "slow")
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


# ------------------------------------------------------------------ to bytes

def optimizer_to_dict(opt: Any) -> Dict[str, Any]:
    hyper = opt._hyper
    schedules = {}
    for name, schedule in opt.schedules.items():
        if is_step_schedule(schedule):  # a Thinc 9 schedule: saved as optim's equivalent
            try:
                schedule = from_thinc(schedule)
            except ValueError as err:
                raise ValueError(f"cannot save the schedule of {name!r}: {err}") from None
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"cannot save the schedule of {name!r}: it is a {type(schedule).__name__}, "
                "whose position cannot be restored. Use a registered schedule (for example "
                "optim.decaying(...) or a @schedules block in the config) or a list of values."
            )
        schedules[name] = {"schedule": schedule.to_dict(), "start": opt._schedule_start[name]}
    keys = []
    for key, shape in opt._shapes.items():
        record: Dict[str, Any] = {"key": encode_key(key), "shape": list(shape),
                                  "nr_update": int(opt.nr_update[key])}
        for name, store in zip(STATE_ARRAYS, (opt.mom1, opt.mom2, opt.averages, opt.lookahead)):
            array = None if store is None else store.get(key)
            if array is not None:
                array = numpy.ascontiguousarray(backend_for(array).to_host(array))
            record[name] = array
        keys.append(record)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": hyper.kind,
        "hyperparameters": {name: getattr(hyper, name) for name in HYPERPARAMETERS},
        "flags": {"L2_is_weight_decay": bool(hyper.L2_is_weight_decay),
                  "use_radam": bool(hyper.use_radam),
                  "use_averages": opt.averages is not None,
                  "lookahead_k": int(hyper.lookahead_k)},
        "ops": opt.ops,
        "step": opt._step,
        "last_score": None if opt._last_score is None else list(opt._last_score),
        "schedules": schedules,
        "keys": keys,
    }


def optimizer_to_bytes(opt: Any) -> bytes:
    return srsly.msgpack_dumps(optimizer_to_dict(opt))


# ------------------------------------------------------------------ from bytes

def optimizer_from_bytes(data: bytes, device_like: Optional[Any] = None) -> Any:
    """A new optimizer holding `data`'s state; on the GPU if `device_like` is there."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"optimizer state must be bytes, got {type(data).__name__}")
    try:
        msg = srsly.msgpack_loads(bytes(data))
    except Exception as err:  # msgpack raises many types on corrupt input
        raise StateError(f"optimizer state is not valid msgpack ({type(err).__name__}: {err})") from None
    try:
        opt = optimizer_from_dict(msg)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
        raise StateError(f"invalid optimizer state: {type(err).__name__}: {err}") from None
    if device_like is not None and device_like._on_gpu:
        opt.to_gpu()
    return opt


def optimizer_from_dict(msg: Any) -> Any:
    from .optimizer import Optimizer, _check_value

    msg = _expect(msg, dict, "state")
    if msg.get("format") != FORMAT_NAME:
        raise StateError(f"not an optim optimizer state (format {msg.get('format')!r})")
    version = msg.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise StateError(f"optimizer state version {version!r} is not supported by this optim "
                         f"(reads up to version {FORMAT_VERSION}); upgrade optim")
    hyper = _expect(msg["hyperparameters"], dict, "hyperparameters")
    flags = _expect(msg["flags"], dict, "flags")
    values = {name: _check_value(name, hyper[name]) for name in HYPERPARAMETERS}
    opt = Optimizer(values.pop("learn_rate"), ops=msg["ops"],
                    use_averages=_expect(flags["use_averages"], bool, "use_averages"),
                    use_radam=_expect(flags["use_radam"], bool, "use_radam"),
                    L2_is_weight_decay=_expect(flags["L2_is_weight_decay"], bool,
                                               "L2_is_weight_decay"),
                    lookahead_k=flags["lookahead_k"], **values)
    if opt._hyper.kind != msg["kind"]:
        raise StateError(f"state says {msg['kind']!r} but its flags describe {opt._hyper.kind!r}")
    opt._step = _count(msg["step"], "step")
    if msg["last_score"] is not None:
        score_step, score = _expect(msg["last_score"], list, "last_score")
        opt._last_score = (_count(score_step, "last_score step"), float(score))
    for name, record in _expect(msg["schedules"], dict, "schedules").items():
        record = _expect(record, dict, "schedule")
        start = record["start"]
        if not isinstance(start, int) or isinstance(start, bool):
            raise StateError(f"schedule {name!r}: invalid start {start!r}")
        schedule = Schedule.from_dict(_expect(record["schedule"], dict, "schedule"))
        if name not in HYPERPARAMETERS:
            raise StateError(f"cannot schedule {name!r}")
        opt.schedules[name] = schedule
        opt._schedule_start[name] = start
    for record in _expect(msg["keys"], list, "keys"):
        _load_key(opt, _expect(record, dict, "key record"))
    return opt


def _load_key(opt: Any, record: Dict[str, Any]) -> None:
    key = decode_key(record["key"])
    if key in opt._shapes:
        raise StateError(f"key {key!r} appears twice")
    shape = tuple(_count(d, "dimension") for d in _expect(record["shape"], list, "shape"))
    size = math.prod(shape)
    needed = {"mom1": opt._hyper.kind != "sgd", "mom2": opt._hyper.kind != "sgd",
              "average": opt.averages is not None, "slow": opt._hyper.lookahead_k > 0}
    arrays = {}
    dtype = None
    for name in STATE_ARRAYS:
        array = record[name]
        if array is None:
            if needed[name]:
                raise StateError(f"key {key!r}: {name} is missing")
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
    opt._shapes[key] = shape
    opt.nr_update[key] = _count(record["nr_update"], "nr_update")
    for name, store in zip(STATE_ARRAYS, (opt.mom1, opt.mom2, opt.averages, opt.lookahead)):
        if name in arrays and store is not None:
            store[key] = arrays[name]


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise StateError(f"invalid {what}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"invalid {what}: {value!r}")
    return value


# ------------------------------------------------------------------ files

def write_atomic(path: Any, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def read_file(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


__all__ = ["StateError", "optimizer_to_bytes", "optimizer_from_bytes", "write_atomic",
           "read_file", "encode_key", "decode_key"]
