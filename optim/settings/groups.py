"""Per-parameter settings: groups of parameters matched by path, each with its own
hyperparameters, a factor on the optimizer's learning rate, or frozen weights.

A group is a `match` pattern (a shell-style glob, `fnmatch`, over parameter paths such
as `tagger/softmax/W`) and overrides. The first group whose pattern matches a path
decides that parameter's settings; a parameter no group matches uses the optimizer's.
A group's settings are a `_kernels.Hyper` of their own (`Group.hyper`), the optimizer's
values with the group's overrides, brought up to date whenever the optimizer's change.
"""
import fnmatch
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .defaults import HYPERPARAMETERS, KeyT
from .hyperparameters import ScheduledHyperparameters

GroupsT = Any  # a list of dicts, or a config's {name: table} (ordered as written)
OPTIONS = ("match", "learn_rate_scale", "frozen", "name")
SETTINGS = tuple(HYPERPARAMETERS) + ("learn_rate_scale", "frozen")


class Group(ScheduledHyperparameters):
    """One group: its name, pattern and overrides (numbers or schedules, stepped with
    the optimizer's), and `hyper`, the settings its parameters are updated with."""

    __slots__ = ("name", "match", "learn_rate_scale", "frozen", "overrides", "hyper")

    def __init__(self, name: str, match: str, overrides: Dict[str, Any],
                 learn_rate_scale: float = 1.0, frozen: bool = False) -> None:
        self._init_hyperparameters()
        self.name = name
        self.match = match
        self.learn_rate_scale = learn_rate_scale
        self.frozen = frozen
        self.overrides = tuple(overrides)  # the hyperparameters the group sets
        for setting, value in overrides.items():
            try:
                self.set_hyperparameter(setting, value)
            except ValueError as err:
                raise ValueError(f"group {name!r}: {err}") from None
        self.hyper = self._hyper.copy()

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.match)

    def refresh(self, base: Any) -> None:
        """Bring `hyper` up to date: `base` (the optimizer's Hyper), then the overrides,
        then the learning rate times learn_rate_scale."""
        hyper = self.hyper
        hyper.set_from(base)
        for setting in self.overrides:
            setattr(hyper, setting, getattr(self._hyper, setting))
        if self.learn_rate_scale != 1.0:
            hyper.learn_rate = hyper.learn_rate * self.learn_rate_scale
        hyper.frozen = self.frozen

    def describe(self) -> Dict[str, Any]:
        """The group as written (plain data; schedules as their objects)."""
        out: Dict[str, Any] = {"name": self.name, "match": self.match}
        for setting in self.overrides:
            out[setting] = self.schedules.get(setting, getattr(self._hyper, setting))
        if self.learn_rate_scale != 1.0:
            out["learn_rate_scale"] = self.learn_rate_scale
        if self.frozen:
            out["frozen"] = True
        return out

    def __repr__(self) -> str:
        return f"<optim group {self.name!r} match={self.match!r}>"


def build_groups(groups: GroupsT) -> List[Group]:
    """Validate `groups` (None, a list of dicts with `match` and settings, or a
    config's {name: table}) into Groups; ValueError naming the group otherwise."""
    if groups is None:
        return []
    if isinstance(groups, Mapping):
        entries: List[Tuple[str, Any]] = [(str(name), table) for name, table in groups.items()]
    elif isinstance(groups, (list, tuple)):
        entries = []
        for i, table in enumerate(groups):
            name = table.get("name") if isinstance(table, Mapping) else None
            entries.append((str(name) if name is not None else f"groups[{i}]", table))
    else:
        raise ValueError(f"groups must be a list of dicts (or a config's tables), got "
                         f"{type(groups).__name__}")
    built, names = [], set()
    for name, table in entries:
        if name in names:
            raise ValueError(f"group {name!r} is given twice")
        names.add(name)
        built.append(_build(name, table))
    return built


def _build(name: str, table: Any) -> Group:
    if not isinstance(table, Mapping):
        raise ValueError(f"group {name!r} must be a table of settings, got "
                         f"{type(table).__name__}")
    unknown = [k for k in table if k not in OPTIONS and k not in HYPERPARAMETERS]
    if unknown:
        raise ValueError(f"group {name!r}: unknown setting {unknown[0]!r}; a group takes "
                         f"match and any of {', '.join(SETTINGS)}")
    match = table.get("match")
    if not isinstance(match, str) or not match:
        raise ValueError(f"group {name!r}: match must be a non-empty string (a glob over "
                         f"parameter paths such as 'tagger/*'), got {match!r}")
    frozen = table.get("frozen", False)
    if not isinstance(frozen, bool):
        raise ValueError(f"group {name!r}: frozen must be true or false, got {frozen!r}")
    scale = table.get("learn_rate_scale", 1.0)
    if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
            or not (0.0 <= float(scale) < float("inf"))):
        raise ValueError(f"group {name!r}: learn_rate_scale must be a finite number >= 0, "
                         f"got {scale!r}")
    overrides = {k: v for k, v in table.items() if k in HYPERPARAMETERS}
    if frozen and (overrides or "learn_rate_scale" in table):
        others = list(overrides) + (["learn_rate_scale"] if "learn_rate_scale" in table else [])
        raise ValueError(f"group {name!r}: a frozen group takes no other settings (got "
                         f"{', '.join(others)}); its weights never change")
    return Group(name, match, overrides, float(scale), frozen)


def key_path(key: KeyT, paths: Mapping[KeyT, str]) -> str:
    """The path a group pattern is matched against: the bound one, else the parameter
    name alone (Thinc's key is (node id, name)), else the key as text."""
    path = paths.get(key)
    if path is not None:
        return path
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str):
        return key[1]
    return key if isinstance(key, str) else str(key)


def group_for(groups: Sequence[Group], path: str) -> Optional[Group]:
    """The first group whose pattern matches `path`, or None."""
    for group in groups:
        if group.matches(path):
            return group
    return None


def check_matches(groups: Sequence[Group], paths: Iterable[str], what: str) -> None:
    """ValueError naming the first group that matches none of `paths` (a typo must not
    silently train everything at one rate), with a few paths that do exist."""
    paths = list(dict.fromkeys(paths))  # shared node names repeat paths
    for group in groups:
        if not any(group.matches(p) for p in paths):
            sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ValueError(f"group {group.name!r}: match {group.match!r} matches no "
                             f"parameter of {what}; its parameters are {sample or 'none'}")
