"""The Optimizer: Thinc's API and numbers over fused kernels, with exact save and resume.

The class holds Thinc's API and the route of an update; its bases hold the rest: the
hyperparameters and schedules (`ScheduledHyperparameters`), which settings each key gets
(`PerTensorSettings`: groups, the non-finite mode), saving (`Saving`). Every key's state
is one `KeyStates` (optim/state.py). An update takes one route (docs/architecture.md):
the fast path of the backend that holds the state, else `_route`, which validates the
call once, splits it once (by backend and by values read per key) and hands each part to
its backend (`optim.backends`: `CpuUpdates` over `optim._kernels`, `DeviceUpdates` over a
device backend such as CuPy's), then `_settle`s what came back: the one place state and
counts are committed and non-finite gradients reported.
"""
import copy
import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy

from ._kernels import OUTCOME_INF, OUTCOME_NAN
from .backends import NUMPY, Owner, backend_for, get_gpu_backend
from .cpu.updates import CpuUpdates
from .cuda.updates import DeviceUpdates
from .settings.groups import GroupsT, group_for
from .settings.defaults import (ADAM_DEFAULTS, RADAM_DEFAULTS, SGD_DEFAULTS, KeyT, any_empty,
                          check_flag, check_value, is_empty, shape_error)
from .settings.per_tensor import PerTensorSettings
from .registry import registry
from .saving import Saving
from .schedules import Schedule, is_step_schedule, read_step_schedule
from .state import KeyStates, StateT

# A number, a list, an iterator (Thinc 8.3), an optim schedule, or a callable read as
# `value(step, key=..., last_score=...)` (a Thinc 9 `Schedule`).
FloatOrSeq = Union[float, List[float], Iterable[float], Schedule, Callable[..., float]]


@registry.optimizers("SGD.v1")
def SGD(learn_rate: FloatOrSeq, *, ops: Any = None, L2: FloatOrSeq = SGD_DEFAULTS["L2"],
        grad_clip: FloatOrSeq = SGD_DEFAULTS["grad_clip"],
        L2_is_weight_decay: bool = SGD_DEFAULTS["L2_is_weight_decay"],
        use_averages: bool = SGD_DEFAULTS["use_averages"],
        lookahead_k: int = SGD_DEFAULTS["lookahead_k"],
        lookahead_alpha: FloatOrSeq = SGD_DEFAULTS["lookahead_alpha"],
        schedules: Optional[Dict[str, Any]] = None, groups: GroupsT = None,
        nonfinite: str = "apply", max_consecutive_skips: Optional[int] = None) -> "Optimizer":
    """Plain stochastic gradient descent."""
    return Optimizer(learn_rate, ops=ops, L2=L2, grad_clip=grad_clip,
                     L2_is_weight_decay=L2_is_weight_decay, use_averages=use_averages,
                     beta1=0.0, beta2=0.0, lookahead_k=lookahead_k,
                     lookahead_alpha=lookahead_alpha, schedules=schedules, groups=groups,
                     nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips)


@registry.optimizers("Adam.v1")
def Adam(learn_rate: FloatOrSeq = ADAM_DEFAULTS["learn_rate"], *, ops: Any = None,
         L2: FloatOrSeq = ADAM_DEFAULTS["L2"], beta1: FloatOrSeq = ADAM_DEFAULTS["beta1"],
         beta2: FloatOrSeq = ADAM_DEFAULTS["beta2"], eps: FloatOrSeq = ADAM_DEFAULTS["eps"],
         grad_clip: FloatOrSeq = ADAM_DEFAULTS["grad_clip"],
         L2_is_weight_decay: bool = ADAM_DEFAULTS["L2_is_weight_decay"],
         use_averages: bool = ADAM_DEFAULTS["use_averages"],
         lookahead_k: int = ADAM_DEFAULTS["lookahead_k"],
         lookahead_alpha: FloatOrSeq = ADAM_DEFAULTS["lookahead_alpha"],
         schedules: Optional[Dict[str, Any]] = None, groups: GroupsT = None,
         nonfinite: str = "apply", max_consecutive_skips: Optional[int] = None) -> "Optimizer":
    """Adam, with Thinc's defaults (clipping at 1.0, parameter averages on)."""
    return Optimizer(learn_rate, ops=ops, L2=L2, beta1=beta1, beta2=beta2, eps=eps,
                     grad_clip=grad_clip, L2_is_weight_decay=L2_is_weight_decay,
                     use_averages=use_averages, lookahead_k=lookahead_k,
                     lookahead_alpha=lookahead_alpha, schedules=schedules, groups=groups,
                     nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips)


@registry.optimizers("RAdam.v1")
def RAdam(learn_rate: FloatOrSeq = RADAM_DEFAULTS["learn_rate"], *, ops: Any = None,
          beta1: FloatOrSeq = RADAM_DEFAULTS["beta1"],
          beta2: FloatOrSeq = RADAM_DEFAULTS["beta2"], eps: FloatOrSeq = RADAM_DEFAULTS["eps"],
          weight_decay: FloatOrSeq = RADAM_DEFAULTS["weight_decay"],
          L2: FloatOrSeq = RADAM_DEFAULTS["L2"],
          L2_is_weight_decay: bool = RADAM_DEFAULTS["L2_is_weight_decay"],
          grad_clip: FloatOrSeq = RADAM_DEFAULTS["grad_clip"],
          use_averages: bool = RADAM_DEFAULTS["use_averages"],
          lookahead_k: int = RADAM_DEFAULTS["lookahead_k"],
          lookahead_alpha: FloatOrSeq = RADAM_DEFAULTS["lookahead_alpha"],
          schedules: Optional[Dict[str, Any]] = None, groups: GroupsT = None,
          nonfinite: str = "apply", max_consecutive_skips: Optional[int] = None) -> "Optimizer":
    """Rectified Adam (Liu et al. 2019), fused into one pass."""
    return Optimizer(learn_rate, ops=ops, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, L2=L2, L2_is_weight_decay=L2_is_weight_decay,
                     grad_clip=grad_clip, use_averages=use_averages, use_radam=True,
                     lookahead_k=lookahead_k, lookahead_alpha=lookahead_alpha,
                     schedules=schedules, groups=groups, nonfinite=nonfinite,
                     max_consecutive_skips=max_consecutive_skips)


class Optimizer(Saving, PerTensorSettings):
    """SGD, Adam or RAdam with Thinc's semantics; updates weights in place.

    Call it as Thinc's `Model.finish_update` does: `optimizer(key, weights, gradient)`.
    `groups` gives parameters other settings by path (`bind`); `nonfinite` says what an
    update does with a gradient holding a NaN or an inf: "apply" (Thinc), "skip", "raise".
    """

    __slots__ = ("_states", "ops", "_on_gpu", "_owner", "_cpu", "_dev", "last_seen",
                 "__weakref__")

    def __init__(self, learn_rate: FloatOrSeq, *, ops: Any = None,
                 L2: FloatOrSeq = ADAM_DEFAULTS["L2"],
                 beta1: FloatOrSeq = ADAM_DEFAULTS["beta1"],
                 beta2: FloatOrSeq = ADAM_DEFAULTS["beta2"],
                 eps: FloatOrSeq = ADAM_DEFAULTS["eps"],
                 grad_clip: FloatOrSeq = ADAM_DEFAULTS["grad_clip"],
                 lookahead_k: int = ADAM_DEFAULTS["lookahead_k"],
                 lookahead_alpha: FloatOrSeq = ADAM_DEFAULTS["lookahead_alpha"],
                 use_averages: bool = ADAM_DEFAULTS["use_averages"],
                 use_radam: bool = False,
                 L2_is_weight_decay: bool = ADAM_DEFAULTS["L2_is_weight_decay"],
                 weight_decay: FloatOrSeq = RADAM_DEFAULTS["weight_decay"],
                 schedules: Optional[Dict[str, Any]] = None, groups: GroupsT = None,
                 nonfinite: str = "apply",
                 max_consecutive_skips: Optional[int] = None) -> None:
        self._states = KeyStates(check_flag("use_averages", use_averages))
        self._init_hyperparameters()
        self.ops = _ops_name(ops)
        self._on_gpu = False  # the state is on a device: the device's hot paths first
        self._init_per_tensor(groups, nonfinite, max_consecutive_skips)
        self._attach()
        self._hyper.use_radam = check_flag("use_radam", use_radam)
        self._hyper.L2_is_weight_decay = check_flag("L2_is_weight_decay", L2_is_weight_decay)
        self.last_seen: Dict[KeyT, int] = defaultdict(int)  # Thinc's; unused there too
        self.lookahead_k = lookahead_k
        values = {"learn_rate": learn_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
                  "L2": L2, "grad_clip": grad_clip, "weight_decay": weight_decay,
                  "lookahead_alpha": lookahead_alpha}
        for name, value in values.items():
            self.set_hyperparameter(name, value)
        for name, schedule in (schedules or {}).items():
            self._add_schedule(name, schedule, start=-1)
        self._after_kind(self._hyper.kind)  # the groups take the values set above

    def _attach(self) -> None:
        """Lend the backends what they may use of this optimizer (`Owner`): its state,
        its settings per key and its report; their caches start empty."""
        self._owner = Owner(self._hyper, self._key_hyper, self._states, self._hyper_for,
                            self._nonfinite_found)
        self._cpu = CpuUpdates(self._owner)  # NumPy arrays: fast paths, the kept batch
        self._dev: Optional[DeviceUpdates] = None  # device arrays: plans and tables

    def _invalidate(self, stale: bool = True) -> None:
        """Settings or state changed beyond what the backends check by themselves: the
        one place caches are dropped. stale: every key takes the general path once (its
        arrays may not fit its settings any more)."""
        if stale:
            self._states.mark_stale()
        self._sync()
        self._cpu.forget()
        if self._dev is not None:
            self._dev.forget()

    # ------------------------------------------------------------ hyperparameters

    def _after_kind(self, previous: str) -> None:
        """After any change of hyperparameters: the groups take the new values. If an
        update kind changed (e.g. beta1 scheduled up from 0), every key needs the state
        arrays of the new kind: send them through the general path once."""
        if self._refresh_groups() or self._hyper.kind != previous:
            self._invalidate()

    def _settings_changed(self) -> None:
        self._invalidate()

    @property
    def lookahead_k(self) -> int:
        return self._hyper.lookahead_k

    @lookahead_k.setter
    def lookahead_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"lookahead_k must be an integer >= 0, got {k!r}")
        self._hyper.lookahead_k = int(k)
        self._after_kind(self._hyper.kind)
        self._invalidate()

    @property
    def use_averages(self) -> bool:
        """Whether parameter averages are kept (set False to drop them, True to start)."""
        return self._states.averages is not None

    @use_averages.setter
    def use_averages(self, value: Any) -> None:
        self._states.set_averages(check_flag("use_averages", value))

    # ------------------------------------------------------------ Thinc's state dicts

    def _state_dict(name: str, doc: str):  # noqa: N805 - builds properties below
        def get(self: "Optimizer") -> Any:
            return getattr(self._states, name)

        def set(self: "Optimizer", value: Any) -> None:
            if name == "averages":  # on or off changes what an update writes
                self._states.set_averages(value is not None)
            setattr(self._states, name, value)  # the hot paths read it from the next call

        return property(get, set, doc=doc)

    mom1 = _state_dict("mom1", "key -> first moments (Adam, RAdam).")
    mom2 = _state_dict("mom2", "key -> second moments (Adam, RAdam).")
    averages = _state_dict("averages", "key -> parameter averages, or None without them.")
    lookahead = _state_dict("lookahead", "key -> lookahead's slow weights.")
    nr_update = _state_dict("nr_update", "key -> how many updates it has had.")
    del _state_dict

    # ------------------------------------------------------------ updates: the route

    def __call__(self, key: KeyT, weights: Any, gradient: Any, *,
                 lr_scale: float = 1.0) -> Tuple[Any, Any]:
        """Update `weights` in place from `gradient` and zero `gradient`; returns both."""
        if (self._keyed or self._group_keyed) and not is_empty(gradient):
            self._apply_keyed(key)
        if not self._states.stale:  # the hot path of the backend the state lives on
            fast = self._dev if self._on_gpu else self._cpu
            if fast is not None and fast.step_known(key, weights, gradient, lr_scale):
                return weights, gradient
        if not is_empty(gradient):  # Thinc returns at once, whatever the weights are
            backend = self.check_pair(key, weights, gradient)
            self._run(backend, [key], [weights], [gradient], lr_scale, single=True)
        return weights, gradient

    def step_many(self, keys: Sequence[KeyT], weights: Sequence[Any],
                  gradients: Sequence[Any], *, lr_scale: float = 1.0) -> None:
        """Update many tensors in one call (same numbers as calling one by one, in order).

        NumPy tensors are validated together, then updated in one loop outside the GIL.
        A call with the same keys as the last one (a training loop's) reruns that call's
        task table and gathered state once C code has checked the new arrays and that
        the state is the same (`_batch.Batch`).
        """
        keys, weights, gradients = list(keys), list(weights), list(gradients)
        keyed = self._keyed or self._group_keyed
        fast = None if keyed or self._states.stale else self._dev if self._on_gpu else self._cpu
        if fast is self._cpu and self._cpu.step_many_again(keys, weights, gradients, lr_scale):
            return
        check_batch(keys, weights, gradients)
        if fast is not None and self._step_many_known(fast, keys, weights, gradients, lr_scale):
            return
        self._route(keys, weights, gradients, lr_scale)

    def _step_many_known(self, fast: Any, keys: List[KeyT], weights: List[Any],
                         gradients: List[Any], lr_scale: float) -> bool:
        """The fast path of known keys with complete state (no empty gradient)."""
        if fast is self._cpu:
            done = fast.step_many_known(keys, weights, gradients, lr_scale)
            if done is None:
                return False
            batch, counts = done
            self._settle(keys, weights, counts, dict(batch.outcomes()), batch.written)
            fast.keep(batch)
            return True
        done = fast.step_many_known(keys, weights, gradients, lr_scale)
        if done is None:
            return False
        counted, counts = done  # frozen keys left out
        self._settle(counted, weights, counts, {}, True)
        return True

    def _route(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
               lr_scale: float) -> None:
        """The general path of step_many (lengths and duplicates checked): empty
        gradients dropped (Thinc's no-ops), every pair validated before anything is
        touched, then one run per backend and per set of values read per key."""
        if any_empty(gradients):
            todo = [i for i, g in enumerate(gradients) if not is_empty(g)]
            keys, weights, gradients = _picked(todo, keys, weights, gradients)
        backends = [self.check_pair(k, w, g) for k, w, g in zip(keys, weights, gradients)]
        for values, index in self._keyed_parts(keys):
            if values is not None:
                self._set_keyed(values)
            for backend in dict.fromkeys(backends[i] for i in index):
                part = [i for i in index if backends[i] is backend]
                self._run(backend, *_picked(part, keys, weights, gradients), lr_scale)

    def _keyed_parts(self, keys: List[KeyT]) -> List[Tuple[Any, List[int]]]:
        """The call's keys by the values their per-key schedules give (Thinc 9
        callables, the optimizer's and their group's): [(values, indexes)]; one part
        with values None when nothing is read per key."""
        if not (self._keyed or self._group_keyed):
            return [(None, list(range(len(keys))))]
        step, last_score = self._step, self._last_score
        parts: Dict[Tuple[Any, ...], List[int]] = {}
        for i, key in enumerate(keys):
            group = group_for(self._groups, self.path_of(key)) if self._groups else None
            values = tuple((source, name, check_value(name, read_step_schedule(
                schedule, step, key=key, last_score=last_score)))
                for source in (self, group) if source is not None
                for name, schedule in source._keyed.items())
            parts.setdefault(values, []).append(i)
        return list(parts.items())

    def _set_keyed(self, values: Tuple[Any, ...]) -> None:
        kind = self._hyper.kind
        for source, name, value in values:
            setattr(source._hyper, name, value)
        self._after_kind(kind)  # the groups take them

    def _run(self, backend: Any, keys: List[KeyT], weights: List[Any], gradients: List[Any],
             lr_scale: float, single: bool = False) -> None:
        """Validated updates on one backend: frozen keys' gradients zeroed, state arrays
        for new keys allocated, the backend's general path, then `_settle`."""
        updates = self._updates_for(backend)
        hypers = list(map(self._hyper_for, keys))
        if any(h.frozen for h in hypers) and (single or backend is NUMPY):
            for i in (i for i, h in enumerate(hypers) if h.frozen):  # no state, no count
                updates.zero_gradient(keys[i], weights[i], gradients[i])
            rest = [i for i, h in enumerate(hypers) if not h.frozen]
            keys, weights, gradients, hypers = _picked(rest, keys, weights, gradients, hypers)
            if not keys:
                return
        if backend is not NUMPY:
            updates.refuse_capture(f"key {keys[0]!r}: this update prepares the key's launch "
                                   "(its first, or the first after to_gpu(), replaced state "
                                   "or a changed hyperparameter) and" if single else
                                   "step_many")
            self._on_gpu = True
        states = [self._states.allocate(k, h, backend, w)
                  for k, h, w in zip(keys, hypers, weights)]
        nr_update = self._states.nr_update
        counts = [None if h.frozen else nr_update.get(k, 0) + 1 for k, h in zip(keys, hypers)]
        if single:
            outcome = updates.step(keys[0], weights[0], gradients[0], hypers[0], states[0],
                                   counts[0], lr_scale)
            self._settle(keys, weights, counts, {0: outcome} if outcome else {}, True, states)
        elif backend is NUMPY:
            batch = updates.step_many(keys, weights, gradients, hypers, states, counts,
                                      lr_scale)
            self._settle(keys, weights, counts, dict(batch.outcomes()), batch.written, states)
            updates.keep(batch)
        else:  # skip mode: skipped updates are counted here and taken off at `_sync`
            updates.step_many(keys, weights, gradients, hypers, states, lr_scale)
            self._settle(keys, weights, counts, {}, True, states)

    def _settle(self, keys: List[KeyT], weights: List[Any], counts: List[Optional[int]],
                outcomes: Dict[int, int], written: bool,
                states: Optional[List[StateT]] = None) -> None:
        """The one place an update's result is kept: each updated key's state arrays
        (new ones with `states`), shape and count committed, each skipped or refused one
        reported (raise mode raises at the first; with written False nothing was
        written). A count of None: a frozen key, nothing to keep (without `states` the
        fast paths' keys, none frozen, their arrays held: counts only)."""
        if outcomes and not written:
            i, outcome = next(iter(outcomes.items()))
            self._nonfinite_found(keys[i], outcome, weights[i])
        commit = self._states.commit
        if states is None and not outcomes:  # the fast paths: the arrays are held
            self._states.nr_update.update(zip(keys, counts))
        else:
            nr_update = self._states.nr_update
            for i, (key, t) in enumerate(zip(keys, counts)):
                if t is None or i in outcomes:
                    continue
                if states is None:
                    nr_update[key] = t
                else:
                    commit(key, weights[i].shape, states[i], t)
        for i, outcome in outcomes.items():
            self._nonfinite_found(keys[i], outcome, weights[i])

    def _updates_for(self, backend: Any) -> Any:
        """The updates object (and caches) of `backend` for this optimizer."""
        if backend is NUMPY:
            return self._cpu
        if self._dev is None or self._dev.backend is not backend:
            self._dev = DeviceUpdates(self._owner, backend)
        return self._dev

    def check_pair(self, key: KeyT, weights: Any, gradient: Any) -> Any:
        """Validate an update's arrays (type, device, dtype, contiguity, the key's known
        shape) before anything is touched; return their backend. For wrappers of the
        optimizer (optim.distributed) as much as for its own updates."""
        try:
            backend = backend_for(weights)
            grad_backend = backend_for(gradient)
        except TypeError as err:
            raise TypeError(f"key {key!r}: {err}") from None
        if grad_backend is not backend:
            raise TypeError(
                f"key {key!r}: weights are {backend.name} arrays but the gradient is a "
                f"{grad_backend.name} array; move both to the same device first"
            )
        (CpuUpdates if backend is NUMPY else DeviceUpdates).check(key, weights, gradient)
        shape = self._states.shapes.get(key)
        if shape is not None and weights.shape != shape:
            raise ValueError(shape_error(key, weights.shape, shape))
        return backend

    def _sync(self) -> None:
        """Bring the counts a device keeps ahead (skip mode) up to date: take the
        skipped updates off and report them."""
        if self._dev is None:
            return
        for key, weights, nan, inf in self._dev.sync():
            self._states.uncount(key, nan + inf)
            if nan:
                self._nonfinite_found(key, OUTCOME_NAN, weights, nan)
            if inf:
                self._nonfinite_found(key, OUTCOME_INF, weights, inf)

    # ------------------------------------------------------------ keys, copies, devices

    def remap_keys(self, mapping: Dict[KeyT, KeyT]) -> "Optimizer":
        """Rename keys (Thinc's (model.id, name) ids change between processes); returns self."""
        self._sync()  # skips a device has yet to report, under the names they had
        self._states.rename(mapping, self._skipped, self._paths)
        if self._key_hyper is not None:
            self._key_hyper.clear()
        self._invalidate(stale=False)
        return self

    def _copied_slots(self) -> List[str]:
        """The slots a copy (or a load) takes over: all but the backends' caches."""
        return [name for name in _SLOTS if name not in ("_owner", "_cpu", "_dev")]

    def __getstate__(self) -> Dict[str, Any]:
        """Copies (copy.deepcopy, pickle) leave out the backends' caches (the prepared
        device launches hold compiled kernels): they are rebuilt at the copy's first update."""
        held = [(name, s) for g in (self, *self._groups) for name, s in g.schedules.items()]
        for name, schedule in held:
            if not (isinstance(schedule, Schedule) or is_step_schedule(schedule)):
                raise TypeError(
                    f"cannot copy or pickle this optimizer: {name} follows a "
                    f"{type(schedule).__name__} (an iterator such as a Thinc 8.3 schedule), "
                    "whose position cannot be copied; use optim's schedule of the same "
                    "name (e.g. optim.warmup_linear, or @schedules = "
                    "\"optim.warmup_linear.v1\" in a config)")
        self._sync()  # counts a device holds (skip mode) come along
        return {name: getattr(self, name) for name in self._copied_slots()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._attach()
        self._register()

    def __copy__(self) -> "Optimizer":
        """An independent copy, as copy.deepcopy: a shallow one would share the moment
        arrays, which both would then update in place."""
        return copy.deepcopy(self)

    def to_gpu(self) -> "Optimizer":
        """Move all held state (moments, averages, lookahead weights) to the GPU."""
        backend = get_gpu_backend()
        ensure_available = getattr(backend, "ensure_available", None)
        if ensure_available is not None:  # fail here, not at the first update
            ensure_available()
        self._states.move(lambda array: backend.from_host(backend_for(array).to_host(array)))
        self._invalidate(stale=False)
        self._on_gpu = True
        return self

    def to_cpu(self) -> "Optimizer":
        """Move all held state to host memory (NumPy arrays)."""
        self._states.move(lambda a: numpy.ascontiguousarray(backend_for(a).to_host(a)))
        self._invalidate(stale=False)
        self._on_gpu = False
        return self

    def __repr__(self) -> str:
        rate = "per-key" if "learn_rate" in self._keyed else f"{self._hyper.learn_rate:g}"
        return (f"<optim.Optimizer {self._hyper.kind} learn_rate={rate} "
                f"keys={len(self._states.shapes)} step={self._step}>")


def check_batch(keys: List[KeyT], weights: List[Any], gradients: List[Any]) -> None:
    """step_many's own checks: as many weights and gradients as keys, each key once."""
    if not len(keys) == len(weights) == len(gradients):
        raise ValueError(f"step_many: {len(keys)} keys, {len(weights)} weights and "
                         f"{len(gradients)} gradients")
    if len(set(keys)) != len(keys):
        raise ValueError("step_many: each key may appear once per call")


def _picked(index: List[int], *lists: List[Any]) -> Tuple[List[Any], ...]:
    return tuple([items[i] for i in index] for items in lists)


def _ops_name(ops: Any) -> Optional[str]:
    """Accept None, a backend name, or a Thinc Ops object; keep its name."""
    if ops is None:
        return None
    name = ops if isinstance(ops, str) else getattr(ops, "name", None)
    known = {"numpy", "cupy", "cpu", "gpu", "apple", "bigendian", "mps"}
    if name not in known:
        raise ValueError(f"ops must be None, one of {sorted(known)} or a Thinc Ops, got {ops!r}")
    return name


# Every slot of the class and its bases, for copies and from_bytes.
_SLOTS = tuple(name for cls in Optimizer.__mro__ for name in getattr(cls, "__slots__", ())
               if name != "__weakref__")
