"""Per-tensor settings, the part of the `Optimizer` that decides how each key is
updated: per-parameter groups (`bind`, paths, the first matching group's `Hyper`) and
what an update does with a non-finite gradient (`nonfinite`, skip counts, the limit on
consecutive skipped steps). docs/architecture.md, "Per-tensor settings".
"""
import itertools
import numbers
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import numpy

from .. import _kernels
from .._kernels import NONFINITE_RAISE, OUTCOME_NAN  # Hyper.nonfinite's values, outcomes
from .groups import Group, GroupsT, build_groups, check_matches, group_for, key_path
from .defaults import KeyT
from .naming import param_paths
from .hyperparameters import ScheduledHyperparameters


_LIVE: "weakref.WeakSet[PerTensorSettings]" = weakref.WeakSet()  # (optim.bind.v1)
_SERIALS = itertools.count()


def live_optimizers() -> List["PerTensorSettings"]:
    """The optimizers of this process that are still referenced, oldest first."""
    return sorted(_LIVE, key=lambda opt: opt._serial)


class NonFiniteError(FloatingPointError):
    """Non-finite gradients: an update refused (nonfinite="raise"), or too many
    consecutive steps that skipped one (max_consecutive_skips)."""


class PerTensorSettings(ScheduledHyperparameters):
    """Groups and the non-finite mode over the hyperparameters; the Optimizer's base.
    A subclass provides `_sync()` (device counts to the host) and `_settings_changed()`
    (keys' settings may differ: drop caches)."""

    __slots__ = ("_groups", "_key_hyper", "_paths", "_frozen_any", "_group_keyed",
                 "_skipped", "_skip_limit", "_skip_run", "_skipped_in_step", "_last_skip",
                 "_warned", "_serial")

    def _init_per_tensor(self, groups: GroupsT, nonfinite: str,
                         max_consecutive_skips: Optional[int]) -> None:
        self._groups: List[Group] = build_groups(groups)
        self._paths: Dict[KeyT, str] = {}  # key -> path (bind), what groups match
        # key -> its Hyper (its group's or ours), resolved at its first update; None
        # without groups (every key is updated with self._hyper)
        self._key_hyper: Optional[Dict[KeyT, Any]] = {} if self._groups else None
        self._frozen_any = any(g.frozen for g in self._groups)
        self._group_keyed = any(g._keyed for g in self._groups)
        self._skipped: Dict[KeyT, int] = {}  # key -> updates skipped (non-finite gradient)
        self._skip_limit = _check_skip_limit(max_consecutive_skips)
        self._skip_run = 0  # consecutive steps that skipped an update
        self._skipped_in_step = False
        self._last_skip: Optional[Tuple[KeyT, int, int]] = None  # key, outcome, step
        self._warned: set = set()  # keys warned of for non-finite weights
        self._hyper.nonfinite = _nonfinite_mode(nonfinite)
        self._register()

    def _register(self) -> None:
        """Count this optimizer among the live ones (`live_optimizers`)."""
        self._serial = next(_SERIALS)
        _LIVE.add(self)

    def _settings_changed(self) -> None:
        """Keys' settings may differ now (the subclass drops its caches)."""

    def _refresh_groups(self) -> bool:
        """The groups take the optimizer's current values; whether a group's update
        kind changed."""
        changed = False
        for group in self._groups:
            kind = group.hyper.kind
            group.refresh(self._hyper)
            changed = changed or group.hyper.kind != kind
        return changed

    def _children(self) -> List[Group]:
        return self._groups

    def _hyper_for(self, key: KeyT) -> Any:
        """The `_kernels.Hyper` that updates `key`: its group's, or the optimizer's.
        (`.frozen`: only zero the gradient; `.nonfinite`: NONFINITE_APPLY, _SKIP or
        _RAISE, of optim._kernels.)"""
        key_hyper = self._key_hyper
        if key_hyper is None:
            return self._hyper
        hyper = key_hyper.get(key)
        if hyper is None:
            path = self.path_of(key)
            if not self._paths and not key_hyper:
                _warn_unbound(self._groups, path)
            group = group_for(self._groups, path)
            hyper = key_hyper[key] = self._hyper if group is None else group.hyper
        return hyper

    def _nonfinite_found(self, key: KeyT, outcome: int, weights: Any, count: int = 1) -> None:
        """An update of `key` found a NaN (outcome OUTCOME_NAN) or an inf (OUTCOME_INF) in
        its gradient and changed nothing but the gradient (skip: counted) or nothing at
        all (raise)."""
        what = "a NaN" if outcome == OUTCOME_NAN else "an infinity"
        where = f"key {key!r}" + (f" ({self._paths[key]})" if key in self._paths else "")
        weights_bad = not _all_finite(weights)
        cause = (" Its weights are already non-finite: the gradient is not at fault, and "
                 "skipping updates cannot repair them." if weights_bad else "")
        if self._hyper_for(key).nonfinite == NONFINITE_RAISE:
            raise NonFiniteError(
                f"{where}: the gradient holds {what} at step {self._step} (update "
                f"{self.nr_update.get(key, 0) + 1} of this key); nothing was written "
                f"(nonfinite='raise').{cause}")
        self._skipped[key] = self._skipped.get(key, 0) + count
        self._skipped_in_step = True
        self._last_skip = (key, outcome, self._step)
        if weights_bad and key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{where}: skipped an update at step {self._step}.{cause}",
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------ groups

    def bind(self, obj: Any) -> "PerTensorSettings":
        """Name the parameters this optimizer will update, for `groups`: a Thinc Model
        (`<node name>/<param>`), a spaCy Language (`<component>/<node name>/<param>`), or
        a mapping key -> path. Each group must match one of them (ValueError naming
        it). Returns self."""
        if isinstance(obj, Mapping):
            paths = {key: str(path) for key, path in obj.items()}
            what = "the mapping"
        else:
            paths = param_paths(obj)
            what = f"the bound {type(obj).__name__}"
        check_matches(self._groups, paths.values(), what)
        self._paths = paths
        if self._key_hyper is not None:
            self._key_hyper.clear()  # resolved again from the new paths
        self._settings_changed()
        return self

    def path_of(self, key: KeyT) -> str:
        """The path groups match `key` by: the bound one, else its parameter name."""
        return key_path(key, self._paths)

    def group_of(self, key: KeyT) -> Optional[str]:
        """The name of the group that decides `key`'s settings (None: the optimizer's)."""
        group = group_for(self._groups, self.path_of(key))
        return None if group is None else group.name

    @property
    def groups(self) -> List[Dict[str, Any]]:
        """The groups, in order, as plain data (name, match and settings)."""
        return [group.describe() for group in self._groups]

    @property
    def paths(self) -> Dict[KeyT, str]:
        """key -> path of the bound parameters (a copy)."""
        return dict(self._paths)

    # ------------------------------------------------------------ non-finite gradients

    @property
    def nonfinite(self) -> str:
        """What an update does with a NaN or an inf in its gradient: "apply", "skip"
        or "raise" (docs/numerics.md)."""
        return _kernels.NONFINITE_MODES[self._hyper.nonfinite]

    @nonfinite.setter
    def nonfinite(self, mode: str) -> None:
        self._hyper.nonfinite = _nonfinite_mode(mode)
        self._after_kind(self._hyper.kind)
        self._settings_changed()

    @property
    def max_consecutive_skips(self) -> Optional[int]:
        """step_schedules() raises NonFiniteError after this many consecutive steps that
        skipped an update (None: never)."""
        return self._skip_limit

    @max_consecutive_skips.setter
    def max_consecutive_skips(self, limit: Optional[int]) -> None:
        self._skip_limit = _check_skip_limit(limit)

    def _sync(self) -> None:
        """Bring counts a device keeps (skip mode) up to date on the host."""

    @property
    def step_skipped(self) -> bool:
        """Whether an update was skipped since the last `step_schedules()` (what
        `max_consecutive_skips` counts). Settable: a sharded wrapper sets it when
        another rank skipped one."""
        return self._skipped_in_step

    @step_skipped.setter
    def step_skipped(self, skipped: bool) -> None:
        self._skipped_in_step = bool(skipped)

    @property
    def skipped(self) -> Dict[KeyT, int]:
        """key -> how many of its updates were skipped (non-finite gradient), a copy."""
        self._sync()
        return dict(self._skipped)

    def peek_skipped(self) -> Dict[KeyT, int]:
        """`skipped` as the host knows it now, without waiting for a device (exact for
        host arrays; a device's skips appear once reported)."""
        return dict(self._skipped)

    @property
    def skipped_total(self) -> int:
        self._sync()
        return sum(self._skipped.values())

    def step_schedules(self) -> None:
        """Advance the step (every scheduled hyperparameter takes its next value). With
        max_consecutive_skips, NonFiniteError once that many steps in a row skipped."""
        if self._skip_limit is not None:
            self._sync()
            self._skip_run = self._skip_run + 1 if self._skipped_in_step else 0
            if self._skip_run >= self._skip_limit:
                last = ("" if self._last_skip is None else  # (sharded: on another rank)
                        f"; the last here was {self.path_of(self._last_skip[0])} at step "
                        f"{self._last_skip[2]}")
                raise NonFiniteError(
                    f"{self._skip_run} consecutive steps skipped an update whose gradient "
                    f"was not finite (max_consecutive_skips={self._skip_limit}){last}. "
                    "The run is not learning: "
                    "lower the learning rate, check the data, or resume from an earlier "
                    "checkpoint.")
        self._skipped_in_step = False
        super().step_schedules()

    def _apply_keyed(self, key: KeyT) -> None:
        """Hyperparameters read per key (Thinc 9), the optimizer's and the key's group's."""
        super()._apply_keyed(key)
        if self._group_keyed:
            group = group_for(self._groups, self.path_of(key))
            if group is not None and group._keyed:
                group._apply_keyed(key)
                group.refresh(self._hyper)


def _nonfinite_mode(mode: Any) -> int:
    modes = _kernels.NONFINITE_MODES
    if mode not in modes:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, modes))}, got {mode!r}")
    return modes.index(mode)


def _check_skip_limit(limit: Any) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"max_consecutive_skips must be None (no limit) or an integer >= 1, "
                         f"got {limit!r}")
    return int(limit)


def _warn_unbound(groups: List[Group], example: str) -> None:
    """Groups whose pattern holds a '/' match nothing until the optimizer is bound:
    unbound keys are matched by their parameter name alone. Say so, once."""
    by_path = [g for g in groups if "/" in g.match]
    if by_path:
        warnings.warn(
            f"group {by_path[0].name!r} (match {by_path[0].match!r}) matches parameter "
            f"paths, but this optimizer was not bound: its keys are matched by their "
            f"parameter name alone (e.g. {example!r}), so the group matches nothing. Call "
            "optimizer.bind(model) (or bind(nlp)) before training; under spacy train, "
            "add [training.before_update] @callbacks = \"optim.bind.v1\" to the config "
            "(python -m optim.spacy_train binds by itself)", UserWarning, stacklevel=4)


def _all_finite(x: Any) -> bool:
    """Whether every element of x is finite (a host read for a device array)."""
    if isinstance(x, numpy.ndarray):
        return bool(numpy.isfinite(x).all())
    xp = __import__(type(x).__module__.split(".")[0])
    return bool(xp.isfinite(x).all())
