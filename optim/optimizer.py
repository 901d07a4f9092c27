"""The Optimizer: Thinc's API and numbers over fused kernels, with exact save and resume.

The class holds state (moments, averages, lookahead weights, counts, schedules); the
math lives in `optim._kernels` (CPU) and `optim._kernels_cuda` (GPU).
"""
import itertools
import math
import numbers
import operator
from collections import defaultdict
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy

from . import _device, _kernels
from ._kernels_cuda import check_device_pair as _check_device_pair
from .backends import NUMPY, backend_for, get_gpu_backend
from .registry import registry
from .schedules import Schedule, sequence

KeyT = Hashable
FloatOrSeq = Union[float, List[float], Iterable[float], Schedule]

SGD_DEFAULTS: Dict[str, Any] = {
    "L2": 0.0,
    "L2_is_weight_decay": True,
    "grad_clip": 1.0,
    "use_averages": True,
    "lookahead_k": 0,
    "lookahead_alpha": 0.5,
}
ADAM_DEFAULTS: Dict[str, Any] = {
    **SGD_DEFAULTS,
    "learn_rate": 0.001,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-08,
}
RADAM_DEFAULTS: Dict[str, Any] = {**ADAM_DEFAULTS, "weight_decay": 0.0}

# Schedulable hyperparameters and the range each value must lie in.
HYPERPARAMETERS: Dict[str, Tuple[float, float, str]] = {
    "learn_rate": (0.0, math.inf, ">= 0"),
    "beta1": (0.0, math.nextafter(1.0, 0.0), "in [0, 1)"),
    "beta2": (0.0, math.nextafter(1.0, 0.0), "in [0, 1)"),
    "eps": (0.0, math.inf, ">= 0"),
    "L2": (0.0, math.inf, ">= 0"),
    "grad_clip": (0.0, math.inf, ">= 0 (0 turns clipping off)"),
    "weight_decay": (0.0, math.inf, ">= 0"),
    "lookahead_alpha": (0.0, 1.0, "in [0, 1]"),
}


@registry.optimizers("SGD.v1")
def SGD(learn_rate: FloatOrSeq, *, ops: Any = None, L2: FloatOrSeq = SGD_DEFAULTS["L2"],
        grad_clip: FloatOrSeq = SGD_DEFAULTS["grad_clip"],
        L2_is_weight_decay: bool = SGD_DEFAULTS["L2_is_weight_decay"],
        use_averages: bool = SGD_DEFAULTS["use_averages"],
        lookahead_k: int = SGD_DEFAULTS["lookahead_k"],
        lookahead_alpha: FloatOrSeq = SGD_DEFAULTS["lookahead_alpha"],
        schedules: Optional[Dict[str, Any]] = None) -> "Optimizer":
    """Plain stochastic gradient descent."""
    return Optimizer(learn_rate, ops=ops, L2=L2, grad_clip=grad_clip,
                     L2_is_weight_decay=L2_is_weight_decay, use_averages=use_averages,
                     beta1=0.0, beta2=0.0, lookahead_k=lookahead_k,
                     lookahead_alpha=lookahead_alpha, schedules=schedules)


@registry.optimizers("Adam.v1")
def Adam(learn_rate: FloatOrSeq = ADAM_DEFAULTS["learn_rate"], *, ops: Any = None,
         L2: FloatOrSeq = ADAM_DEFAULTS["L2"], beta1: FloatOrSeq = ADAM_DEFAULTS["beta1"],
         beta2: FloatOrSeq = ADAM_DEFAULTS["beta2"], eps: FloatOrSeq = ADAM_DEFAULTS["eps"],
         grad_clip: FloatOrSeq = ADAM_DEFAULTS["grad_clip"],
         L2_is_weight_decay: bool = ADAM_DEFAULTS["L2_is_weight_decay"],
         use_averages: bool = ADAM_DEFAULTS["use_averages"],
         lookahead_k: int = ADAM_DEFAULTS["lookahead_k"],
         lookahead_alpha: FloatOrSeq = ADAM_DEFAULTS["lookahead_alpha"],
         schedules: Optional[Dict[str, Any]] = None) -> "Optimizer":
    """Adam, with Thinc's defaults (clipping at 1.0, parameter averages on)."""
    return Optimizer(learn_rate, ops=ops, L2=L2, beta1=beta1, beta2=beta2, eps=eps,
                     grad_clip=grad_clip, L2_is_weight_decay=L2_is_weight_decay,
                     use_averages=use_averages, lookahead_k=lookahead_k,
                     lookahead_alpha=lookahead_alpha, schedules=schedules)


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
          schedules: Optional[Dict[str, Any]] = None) -> "Optimizer":
    """Rectified Adam (Liu et al. 2019), fused into one pass."""
    return Optimizer(learn_rate, ops=ops, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, L2=L2, L2_is_weight_decay=L2_is_weight_decay,
                     grad_clip=grad_clip, use_averages=use_averages, use_radam=True,
                     lookahead_k=lookahead_k, lookahead_alpha=lookahead_alpha,
                     schedules=schedules)


class Optimizer:
    """SGD, Adam or RAdam with Thinc's semantics; updates weights in place.

    Call it as Thinc's `Model.finish_update` does: `optimizer(key, weights, gradient)`.
    """

    __slots__ = ("mom1", "mom2", "averages", "lookahead", "nr_update", "schedules",
                 "ops", "_hyper", "_shapes", "_schedule_start", "_step", "_last_score",
                 "_on_gpu", "_stale", "_plans", "_batches", "_batch", "__weakref__")

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
                 schedules: Optional[Dict[str, Any]] = None) -> None:
        self.mom1: Dict[KeyT, Any] = {}
        self.mom2: Dict[KeyT, Any] = {}
        self.averages: Optional[Dict[KeyT, Any]] = {} if use_averages else None
        self.lookahead: Dict[KeyT, Any] = {}  # the slow weights
        self.nr_update: Dict[KeyT, int] = defaultdict(int)
        self.schedules: Dict[str, Any] = {}
        self.ops = _ops_name(ops)
        self._hyper = _kernels.Hyper()
        self._shapes: Dict[KeyT, Tuple[int, ...]] = {}
        self._schedule_start: Dict[str, int] = {}
        self._step = 0
        self._last_score: Optional[Tuple[int, float]] = None
        self._on_gpu = False
        self._stale: set = set()  # keys whose state misses arrays the settings now need
        self._plans: Dict[KeyT, Any] = {}  # device keys: prepared launches (_kernels_cuda.Plan)
        self._batches: Dict[Any, Any] = {}  # step_many's device tables per group
        self._batch: Optional[_kernels.Batch] = None  # the last CPU step_many, to rerun
        self._hyper.use_radam = bool(use_radam)
        self._hyper.L2_is_weight_decay = bool(L2_is_weight_decay)
        self.lookahead_k = lookahead_k
        values = {"learn_rate": learn_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
                  "L2": L2, "grad_clip": grad_clip, "weight_decay": weight_decay,
                  "lookahead_alpha": lookahead_alpha}
        for name, value in values.items():
            self._set_hyperparameter(name, value)
        for name, schedule in (schedules or {}).items():
            self._add_schedule(name, schedule, start=-1)

    # ------------------------------------------------------------ hyperparameters

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        """A number, or a schedule whose value at the current step is taken now (Thinc)."""
        kind = self._hyper.kind
        self._assign(name, value)
        self._after_kind(kind)

    def _after_kind(self, previous: str) -> None:
        """If the update kind changed (e.g. beta1 scheduled up from 0), every key needs
        the state arrays of the new kind: send them through the general path once."""
        if self._hyper.kind != previous:
            self._stale.update(self._shapes)
            self._batch = None

    def _assign(self, name: str, value: Any) -> None:
        if isinstance(value, numbers.Real):
            self.schedules.pop(name, None)
            self._schedule_start.pop(name, None)
            setattr(self._hyper, name, _check_value(name, value))
        else:
            self._add_schedule(name, value, start=0)

    def _add_schedule(self, name: str, schedule: Any, *, start: int) -> None:
        """Follow `schedule` for `name`. start=0: its first value applies now; start=-1:
        from the next `step_schedules()` on (the `schedules=` argument's behaviour)."""
        if name not in HYPERPARAMETERS:
            raise ValueError(
                f"cannot schedule {name!r}: schedulable are {', '.join(HYPERPARAMETERS)}"
            )
        if isinstance(schedule, (list, tuple)):
            if not schedule:
                raise ValueError(f"invalid schedule for {name!r}: the list is empty")
            schedule = sequence([_check_value(name, v) for v in schedule])
        if isinstance(schedule, Schedule):
            self._schedule_start[name] = schedule._cursor + start - self._step
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
                first = _check_value(name, next(schedule))
            except StopIteration:
                raise ValueError(f"invalid schedule for {name!r}: it yields no values") from None
            if start == 0:
                setattr(self._hyper, name, first)
            else:  # checked now, used at the next step_schedules()
                schedule = itertools.chain([first], schedule)
        self.schedules[name] = schedule
        if isinstance(schedule, Schedule):
            self._evaluate_schedules((name,))

    def _evaluate_schedules(self, names: Iterable[str]) -> None:
        """Set each named hyperparameter to its schedule's value at the current step."""
        for name in names:
            schedule = self.schedules[name]
            index = self._step + self._schedule_start[name]
            if isinstance(schedule, Schedule) and index >= 0:
                value = schedule(index, last_score=self._last_score)
                setattr(self._hyper, name, _check_value(name, value))

    def step_schedules(self) -> None:
        """Advance the step: every scheduled hyperparameter takes its next value."""
        kind = self._hyper.kind
        self._step += 1
        for name, schedule in self.schedules.items():
            if not isinstance(schedule, Schedule):
                try:
                    value = next(schedule)
                except StopIteration:  # exhausted: keep the last value, as Thinc does
                    continue
                setattr(self._hyper, name, _check_value(name, value))
        self._evaluate_schedules(self.schedules)
        self._after_kind(kind)

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
        kind = self._hyper.kind
        self._last_score = (self._step, float(score))
        self._evaluate_schedules(self.schedules)
        self._after_kind(kind)

    def _hyper_get(name: str):  # noqa: N805 - builds properties below
        def get(self: "Optimizer") -> float:
            return getattr(self._hyper, name)

        def set(self: "Optimizer", value: FloatOrSeq) -> None:
            self._set_hyperparameter(name, value)

        return property(get, set, doc=f"The current {name} (set a number or a schedule).")

    learn_rate = _hyper_get("learn_rate")
    beta1 = b1 = _hyper_get("beta1")
    beta2 = b2 = _hyper_get("beta2")
    eps = _hyper_get("eps")
    L2 = _hyper_get("L2")
    grad_clip = _hyper_get("grad_clip")
    weight_decay = _hyper_get("weight_decay")
    lookahead_alpha = _hyper_get("lookahead_alpha")
    del _hyper_get

    @property
    def lookahead_k(self) -> int:
        return self._hyper.lookahead_k

    @lookahead_k.setter
    def lookahead_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"lookahead_k must be an integer >= 0, got {k!r}")
        self._hyper.lookahead_k = int(k)
        self._stale.update(self._shapes)
        self._batch = None

    @property
    def use_radam(self) -> bool:
        return self._hyper.use_radam

    @property
    def L2_is_weight_decay(self) -> bool:
        return self._hyper.L2_is_weight_decay

    @property
    def use_averages(self) -> bool:
        return self.averages is not None

    # ------------------------------------------------------------ updates

    def __call__(self, key: KeyT, weights: Any, gradient: Any, *,
                 lr_scale: float = 1.0) -> Tuple[Any, Any]:
        """Update `weights` in place from `gradient` and zero `gradient`; returns both."""
        shape = self._shapes.get(key)
        if shape is not None and not self._stale:
            if not self._on_gpu:
                if (type(weights) is numpy.ndarray and type(gradient) is numpy.ndarray
                        and gradient.size):
                    if weights.shape != shape:
                        raise ValueError(_shape_error(key, weights.shape, shape))
                    t = self.nr_update[key] + 1
                    _kernels.step(self._hyper, key, weights, gradient, self.mom1.get(key),
                                  self.mom2.get(key),
                                  None if self.averages is None else self.averages.get(key),
                                  self.lookahead.get(key), t, lr_scale)
                    self.nr_update[key] = t
                    return weights, gradient
            else:  # a device key with a prepared launch: no allocation, no host read
                plan = self._plans.get(key)
                if (plan is not None and type(weights) is plan.array_type
                        and type(gradient) is plan.array_type and gradient.size
                        and plan.holds(self.mom1.get(key), self.mom2.get(key),
                                       None if self.averages is None else self.averages.get(key),
                                       self.lookahead.get(key))):
                    t = self.nr_update[key] + 1
                    plan.backend.launch(plan, self._hyper, key, weights, gradient, t, lr_scale)
                    self.nr_update[key] = t
                    return weights, gradient
        return self._update(key, weights, gradient, lr_scale)

    def _update(self, key: KeyT, weights: Any, gradient: Any, lr_scale: float) -> Tuple[Any, Any]:
        """The general path: first updates of a key, device arrays, empty gradients."""
        if _is_empty(gradient):  # Thinc returns at once, whatever the weights are
            return weights, gradient
        backend = self._check_pair(key, weights, gradient)
        if backend is not NUMPY:
            _refuse_capture(backend, f"key {key!r}: this update prepares the key's launch "
                            "(its first, or the first after to_gpu(), replaced state or a "
                            "changed hyperparameter) and")
        state = self._state_for(key, backend, weights)
        t = self.nr_update.get(key, 0) + 1
        if backend is NUMPY:
            _kernels.step(self._hyper, key, weights, gradient, state["mom1"], state["mom2"],
                          state["average"], state["slow"], t, lr_scale)
            self._commit(key, weights.shape, state, t)
            return weights, gradient
        plan = self._plan(backend, key, weights, state)
        backend.launch(plan, self._hyper, key, weights, gradient, t, lr_scale)
        self._commit(key, weights.shape, state, t)
        self._plans[key] = plan
        self._on_gpu = True
        return weights, gradient

    def _plan(self, backend: Any, key: KeyT, weights: Any, state: Dict[str, Any]) -> Any:
        return backend.plan(key, self._hyper.kind, self.averages is not None, weights,
                            state["mom1"], state["mom2"], state["average"], state["slow"])

    def step_many(self, keys: Sequence[KeyT], weights: Sequence[Any],
                  gradients: Sequence[Any], *, lr_scale: float = 1.0) -> None:
        """Update many tensors in one call (same numbers as calling one by one, in order).

        NumPy tensors are validated together, then updated in one loop outside the GIL.
        A call with the same keys as the last one (a training loop's) reruns that call's
        task table and gathered state once C code has checked the new arrays and that
        the state is the same (`_kernels.Batch`).
        """
        keys, weights, gradients = list(keys), list(weights), list(gradients)
        batch = self._batch
        if (batch is not None and not self._stale and not self._on_gpu
                and batch.again(self._hyper, keys, weights, gradients, self.nr_update,
                                lr_scale, self._batch_sources())):
            return
        if not len(keys) == len(weights) == len(gradients):
            raise ValueError(f"step_many: {len(keys)} keys, {len(weights)} weights and "
                             f"{len(gradients)} gradients")
        if len(set(keys)) != len(keys):
            raise ValueError("step_many: each key may appear once per call")
        if self._step_many_known(keys, weights, gradients, lr_scale):
            return  # (it takes no empty gradient)
        if _any_empty(gradients):  # no-ops, as in single calls
            todo = [i for i, g in enumerate(gradients) if not _is_empty(g)]
            keys, weights = [keys[i] for i in todo], [weights[i] for i in todo]
            gradients = [gradients[i] for i in todo]
            if self._step_many_known(keys, weights, gradients, lr_scale):
                return
        if self._step_many_device_known(keys, weights, gradients, lr_scale):
            return
        backends = [self._check_pair(k, w, g) for k, w, g in zip(keys, weights, gradients)]
        if any(b is not NUMPY for b in backends):
            if all(b is backends[0] for b in backends):
                self._step_many_device(backends[0], keys, weights, gradients, lr_scale)
            else:  # host and device tensors in one call: one by one
                for k, w, g in zip(keys, weights, gradients):
                    self(k, w, g, lr_scale=lr_scale)
            return
        states = [self._state_for(k, NUMPY, w) for k, w in zip(keys, weights)]
        counts = [self.nr_update.get(k, 0) + 1 for k in keys]
        batch = _kernels.step_many(self._hyper, keys, weights, gradients,
                                   [s["mom1"] for s in states], [s["mom2"] for s in states],
                                   [s["average"] for s in states],
                                   [s["slow"] for s in states], counts, lr_scale)
        for key, w, state, t in zip(keys, weights, states, counts):
            self._commit(key, w.shape, state, t)
        self._keep(batch)

    def _step_many_device(self, backend: Any, keys: List[KeyT], weights: List[Any],
                          gradients: List[Any], lr_scale: float) -> None:
        """step_many on device arrays (already validated): one launch per group of
        tensors sharing dtype and kernel, plus one clip norm launch per group."""
        _refuse_capture(backend, "step_many")
        averages = self.averages if self.averages is not None else {}
        plans, new = [], []
        for key, w in zip(keys, weights):
            plan = self._plans.get(key)
            if (plan is None or key in self._stale
                    or not plan.holds(self.mom1.get(key), self.mom2.get(key),
                                      averages.get(key), self.lookahead.get(key))):
                state = self._state_for(key, backend, w)
                plan = self._plan(backend, key, w, state)
                new.append((key, w.shape, state))
            plans.append(plan)
        counts = [self.nr_update.get(key, 0) + 1 for key in keys]
        backend.launch_many(self._batches, self._hyper, keys, weights, gradients, plans,
                            counts, lr_scale)
        for key, shape, state in new:
            self._commit(key, shape, state, 0)
        for key, plan, t in zip(keys, plans, counts):
            self._plans[key] = plan
            self.nr_update[key] = t
        self._on_gpu = True

    def _step_many_device_known(self, keys: List[KeyT], weights: List[Any],
                                gradients: List[Any], lr_scale: float) -> bool:
        """The hot path of step_many on the device: keys with prepared launches whose
        state is unchanged. The backend checks every array against its plan before
        launching; returns False (having touched nothing) when the general path is needed."""
        if not self._on_gpu or self._stale or not keys:
            return False
        plans = list(map(self._plans.get, keys))
        if None in plans:
            return False
        array_type = {plans[0].array_type}
        if set(map(type, weights)) != array_type or set(map(type, gradients)) != array_type:
            return False
        expected = plans[0].backend.expected(self._batches, plans)
        averages = self.averages if self.averages is not None else {}
        if not (_device.same_state(self.mom1, keys, expected.m)
                and _device.same_state(self.mom2, keys, expected.v)
                and _device.same_state(averages, keys, expected.avg)
                and _device.same_state(self.lookahead, keys, expected.slow)):
            return False  # a state array was replaced: plan again
        nr_update = self.nr_update
        counts = [nr_update[key] + 1 for key in keys]
        plans[0].backend.launch_many(self._batches, self._hyper, keys, weights, gradients,
                                     plans, counts, lr_scale)
        nr_update.update(zip(keys, counts))
        return True

    def _step_many_known(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                         lr_scale: float) -> bool:
        """The hot path of step_many: NumPy tensors of known keys with complete state.

        The kernels validate dtypes, contiguity and every array's shape; returns False
        (having touched nothing) when the general path is needed.
        """
        if self._stale or self._on_gpu:
            return False
        # One pass per dict, each in C (map): the cost per key is its hash lookups.
        if not _kernels.known_shapes(list(map(self._shapes.get, keys)), weights, gradients):
            return False
        nr_update = self.nr_update
        counts = [t + 1 for t in map(nr_update.__getitem__, keys)]
        no_state = [None] * len(keys)
        batch = _kernels.step_many(
            self._hyper, keys, weights, gradients,
            list(map(self.mom1.get, keys)) if self.mom1 else no_state,
            list(map(self.mom2.get, keys)) if self.mom2 else no_state,
            list(map(self.averages.get, keys)) if self.averages else no_state,
            list(map(self.lookahead.get, keys)) if self.lookahead else no_state,
            counts, lr_scale)
        nr_update.update(zip(keys, counts))
        self._keep(batch)
        return True

    def _batch_sources(self) -> Tuple[Any, ...]:
        """The dicts a kept step_many batch took its state arrays from."""
        return (self.mom1, self.mom2, self.averages, self.lookahead, self._shapes)

    def _keep(self, batch: "_kernels.Batch") -> None:
        """Keep a CPU step_many batch whose state arrays are the ones the dicts hold now,
        to run again when the same keys come next. The optimizer's own changes of the
        state drop it (_commit, remap_keys, to_gpu/to_cpu, from_bytes, the update kind,
        lookahead_k); Batch.again also checks that the dicts still map the keys to its
        arrays, so an entry a user replaced is seen too."""
        self._batch = batch.bind(self._batch_sources(), self.nr_update)

    def _check_pair(self, key: KeyT, weights: Any, gradient: Any) -> Any:
        """Validate an update's arrays before anything is touched; return their backend."""
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
        if backend is NUMPY:
            _kernels.check_pair(key, weights, gradient)
        else:
            _check_device_pair(key, weights, gradient)
        shape = self._shapes.get(key)
        if shape is not None and weights.shape != shape:
            raise ValueError(_shape_error(key, weights.shape, shape))
        return backend

    def _state_for(self, key: KeyT, backend: Any, weights: Any) -> Dict[str, Any]:
        """The key's state arrays, allocating (but not yet storing) any that are missing."""
        needs_moments = self._hyper.kind != "sgd"
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
        if self._hyper.lookahead_k > 0 and state["slow"] is None:
            state["slow"] = backend.copy(weights)
        return state

    def _commit(self, key: KeyT, shape: Tuple[int, ...], state: Dict[str, Any], t: int) -> None:
        for name, store in (("mom1", self.mom1), ("mom2", self.mom2),
                            ("average", self.averages), ("slow", self.lookahead)):
            if state[name] is not None and store is not None:
                store[key] = state[name]
        self._shapes[key] = tuple(shape)
        self._batch = None
        self.nr_update[key] = t
        self._stale.discard(key)

    def remap_keys(self, mapping: Dict[KeyT, KeyT]) -> "Optimizer":
        """Rename keys (Thinc's (model.id, name) ids change between processes); returns self."""
        renamed = {mapping.get(key, key) for key in self._shapes}
        if len(renamed) != len(self._shapes):
            raise ValueError("remap_keys: two keys would get the same name")
        for store in self._state_dicts() + [self.nr_update, self._shapes]:
            items = [(mapping.get(k, k), v) for k, v in store.items()]
            store.clear()
            store.update(items)
        self._stale = {mapping.get(k, k) for k in self._stale}
        self._forget_launches()
        return self

    def __getstate__(self) -> Dict[str, Any]:
        """Copies (copy.deepcopy) leave out the prepared device launches, which hold
        compiled kernels: they are rebuilt at the copy's first update."""
        state = {name: getattr(self, name) for name in Optimizer.__slots__
                 if name != "__weakref__"}
        state["_plans"], state["_batches"], state["_batch"] = {}, {}, None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _forget_launches(self) -> None:
        """Drop prepared launches and the kept step_many batch (state moved or renamed)."""
        self._plans.clear()
        self._batches.clear()
        self._batch = None

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

    def to_dict(self) -> Dict[str, Any]:
        from .serialize import optimizer_to_dict

        return optimizer_to_dict(self)

    def to_bytes(self) -> bytes:
        """Everything that determines future updates, as msgpack bytes."""
        from .serialize import optimizer_to_bytes

        return optimizer_to_bytes(self)

    def from_bytes(self, data: bytes) -> "Optimizer":
        """Replace this optimizer's whole state with `data`'s; returns self."""
        from .serialize import optimizer_from_bytes

        loaded = optimizer_from_bytes(data, device_like=self)
        if loaded._hyper.kind != self._hyper.kind:
            raise ValueError(
                f"this state is for a {loaded._hyper.kind} optimizer, not {self._hyper.kind}; "
                "use optim.load(path) or Optimizer.from_bytes on a matching optimizer"
            )
        for name in Optimizer.__slots__:
            if name != "__weakref__":
                setattr(self, name, getattr(loaded, name))
        self._forget_launches()
        return self

    def to_disk(self, path: Any) -> None:
        """Write `to_bytes()` atomically: a crash mid-write leaves the old file intact."""
        from .serialize import write_atomic

        write_atomic(path, self.to_bytes())

    def from_disk(self, path: Any) -> "Optimizer":
        from .serialize import read_file

        return self.from_bytes(read_file(path))

    @classmethod
    def load(cls, path: Any) -> "Optimizer":
        """Build an optimizer from a saved state file, hyperparameters included."""
        from .serialize import optimizer_from_bytes, read_file

        return optimizer_from_bytes(read_file(path))

    def __repr__(self) -> str:
        return (f"<optim.Optimizer {self._hyper.kind} learn_rate={self.learn_rate:g} "
                f"keys={len(self._shapes)} step={self._step}>")


def _check_value(name: str, value: Any) -> float:
    low, high, rule = HYPERPARAMETERS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be finite and {rule}, got {value!r}")
    return value


_SIZE = operator.attrgetter("size")


def _any_empty(gradients: List[Any]) -> bool:
    try:
        return 0 in map(_SIZE, gradients)
    except AttributeError:
        return any(_is_empty(g) for g in gradients)


def _is_empty(gradient: Any) -> bool:
    """A gradient with no elements: Thinc's "nothing to do" (checked before anything else)."""
    return getattr(gradient, "size", None) == 0


def _ops_name(ops: Any) -> Optional[str]:
    """Accept None, a backend name, or a Thinc Ops object; keep its name."""
    if ops is None:
        return None
    name = ops if isinstance(ops, str) else getattr(ops, "name", None)
    known = {"numpy", "cupy", "cpu", "gpu", "apple", "bigendian", "mps"}
    if name not in known:
        raise ValueError(f"ops must be None, one of {sorted(known)} or a Thinc Ops, got {ops!r}")
    return name


def _shape_error(key: KeyT, got: Tuple[int, ...], expected: Tuple[int, ...]) -> str:
    return (f"key {key!r}: weights have shape {tuple(got)}, but this key was updated with "
            f"shape {tuple(expected)} before")


def _refuse_capture(backend: Any, what: str) -> None:
    """A device backend's RuntimeError when `what` would run under CUDA graph capture."""
    refuse = getattr(backend, "refuse_capture", None)
    if refuse is not None:
        refuse(what)
