"""A device backend's updates for one optimizer: the backend (CuPy's, or the tests' fake
one) compiles and launches; this object owns the optimizer's prepared launches (a `Plan`
per key) and `step_many`'s device tables, and the hot paths that reuse them."""
from typing import Any, Dict, List

from .. import _device
from ..hyperparams import KeyT


class DeviceUpdates:
    """`Updates` (see optim.backends) for one device backend's arrays."""

    __slots__ = ("backend", "opt", "plans", "tables")

    def __init__(self, opt: Any, backend: Any) -> None:
        self.backend = backend
        self.opt = opt
        self.plans: Dict[KeyT, Any] = {}   # key -> prepared launch (optim.backends.cupy.Plan)
        self.tables: Dict[Any, Any] = {}   # step_many's device tables per group

    @staticmethod
    def check(key: KeyT, weights: Any, gradient: Any) -> None:
        from .cupy import check_device_pair

        check_device_pair(key, weights, gradient)

    def _holds(self, plan: Any, key: KeyT) -> bool:
        opt = self.opt
        averages = opt.averages
        return plan.holds(opt.mom1.get(key), opt.mom2.get(key),
                          None if averages is None else averages.get(key),
                          opt.lookahead.get(key))

    def step_known(self, key: KeyT, weights: Any, gradient: Any, lr_scale: float) -> bool:
        """A key with a prepared launch whose state is unchanged: no allocation, no host
        read. False: take the general path."""
        plan = self.plans.get(key)
        if (plan is None or type(weights) is not plan.array_type
                or type(gradient) is not plan.array_type or not gradient.size
                or not self._holds(plan, key)):
            return False
        opt = self.opt
        t = opt.nr_update[key] + 1
        plan.backend.launch(plan, opt._hyper, key, weights, gradient, t, lr_scale)
        opt.nr_update[key] = t
        return True

    def refuse_capture(self, what: str) -> None:
        """The backend's RuntimeError when `what` (which allocates) would run under CUDA
        graph capture (backends without graphs have no `refuse_capture`)."""
        refuse = getattr(self.backend, "refuse_capture", None)
        if refuse is not None:
            refuse(what)

    def plan(self, key: KeyT, weights: Any, state: Dict[str, Any]) -> Any:
        opt = self.opt
        return self.backend.plan(key, opt._hyper.kind, opt.averages is not None, weights,
                                 state["mom1"], state["mom2"], state["average"],
                                 state["slow"])

    def step(self, key: KeyT, weights: Any, gradient: Any, state: Dict[str, Any], t: int,
             lr_scale: float) -> None:
        """One checked update with the key's (possibly new) state arrays."""
        plan = self.plan(key, weights, state)
        self.backend.launch(plan, self.opt._hyper, key, weights, gradient, t, lr_scale)
        self.plans[key] = plan

    def step_many_known(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                        lr_scale: float) -> bool:
        """Keys with prepared launches whose state is unchanged. The backend checks every
        array against its plan before launching; False (nothing touched) when the
        general path is needed."""
        if not keys:
            return False
        plans = list(map(self.plans.get, keys))
        if None in plans:
            return False
        array_type = {plans[0].array_type}
        if set(map(type, weights)) != array_type or set(map(type, gradients)) != array_type:
            return False
        opt = self.opt
        expected = plans[0].backend.expected(self.tables, plans)
        averages = opt.averages if opt.averages is not None else {}
        if not (_device.same_state(opt.mom1, keys, expected.m)
                and _device.same_state(opt.mom2, keys, expected.v)
                and _device.same_state(averages, keys, expected.avg)
                and _device.same_state(opt.lookahead, keys, expected.slow)):
            return False  # a state array was replaced: plan again
        nr_update = opt.nr_update
        counts = [nr_update[key] + 1 for key in keys]
        plans[0].backend.launch_many(self.tables, opt._hyper, keys, weights, gradients,
                                     plans, counts, lr_scale)
        nr_update.update(zip(keys, counts))
        return True

    def step_many(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                  lr_scale: float) -> None:
        """Checked tensors: one launch per group of tensors sharing dtype and kernel, plus
        one clip norm launch per group; new keys get their state first."""
        self.refuse_capture("step_many")
        opt = self.opt
        plans, new = [], []
        for key, w in zip(keys, weights):
            plan = self.plans.get(key)
            if plan is None or key in opt._stale or not self._holds(plan, key):
                state = opt._state_for(key, self.backend, w)
                plan = self.plan(key, w, state)
                new.append((key, w.shape, state))
            plans.append(plan)
        counts = [opt.nr_update.get(key, 0) + 1 for key in keys]
        self.backend.launch_many(self.tables, opt._hyper, keys, weights, gradients, plans,
                                 counts, lr_scale)
        for key, shape, state in new:
            opt._commit(key, shape, state, 0)
        for key, plan, t in zip(keys, plans, counts):
            self.plans[key] = plan
            opt.nr_update[key] = t

    def forget(self, key: Any = None) -> None:
        """State arrays were replaced, moved or renamed: drop the prepared launches."""
        self.plans.clear()
        self.tables.clear()
