"""Checkpoints that survive a SIGKILL: model weights, optimizer state under stable
parameter names, random number generators, and whatever the loop adds.

* Parameters are named by where they sit, not by Thinc's per-process ids:
  `"<walk index>/<param>"` in a Thinc model (`"3/W"`), `"<component>/<walk index>/<param>"`
  in a spaCy pipeline (`"tagger/2/W"`), PyTorch shims' parameters as
  `".../shim<j>/<torch name>"`. The optimizer's state is saved under these names and put
  back under the keys of the rebuilt model (`param_names`, `named_optimizer_state`,
  `load_optimizer_state`).
* `rng_state()` / `set_rng_state()`: Python's `random`, NumPy's global generator and
  torch's (when torch is imported); the dropout draws and the data order.
* `save_checkpoint(path, model, optimizer, **extra)` / `load_checkpoint(path, model, ...)`:
  one file, written atomically, for a custom Thinc loop.
* `write_bundle` / `read_bundle`, `Checkpoints`: named byte strings in one file that
  appears whole or not at all (a temporary file, fsynced, renamed) and carries each
  one's size and SHA-256 digest, so a damaged one (truncated, corrupt) is told from an
  intact one; a directory of them, the newest two kept.

Nothing here imports Thinc or spaCy: models are walked by duck typing.
"""
import hashlib
import json
import os
import random
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy
import srsly

from .settings.naming import param_names, param_shapes
from .serialize import StateError, decode_key, encode_key, read_file, write_atomic

FORMAT_NAME = "optim.checkpoint"
FORMAT_VERSION = 1
BUNDLE_FORMAT = "optim.checkpoint-file"
_NAME_TAG = "optim.param"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded (damaged, foreign, newer)."""


# ------------------------------------------------------------------ parameter names
# (the walk is optim.settings.naming's: param_names, param_paths, param_shapes)

def check_same_model(saved: Dict[str, List[int]], obj: Any, what: str) -> None:
    """Raise CheckpointError naming the first differences if `obj`'s parameters are not
    the saved ones (another architecture, other labels, other widths)."""
    now = param_shapes(obj)
    problems = [f"{n}: missing in this model" for n in saved if n not in now]
    problems += [f"{n}: not in the checkpoint" for n in now if n not in saved]
    problems += [f"{n}: shape {tuple(now[n])} here, {tuple(saved[n])} in the checkpoint"
                 for n in saved if n in now and list(now[n]) != list(saved[n])]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{what} is not a checkpoint of this model: "
                              + "; ".join(problems[:5]) + more)


def named_optimizer_state(optimizer: Any, names: Dict[Any, str]) -> Dict[str, Any]:
    """`optimizer.to_dict()` with each key the model names replaced by its name (a
    collective for a sharded distributed optimizer: call it on every rank)."""
    msg = optimizer.to_dict()
    for record in msg["keys"]:
        key = decode_key(record["key"])
        if key in names:
            record["key"] = encode_key((_NAME_TAG, names[key]))
    for field in ("skipped", "paths"):  # [key, value] pairs
        for pair in msg.get(field, ()):
            key = decode_key(pair[0])
            if key in names:
                pair[0] = encode_key((_NAME_TAG, names[key]))
    return msg


def load_optimizer_state(optimizer: Any, msg: Dict[str, Any], names: Dict[Any, str], *,
                         allow_group_change: bool = False) -> Any:
    """Put a `named_optimizer_state` back under this model's keys, into `optimizer`
    (any optim optimizer, wrapped or distributed) or, with None, a new `optim.Optimizer`.

    Per-parameter groups other than `optimizer`'s are a CheckpointError naming the
    group; allow_group_change=True trains on with `optimizer`'s groups instead."""
    keys = {name: key for key, name in names.items()}
    unknown = []
    for record in msg["keys"]:
        key = decode_key(record["key"])
        if isinstance(key, tuple) and len(key) == 2 and key[0] == _NAME_TAG:
            if key[1] not in keys:
                unknown.append(key[1])
                continue
            record["key"] = encode_key(keys[key[1]])
    if unknown:
        raise CheckpointError(f"the checkpoint's optimizer holds state for parameters this "
                              f"model does not have: {', '.join(unknown[:5])}")
    for field in ("skipped", "paths"):  # pairs of parameters this model lacks are dropped
        pairs = []
        for key, value in msg.get(field, ()):
            name = decode_key(key)
            if isinstance(name, tuple) and len(name) == 2 and name[0] == _NAME_TAG:
                if name[1] not in keys:
                    continue
                key = encode_key(keys[name[1]])
            pairs.append([key, value])
        if field in msg:
            msg[field] = pairs
    if optimizer is not None:
        _check_groups(optimizer, msg, allow_group_change)
    data = srsly.msgpack_dumps(msg)
    if optimizer is None:
        from .optimizer import Optimizer

        return Optimizer.load_bytes(data)
    optimizer.from_bytes(data)
    return optimizer


def _check_groups(optimizer: Any, msg: Dict[str, Any], allow: bool) -> None:
    """CheckpointError naming the first group that differs between the checkpoint and
    `optimizer` (its settings as written; schedules by definition, not position),
    unless `allow`: then `optimizer`'s groups replace the saved ones in `msg`."""
    from . import serialize
    from .optimizer import Optimizer

    core = optimizer
    while not isinstance(core, Optimizer):
        core = core.optimizer
    now = serialize.encode_groups(core.group_states())
    saved = msg.get("groups", [])
    if _groups_as_written(saved) == _groups_as_written(now):
        return
    if allow:
        msg["groups"] = now
        return
    saved_by, now_by = {g["name"]: g for g in saved}, {g["name"]: g for g in now}
    names = [g["name"] for g in saved] + [g["name"] for g in now if g["name"] not in saved_by]
    for name in names:
        if name not in now_by:
            problem = f"group {name!r} is in the checkpoint but not in this optimizer"
        elif name not in saved_by:
            problem = f"group {name!r} is new (the checkpoint has no such group)"
        elif _groups_as_written([saved_by[name]]) != _groups_as_written([now_by[name]]):
            problem = f"group {name!r} has other settings than in the checkpoint"
        else:
            continue
        break
    else:
        problem = "the groups are in another order than in the checkpoint"
    raise CheckpointError(f"{problem}; resuming would train under other settings. Restore "
                          "the groups, or allow the change explicitly "
                          "(allow_group_change=True; optim.spacy_train: --allow-config-change)")


def _groups_as_written(groups: List[Dict[str, Any]]) -> List[Any]:
    def definition(d: Any) -> Any:
        if isinstance(d, dict) and "name" in d and "attrs" in d:
            return (d["name"], {k: definition(v) for k, v in d["attrs"].items()})
        return d

    return [(g["name"], g["match"], float(g["learn_rate_scale"]), bool(g["frozen"]),
             {n: v for n, v in g["values"].items() if n not in g["schedules"]},
             {n: definition(r["schedule"]) for n, r in g["schedules"].items()})
            for g in groups]


# ------------------------------------------------------------------ random generators

def python_random_state() -> List[Any]:
    """Python's `random` state as a msgpack-friendly list."""
    version, mt, gauss = random.getstate()
    return [version, list(mt), gauss]


def set_python_random_state(saved: List[Any]) -> None:
    version, mt, gauss = saved
    random.setstate((version, tuple(mt), gauss))


def rng_state() -> Dict[str, Any]:
    """The states of Python's `random`, NumPy's global generator and, where imported,
    torch's CPU generator, as msgpack-friendly values."""
    name, keys, pos, has_gauss, cached = numpy.random.get_state()
    state: Dict[str, Any] = {
        "python": python_random_state(),
        "numpy": [name, numpy.asarray(keys, dtype=numpy.uint32), int(pos), int(has_gauss),
                  float(cached)],
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.random.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    set_python_random_state(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss,
                            cached))
    if "torch" in state:
        import torch

        raw = numpy.frombuffer(state["torch"], dtype=numpy.uint8).copy()
        torch.random.set_rng_state(torch.from_numpy(raw))


# ------------------------------------------------------------------ Thinc: one file

def save_checkpoint(path: Any, model: Any, optimizer: Any, **extra: Any) -> None:
    """Write `model`'s weights, `optimizer`'s whole state (under stable parameter names),
    the random generators' states and `extra` (msgpack-able values: your step, epoch,
    position in the data) to one checkpoint file (`write_bundle`), atomically.

    With an optim.distributed optimizer on 2+ ranks, call it on every rank with the
    same path: every rank's generators are gathered, the state is the whole group's,
    and rank 0 alone writes."""
    names = param_names(model)
    msg = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "params": param_shapes(model),
        "optimizer": named_optimizer_state(optimizer, names),  # a collective when sharded
        "rng": rng_state(), "extra": extra,
    }
    group = _group_of(optimizer)
    if group is not None:
        msg["ranks"] = group.all_gather_bytes(srsly.msgpack_dumps(msg.pop("rng")),
                                              "the gathering of a checkpoint")
        msg["rng"] = None
    try:
        state = srsly.msgpack_dumps(msg)
    except TypeError as err:
        raise TypeError(f"save_checkpoint: extra values must be msgpack-able ({err})") from None
    if group is None or group.rank == 0:
        write_bundle(path, {"state.msgpack": state, "model.bin": model.to_bytes()})
    if group is not None:
        group.barrier("the end of a checkpoint")


def load_checkpoint(path: Any, model: Any, optimizer: Any = None, *,
                    restore_rng: bool = True,
                    allow_group_change: bool = False) -> Tuple[Any, Dict[str, Any]]:
    """Load weights into `model` (rebuilt the same way, in this process), the optimizer
    state into `optimizer` (or a new `optim.Optimizer` if None) under this model's keys,
    and the random generators' states; returns `(optimizer, extra)`.

    A checkpoint of 2+ ranks gives each rank its own generators when the world size is
    the same; at another world size (or into a plain optimizer) the weights and the
    optimizer load exactly and the generators are left as they are, with a warning."""
    files = read_bundle(path)
    msg = _checked_message(files.get("state.msgpack", b""), str(path))
    check_same_model(msg["params"], model, str(path))
    optimizer = load_optimizer_state(optimizer, msg["optimizer"], param_names(model),
                                     allow_group_change=allow_group_change)
    model.from_bytes(files["model.bin"])
    rng = msg["rng"]
    ranks = msg.get("ranks")
    if ranks is not None:
        group = _group_of(optimizer)
        if group is not None and group.world_size == len(ranks):
            rng = srsly.msgpack_loads(ranks[group.rank])
        elif restore_rng:
            warnings.warn(f"{path} was written by {len(ranks)} ranks and this process is "
                          f"rank {0 if group is None else group.rank} of "
                          f"{1 if group is None else group.world_size}: the random "
                          "generators are not restored", stacklevel=2)
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return optimizer, dict(msg["extra"])


def _group_of(optimizer: Any) -> Any:
    """The process group of an optim.distributed optimizer on 2+ ranks, else None."""
    group = getattr(optimizer, "group", None)
    return group if group is not None and getattr(group, "world_size", 1) > 1 else None


def _checked_message(data: bytes, what: str) -> Dict[str, Any]:
    try:
        msg = srsly.msgpack_loads(data)
    except Exception as err:  # msgpack raises many types on corrupt input
        raise CheckpointError(f"{what}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(msg, dict) or msg.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{what}: not an optim checkpoint")
    check_version(msg.get("version"), what)
    return msg


def check_version(version: Any, what: str) -> None:
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{what}: invalid checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{what} was written by a newer optim (checkpoint format "
                              f"{version}; this optim reads up to {FORMAT_VERSION}): upgrade optim")


# ------------------------------------------------------------------ checkpoint files

_MAGIC = b"optim checkpoint\n"
_HEADER_LEN = struct.Struct("<Q")


def write_bundle(path: Any, files: Dict[str, bytes]) -> None:
    """Write named byte strings as one checkpoint file, atomically (temporary file,
    fsync, rename): a magic line, a JSON header (format, version, each file's name, size
    and SHA-256) and the files one after another, streamed without a joined copy (a
    checkpoint of a large model is as large as its arrays, not twice or three times)."""
    names = list(files)
    header = json.dumps({"format": BUNDLE_FORMAT, "version": FORMAT_VERSION,
                         "files": [[name, len(files[name]),
                                    hashlib.sha256(files[name]).hexdigest()]
                                   for name in names]}).encode("utf8")
    write_atomic(path, [_MAGIC, _HEADER_LEN.pack(len(header)), header,
                        *(files[name] for name in names)])


def read_bundle(path: Any) -> Dict[str, bytes]:
    """The files of a checkpoint written by `write_bundle`; CheckpointError naming what
    is wrong if it is damaged (truncated, corrupt) or not one."""
    try:
        data = read_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    start = len(_MAGIC) + _HEADER_LEN.size
    if not data.startswith(_MAGIC) or len(data) < start:
        if _MAGIC.startswith(data[: len(_MAGIC)]) and len(data) < start:
            raise CheckpointError(f"{path}: truncated ({len(data)} bytes)")
        raise CheckpointError(f"{path}: not an optim checkpoint file")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(_MAGIC))
    if len(data) < start + header_len:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes)")
    try:
        header = json.loads(data[start: start + header_len])
        entries = [(str(n), int(size), str(digest)) for n, size, digest in header["files"]]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: unreadable header") from None
    if header.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path}: not an optim checkpoint file")
    check_version(header.get("version"), str(path))
    position, files = start + header_len, {}
    expected = position + sum(size for _, size, _ in entries)
    if len(data) != expected:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes of {expected})"
                              if len(data) < expected else
                              f"{path}: {len(data) - expected} bytes too many")
    for name, size, digest in entries:
        piece = data[position: position + size]
        if hashlib.sha256(piece).hexdigest() != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")
        files[name] = piece
        position += size
    return files


class Checkpoints:
    """`root/step-<N>.ckpt` files (N in 8 digits: `step-00000200.ckpt`) written by
    `write_bundle`, the newest `keep` kept.

    On ranks other than 0 (`writer=False`) `write` writes nothing: every rank calls
    the same methods in the same order."""

    def __init__(self, root: Any, *, keep: int = 2, writer: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root, self.keep, self.writer = Path(root), keep, writer

    def steps(self) -> List[Tuple[int, Path]]:
        """`(step, path)` of every checkpoint file, intact or not, newest first."""
        found = []
        if self.root.is_dir():
            for path in self.root.glob("step-*.ckpt"):
                if path.stem[5:].isdigit():
                    found.append((int(path.stem[5:]), path))
        return sorted(found, reverse=True)

    def check_writable(self) -> None:
        """Raise CheckpointError now, not at the first checkpoint, if root can't be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"cannot write checkpoints to {self.root}: "
                                  f"{err.strerror or err}") from None

    def write(self, step: int, files: Dict[str, bytes]) -> Optional[Path]:
        if not self.writer:
            return None
        path = self.root / f"step-{step:08d}.ckpt"
        self.root.mkdir(parents=True, exist_ok=True)
        write_bundle(path, files)
        for _, older in self.steps()[self.keep:]:
            older.unlink(missing_ok=True)
        return path

    def newest(self, warn: Any = None) -> Optional[Tuple[Path, Dict[str, bytes]]]:
        """The newest intact checkpoint and its files; damaged newer ones are reported
        through `warn(text)` and skipped. None if there is none at all; CheckpointError
        if there are some and none is intact (nothing is deleted)."""
        problems = []
        for _, path in self.steps():
            try:
                files = read_bundle(path)
            except CheckpointError as err:
                problems.append(str(err))
                continue
            for text in problems:
                if warn is not None:
                    warn(f"skipping a damaged checkpoint: {text}; using {path.name}")
            return path, files
        if problems:
            raise CheckpointError(f"no intact checkpoint in {self.root}: "
                                  + "; ".join(problems))
        return None


__all__ = ["CheckpointError", "StateError", "param_names", "param_shapes",
           "named_optimizer_state", "load_optimizer_state", "rng_state", "set_rng_state",
           "save_checkpoint", "load_checkpoint", "write_bundle", "read_bundle",
           "Checkpoints"]
