"""The Optimizer: Thinc's API and numbers over fused kernels, with exact save and resume.

The class holds Thinc's API, the hyperparameters and their schedules, and the state
(moments, averages, lookahead weights, counts). An update asks the arrays' backend to do
it (`optim.backends`: `CpuUpdates` over `optim._kernels`, `DeviceUpdates` over a device
backend such as `optim.backends.cupy`), and each backend owns its fast paths and caches.
"""
import copy
import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy
import srsly

from . import _kernels, serialize
from .backends import NUMPY, backend_for, get_gpu_backend
from .backends.cpu import CpuUpdates
from .backends.device import DeviceUpdates
from .groups import GroupsT, group_for
from .per_tensor import PerTensorSettings
from .hyperparams import (ADAM_DEFAULTS, HYPERPARAMETERS, RADAM_DEFAULTS, SGD_DEFAULTS, KeyT,
                          any_empty, check_flag, check_value, is_empty, shape_error)
from .registry import registry
from .schedules import Schedule, is_step_schedule, read_step_schedule

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


class Optimizer(PerTensorSettings):
    """SGD, Adam or RAdam with Thinc's semantics; updates weights in place.

    Call it as Thinc's `Model.finish_update` does: `optimizer(key, weights, gradient)`.
    `groups` gives parameters other settings by path (`bind`); `nonfinite` says what an
    update does with a gradient holding a NaN or an inf: "apply" (Thinc), "skip", "raise".
    """

    __slots__ = ("_mom1", "_mom2", "_averages", "_lookahead", "_nr_update", "ops", "_shapes",
                 "_on_gpu", "_stale", "_cpu", "_dev", "last_seen", "__weakref__")

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
        self._mom1: Dict[KeyT, Any] = {}
        self._mom2: Dict[KeyT, Any] = {}
        self._averages: Optional[Dict[KeyT, Any]] = {} if check_flag(
            "use_averages", use_averages) else None
        self._lookahead: Dict[KeyT, Any] = {}  # the slow weights
        self._nr_update: Dict[KeyT, int] = defaultdict(int)
        self._init_hyperparameters()
        self.ops = _ops_name(ops)
        self._shapes: Dict[KeyT, Tuple[int, ...]] = {}
        self._on_gpu = False  # the state is on a device: the device's hot paths first
        self._stale: set = set()  # keys whose state misses arrays the settings now need
        self._dev: Optional[DeviceUpdates] = None  # device arrays: plans and tables
        self._init_per_tensor(groups, nonfinite, max_consecutive_skips)
        self._cpu = CpuUpdates(self)  # NumPy arrays: fast paths, the kept step_many batch
        self._hyper.use_radam = check_flag("use_radam", use_radam)
        self._hyper.L2_is_weight_decay = check_flag("L2_is_weight_decay", L2_is_weight_decay)
        self.last_seen: Dict[KeyT, int] = defaultdict(int)  # Thinc's; unused there too
        self.lookahead_k = lookahead_k
        values = {"learn_rate": learn_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
                  "L2": L2, "grad_clip": grad_clip, "weight_decay": weight_decay,
                  "lookahead_alpha": lookahead_alpha}
        for name, value in values.items():
            self._set_hyperparameter(name, value)
        for name, schedule in (schedules or {}).items():
            self._add_schedule(name, schedule, start=-1)
        self._after_kind(self._hyper.kind)  # the groups take the values set above

    # ------------------------------------------------------------ hyperparameters

    def _after_kind(self, previous: str) -> None:
        """After any change of hyperparameters: the groups take the new values. If an
        update kind changed (e.g. beta1 scheduled up from 0), every key needs the state
        arrays of the new kind: send them through the general path once."""
        changed = self._refresh_groups() or self._hyper.kind != previous
        if changed:
            self._stale.update(self._shapes)
            self._cpu.forget()

    @property
    def lookahead_k(self) -> int:
        return self._hyper.lookahead_k

    @lookahead_k.setter
    def lookahead_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"lookahead_k must be an integer >= 0, got {k!r}")
        self._hyper.lookahead_k = int(k)
        self._after_kind(self._hyper.kind)
        self._stale.update(self._shapes)
        self._cpu.forget()

    @property
    def use_averages(self) -> bool:
        """Whether parameter averages are kept (set False to drop them, True to start)."""
        return self.averages is not None

    @use_averages.setter
    def use_averages(self, value: Any) -> None:
        if check_flag("use_averages", value) != self.use_averages:
            self.averages = {} if value else None
            self._stale.update(self._shapes)

    # ------------------------------------------------------------ updates

    def _state_dict(slot: str, doc: str):  # noqa: N805 - builds properties below
        def get(self: "Optimizer") -> Any:
            return getattr(self, slot)

        def set(self: "Optimizer", value: Any) -> None:
            setattr(self, slot, value)
            self._cpu = CpuUpdates(self)  # the backends hold the dicts: rebind them
            if self._dev is not None:
                self._dev.forget()

        return property(get, set, doc=doc)

    mom1 = _state_dict("_mom1", "key -> first moments (Adam, RAdam).")
    mom2 = _state_dict("_mom2", "key -> second moments (Adam, RAdam).")
    averages = _state_dict("_averages", "key -> parameter averages, or None without them.")
    lookahead = _state_dict("_lookahead", "key -> lookahead's slow weights.")
    nr_update = _state_dict("_nr_update", "key -> how many updates it has had.")
    del _state_dict

    def __call__(self, key: KeyT, weights: Any, gradient: Any, *,
                 lr_scale: float = 1.0) -> Tuple[Any, Any]:
        """Update `weights` in place from `gradient` and zero `gradient`; returns both."""
        if (self._keyed or self._group_keyed) and not is_empty(gradient):
            self._apply_keyed(key)
        if not self._stale:  # the hot path of the backend the state lives on
            fast = self._dev if self._on_gpu else self._cpu
            if fast is not None and fast.step_known(key, weights, gradient, lr_scale):
                return weights, gradient
        return self._update(key, weights, gradient, lr_scale)

    def _update(self, key: KeyT, weights: Any, gradient: Any, lr_scale: float) -> Tuple[Any, Any]:
        """The general path: first updates of a key, device arrays, empty gradients."""
        if is_empty(gradient):  # Thinc returns at once, whatever the weights are
            return weights, gradient
        backend = self.check_pair(key, weights, gradient)
        hyper = self._hyper_for(key)
        if hyper.frozen:  # no state, nothing but the gradient zeroed
            if backend is NUMPY:
                _kernels.zero_gradient_of(key, weights, gradient)
            else:
                gradient.fill(0)
            return weights, gradient
        updates = self._updates_for(backend)
        if backend is not NUMPY:
            updates.refuse_capture(f"key {key!r}: this update prepares the key's launch "
                                   "(its first, or the first after to_gpu(), replaced state "
                                   "or a changed hyperparameter) and")
        state = self._state_for(key, backend, weights)
        t = self.nr_update.get(key, 0) + 1
        outcome = updates.step(key, weights, gradient, state, t, lr_scale)
        if backend is not NUMPY:
            self._on_gpu = True
        if outcome:  # a non-finite gradient: nothing of this call is kept
            self._nonfinite_found(key, outcome, weights)
            return weights, gradient
        self._commit(key, weights.shape, state, t)
        return weights, gradient

    def _updates_for(self, backend: Any) -> Any:
        """The updates object (and caches) of `backend` for this optimizer."""
        if backend is NUMPY:
            return self._cpu
        if self._dev is None or self._dev.backend is not backend:
            self._dev = DeviceUpdates(self, backend)
        return self._dev

    def step_many(self, keys: Sequence[KeyT], weights: Sequence[Any],
                  gradients: Sequence[Any], *, lr_scale: float = 1.0) -> None:
        """Update many tensors in one call (same numbers as calling one by one, in order).

        NumPy tensors are validated together, then updated in one loop outside the GIL.
        A call with the same keys as the last one (a training loop's) reruns that call's
        task table and gathered state once C code has checked the new arrays and that
        the state is the same (`_batch.Batch`).
        """
        keys, weights, gradients = list(keys), list(weights), list(gradients)
        if self._keyed or self._group_keyed:
            self._step_many_keyed(keys, weights, gradients, lr_scale)
            return
        if self._frozen_any and not self._on_gpu:
            keys, weights, gradients = self._drop_frozen(keys, weights, gradients)
        self._step_many(keys, weights, gradients, lr_scale)

    def _drop_frozen(self, keys: List[KeyT], weights: List[Any],
                     gradients: List[Any]) -> Tuple[List[KeyT], List[Any], List[Any]]:
        """Zero the host gradients of frozen keys (validated first); the rest."""
        if not len(keys) == len(weights) == len(gradients):
            raise ValueError(f"step_many: {len(keys)} keys, {len(weights)} weights and "
                             f"{len(gradients)} gradients")
        hyper_for = self._hyper_for
        frozen = [i for i, key in enumerate(keys) if hyper_for(key).frozen
                  and type(weights[i]) is numpy.ndarray and not is_empty(gradients[i])]
        if not frozen:
            return keys, weights, gradients
        for i in frozen:
            _kernels.check_pair(keys[i], weights[i], gradients[i])
        for i in frozen:
            _kernels.zero_gradient_of(keys[i], weights[i], gradients[i])
        rest = sorted(set(range(len(keys))) - set(frozen))
        return [keys[i] for i in rest], [weights[i] for i in rest], [gradients[i] for i in rest]

    def _step_many_keyed(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                         lr_scale: float) -> None:
        """step_many with hyperparameters read per key: one step_many per group of keys
        whose values agree (empty gradients skipped before, as Thinc 9 does)."""
        if not len(keys) == len(weights) == len(gradients):
            raise ValueError(f"step_many: {len(keys)} keys, {len(weights)} weights and "
                             f"{len(gradients)} gradients")
        if len(set(keys)) != len(keys):
            raise ValueError("step_many: each key may appear once per call")
        step, last_score = self._step, self._last_score
        batches: Dict[Tuple[Any, ...], List[int]] = {}
        for i, (key, gradient) in enumerate(zip(keys, gradients)):
            if is_empty(gradient):
                continue
            self.check_pair(key, weights[i], gradient)  # all before any group updates
            group = group_for(self._groups, self.path_of(key)) if self._groups else None
            values = tuple(check_value(name, read_step_schedule(schedule, step, key=key,
                                                                last_score=last_score))
                           for source in (self, group) if source is not None
                           for name, schedule in source._keyed.items())
            batches.setdefault((group, values), []).append(i)
        for (group, values), index in batches.items():
            kind = self._hyper.kind
            names = [(source, name) for source in (self, group) if source is not None
                     for name in source._keyed]
            for (source, name), value in zip(names, values):
                setattr(source._hyper, name, value)
            self._after_kind(kind)  # the groups take them
            picked = ([keys[i] for i in index], [weights[i] for i in index],
                      [gradients[i] for i in index])
            if self._frozen_any and not self._on_gpu:
                picked = self._drop_frozen(*picked)
            self._step_many(*picked, lr_scale)

    def _step_many(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                   lr_scale: float) -> None:
        cpu = None if self._stale or self._on_gpu else self._cpu
        if cpu is not None and cpu.step_many_again(keys, weights, gradients, lr_scale):
            return
        if not len(keys) == len(weights) == len(gradients):
            raise ValueError(f"step_many: {len(keys)} keys, {len(weights)} weights and "
                             f"{len(gradients)} gradients")
        if len(set(keys)) != len(keys):
            raise ValueError("step_many: each key may appear once per call")
        if cpu is not None and cpu.step_many_known(keys, weights, gradients, lr_scale):
            return  # (it takes no empty gradient nor an unresolved or frozen key)
        if any_empty(gradients):  # no-ops, as in single calls
            todo = [i for i, g in enumerate(gradients) if not is_empty(g)]
            keys, weights = [keys[i] for i in todo], [weights[i] for i in todo]
            gradients = [gradients[i] for i in todo]
            if cpu is not None and cpu.step_many_known(keys, weights, gradients, lr_scale):
                return
        if (self._on_gpu and not self._stale and self._dev is not None
                and self._dev.step_many_known(keys, weights, gradients, lr_scale)):
            return
        backends = [self.check_pair(k, w, g) for k, w, g in zip(keys, weights, gradients)]
        if any(b is not NUMPY for b in backends):
            if all(b is backends[0] for b in backends):
                self._updates_for(backends[0]).step_many(keys, weights, gradients, lr_scale)
                self._on_gpu = True
            else:  # host and device tensors in one call: one by one
                for k, w, g in zip(keys, weights, gradients):
                    self(k, w, g, lr_scale=lr_scale)
            return
        hypers = [self._hyper_for(k) for k in keys]
        if any(h.frozen for h in hypers):  # (frozen device keys met host ones: rare)
            keys, weights, gradients = self._drop_frozen(keys, weights, gradients)
            hypers = [self._hyper_for(k) for k in keys]
        states = [self._state_for(k, NUMPY, w) for k, w in zip(keys, weights)]
        counts = [self.nr_update.get(k, 0) + 1 for k in keys]
        batch = self._cpu.step_many(hypers, keys, weights, gradients, states, counts,
                                    lr_scale)
        skipped = dict(batch.outcomes())
        if skipped and not batch.written:  # raise mode: nothing was written
            i, outcome = next(iter(skipped.items()))
            self._nonfinite_found(keys[i], outcome, weights[i])
        for i, (key, w, state, t) in enumerate(zip(keys, weights, states, counts)):
            if i not in skipped:
                self._commit(key, w.shape, state, t)
        for i, outcome in skipped.items():
            self._nonfinite_found(keys[i], outcome, weights[i])
        self._cpu.keep(batch)

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
        shape = self._shapes.get(key)
        if shape is not None and weights.shape != shape:
            raise ValueError(shape_error(key, weights.shape, shape))
        return backend

    def _state_for(self, key: KeyT, backend: Any, weights: Any) -> Dict[str, Any]:
        """The key's state arrays, allocating (but not yet storing) any that are missing
        (none for a frozen key)."""
        hyper = self._hyper_for(key)
        if hyper.frozen:
            return {"mom1": None, "mom2": None, "average": None, "slow": None}
        needs_moments = hyper.kind != "sgd"
        state = {
            "mom1": self.mom1.get(key),
            "mom2": self.mom2.get(key),
            "average": None if self.averages is None else self.averages.get(key),
            "slow": self.lookahead.get(key),
        }
        for name, array in state.items():
            if array is not None and backend_for(array) is not backend:
                where = "to_gpu()" if backend is not NUMPY else "to_cpu()"
                raise TypeError(
                    f"key {key!r}: the optimizer's {name} is a {backend_for(array).name} "
                    f"array but the weights are {backend.name}; call optimizer.{where} first"
                )
        if needs_moments and state["mom1"] is None:
            state["mom1"] = backend.zeros_like(weights)
            state["mom2"] = backend.zeros_like(weights)
        if self.averages is not None and state["average"] is None:
            state["average"] = backend.zeros_like(weights)
        if hyper.lookahead_k > 0 and state["slow"] is None:
            state["slow"] = backend.copy(weights)
        return state

    def _commit(self, key: KeyT, shape: Tuple[int, ...], state: Dict[str, Any], t: int) -> None:
        if self._hyper_for(key).frozen:
            return
        for name, store in (("mom1", self.mom1), ("mom2", self.mom2),
                            ("average", self.averages), ("slow", self.lookahead)):
            if state[name] is not None and store is not None:
                store[key] = state[name]
        self._shapes[key] = tuple(shape)
        self._cpu.forget()
        self.nr_update[key] = t
        self._stale.discard(key)

    def remap_keys(self, mapping: Dict[KeyT, KeyT]) -> "Optimizer":
        """Rename keys (Thinc's (model.id, name) ids change between processes); returns self."""
        self._sync()  # skips a device has yet to report, under the names they had
        renamed = {mapping.get(key, key) for key in self._shapes}
        if len(renamed) != len(self._shapes):
            raise ValueError("remap_keys: two keys would get the same name")
        for store in self._state_dicts() + [self.nr_update, self._shapes, self._skipped,
                                            self._paths]:
            items = [(mapping.get(k, k), v) for k, v in store.items()]
            store.clear()
            store.update(items)
        self._stale = {mapping.get(k, k) for k in self._stale}
        if self._key_hyper is not None:
            self._key_hyper.clear()
        self._forget_launches()
        return self

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
        return {name: getattr(self, name) for name in _SLOTS
                if name not in ("_cpu", "_dev")}

    def __copy__(self) -> "Optimizer":
        """An independent copy, as copy.deepcopy: a shallow one would share the moment
        arrays, which both would then update in place."""
        return copy.deepcopy(self)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._cpu, self._dev = CpuUpdates(self), None
        self._register()

    def _sync(self) -> None:
        """Bring counts a device keeps (skip mode) up to date on the host."""
        if self._dev is not None:
            sync = getattr(self._dev, "sync", None)
            if sync is not None:
                sync()

    def _settings_changed(self) -> None:
        """A key's settings may differ now (bound anew, another nonfinite mode): every
        key through the general path once, the backends' caches dropped."""
        self._stale.update(self._shapes)
        self._forget_launches()

    def _forget_launches(self) -> None:
        """Drop the backends' caches: prepared launches, the kept step_many batch
        (state moved or renamed)."""
        self._cpu.forget()
        if self._dev is not None:
            self._dev.forget()

    # ------------------------------------------------------------ devices

    def _state_dicts(self) -> List[Dict[KeyT, Any]]:
        return [d for d in (self.mom1, self.mom2, self.averages, self.lookahead) if d is not None]

    def to_gpu(self) -> "Optimizer":
        """Move all held state (moments, averages, lookahead weights) to the GPU."""
        backend = get_gpu_backend()
        ensure_available = getattr(backend, "ensure_available", None)
        if ensure_available is not None:  # fail here, not at the first update
            ensure_available()
        for store in self._state_dicts():
            for key, array in store.items():
                store[key] = backend.from_host(backend_for(array).to_host(array))
        self._forget_launches()
        self._on_gpu = True
        return self

    def to_cpu(self) -> "Optimizer":
        """Move all held state to host memory (NumPy arrays)."""
        for store in self._state_dicts():
            for key, array in store.items():
                store[key] = numpy.ascontiguousarray(backend_for(array).to_host(array))
        self._forget_launches()
        self._on_gpu = False
        return self

    # ------------------------------------------------------------ state on disk

    def state(self) -> serialize.OptimizerState:
        """Everything that determines future updates, as plain data on the host."""
        self._sync()
        hyper = self._hyper
        keys = []
        for key, shape in self._shapes.items():
            if not self.nr_update.get(key, 0):  # a device key whose first update was
                continue                         # skipped: as on the host, no state
            arrays = {}
            for name, store in zip(serialize.STATE_ARRAYS, (self.mom1, self.mom2,
                                                            self.averages, self.lookahead)):
                array = None if store is None else store.get(key)
                if array is not None:
                    array = numpy.ascontiguousarray(backend_for(array).to_host(array))
                arrays[name] = array
            keys.append(serialize.KeyState(key, shape, int(self.nr_update[key]), arrays))
        return serialize.OptimizerState(
            kind=hyper.kind, ops=self.ops, step=self._step, last_score=self._last_score,
            hyperparameters={name: getattr(hyper, name) for name in HYPERPARAMETERS},
            flags={"L2_is_weight_decay": bool(hyper.L2_is_weight_decay),
                   "use_radam": bool(hyper.use_radam),
                   "use_averages": self.averages is not None,
                   "lookahead_k": int(hyper.lookahead_k)},
            schedules={name: (schedule, self._schedule_start[name])
                       for name, schedule in self.schedules.items()},
            keys=keys,
            groups=self._group_states(),
            nonfinite=self.nonfinite, max_consecutive_skips=self._skip_limit,
            skip_run=self._skip_run, skipped=list(self._skipped.items()),
            paths=list(self._paths.items()))

    def _group_states(self) -> List[serialize.GroupState]:
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
        stores = dict(zip(serialize.STATE_ARRAYS, (opt.mom1, opt.mom2, opt.averages,
                                                    opt.lookahead)))
        for record in state.keys:
            for name, array in record.arrays.items():
                if array is None and needed[name]:
                    raise serialize.StateError(f"key {record.key!r}: {name} is missing")
                if array is not None and stores[name] is not None:
                    stores[name][record.key] = array
            opt._shapes[record.key] = tuple(record.shape)
            opt.nr_update[record.key] = record.nr_update
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
        for name in _SLOTS:
            if name not in ("_cpu", "_dev"):
                setattr(self, name, getattr(loaded, name))
        self._cpu, self._dev = CpuUpdates(self), None  # over the new dicts
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

    def __repr__(self) -> str:
        rate = "per-key" if "learn_rate" in self._keyed else f"{self._hyper.learn_rate:g}"
        return (f"<optim.Optimizer {self._hyper.kind} learn_rate={rate} "
                f"keys={len(self._shapes)} step={self._step}>")


def _ops_name(ops: Any) -> Optional[str]:
    """Accept None, a backend name, or a Thinc Ops object; keep its name."""
    if ops is None:
        return None
    name = ops if isinstance(ops, str) else getattr(ops, "name", None)
    known = {"numpy", "cupy", "cpu", "gpu", "apple", "bigendian", "mps"}
    if name not in known:
        raise ValueError(f"ops must be None, one of {sorted(known)} or a Thinc Ops, got {ops!r}")
    return name


# Every slot of the class and its base, for copies and from_bytes.
_SLOTS = tuple(name for cls in Optimizer.__mro__ for name in getattr(cls, "__slots__", ())
               if name != "__weakref__")
