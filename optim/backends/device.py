"""A device backend's updates for one optimizer: the backend (CuPy's, or the tests' fake
one) compiles and launches; this object owns the optimizer's prepared launches (a `Plan`
per key), `step_many`'s device tables, the hot paths that reuse them, and, in skip mode,
what the host knows of each key's update count (`Track`), which lives on the device.

Update counts in skip mode (docs/gpu.md, "Groups and the non-finite skip"): whether an
update was skipped is decided on the device, and the host never waits to learn it. Each
checked launch copies its verdicts into pinned host memory behind it, with an event;
the host reads them when the event has passed (`event.done`, which does not wait).
Until then a key's count is one of a few: the host uploads the coefficient rows of each
(its *window*) and the device picks the row of the count it holds. `opt.nr_update`
counts every call meanwhile; `sync()` (the optimizer calls it before saving, moving or
reading skip counts) waits for what is still in flight, takes the skipped calls off
`nr_update` and reports them to `opt._nonfinite_found`.
"""
from collections import deque
from typing import Any, Dict, List, Optional

from .. import _device
from .._kernels import NONFINITE_APPLY, NONFINITE_SKIP, OUTCOME_INF, OUTCOME_NAN
from .._kernels_cuda import GO as _GO, INF as _INF, NAN as _NAN
from ..hyperparams import KeyT

MAX_WINDOW = 8  # a skip-mode key's rows per call; a longer window waits (the one sync)


class Track:
    """Skip mode: what the host knows of one key's update count.

    `base`: the count after the launches whose verdicts were read; `pending`: the launches
    not read yet, oldest first, as (Record, position); `nan` / `inf`: skipped updates
    found and not yet reported; `reset`: the next launch sets the device count to `base`
    (a new track, or after an update whose count the host knew); `weights`: the key's
    last weights (for the report)."""

    __slots__ = ("base", "pending", "nan", "inf", "reset", "weights")

    def __init__(self, base: int) -> None:
        self.base, self.pending, self.nan, self.inf = base, deque(), 0, 0
        self.reset, self.weights = True, None

    def confirm(self) -> None:
        """Read the verdicts of the pending launches that have finished (no waiting)."""
        pending = self.pending
        while pending:
            record, position = pending[0]
            if not record.ready():
                return
            pending.popleft()
            status = record.host[position]
            if status == _GO:
                self.base += 1
            elif status == _NAN:
                self.nan += 1
            elif status == _INF:
                self.inf += 1
            else:
                raise RuntimeError(f"a skip-mode update's device count left its window "
                                   f"(status {status}); the optimizer's counts are lost")

    def settle(self) -> int:
        """Wait for the pending launches (a sync) and read them; the exact count."""
        for record, _ in self.pending:
            record.wait()
        self.confirm()
        return self.base


class DeviceUpdates:
    """`Updates` (see optim.backends) for one device backend's arrays."""

    __slots__ = ("backend", "opt", "plans", "tables", "tracks")

    def __init__(self, opt: Any, backend: Any) -> None:
        self.backend = backend
        self.opt = opt
        self.plans: Dict[KeyT, Any] = {}   # key -> prepared launch (optim.backends.cupy.Plan)
        self.tables: Dict[Any, Any] = {}   # step_many's device tables per group
        self.tracks: Dict[KeyT, Track] = {}  # skip mode: key -> what the host knows

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

    @staticmethod
    def _fits(plan: Any, hyper: Any) -> bool:
        """The plan was prepared for what the key's Hyper says (frozen, update kind)."""
        if hyper.frozen:
            return plan.frozen
        return not plan.frozen and plan.kind == hyper.kind

    def step_known(self, key: KeyT, weights: Any, gradient: Any, lr_scale: float) -> bool:
        """A key with a prepared launch whose state and settings' kind are unchanged: no
        allocation, no host read (but in raise mode). False: take the general path."""
        plan = self.plans.get(key)
        if (plan is None or type(weights) is not plan.array_type
                or type(gradient) is not plan.array_type or not gradient.size
                or not self._holds(plan, key)):
            return False
        opt = self.opt
        hyper = opt._hyper_for(key)
        if not self._fits(plan, hyper):
            return False
        if hyper.frozen:
            plan.backend.zero_gradient(plan, key, weights, gradient)
            return True
        if hyper.nonfinite == NONFINITE_APPLY:
            track = self.tracks.get(key)
            t = opt.nr_update[key] + 1 if track is None else track.settle() + 1
            plan.backend.launch(plan, hyper, key, weights, gradient, t, lr_scale)
            self._done(key, track, t)
        else:
            self._checked([key], [weights], [gradient], [plan], [hyper], lr_scale, plan.solo)
        opt.nr_update[key] += 1
        return True

    def refuse_capture(self, what: str) -> None:
        """The backend's RuntimeError when `what` (which allocates) would run under CUDA
        graph capture (backends without graphs have no `refuse_capture`)."""
        refuse = getattr(self.backend, "refuse_capture", None)
        if refuse is not None:
            refuse(what)

    def plan(self, key: KeyT, weights: Any, state: Dict[str, Any], hyper: Any = None) -> Any:
        opt = self.opt
        hyper = opt._hyper_for(key) if hyper is None else hyper
        if hyper.frozen:
            plan = self.backend.plan(key, hyper.kind, opt.averages is not None, weights,
                                     state["mom1"], state["mom2"], state["average"],
                                     state["slow"], frozen=True)
        else:
            plan = self.backend.plan(key, hyper.kind, opt.averages is not None, weights,
                                     state["mom1"], state["mom2"], state["average"],
                                     state["slow"])
        old = self.plans.get(key)
        if old is not None and old.counter is not None:
            plan.counter = old.counter  # the key's count on the device goes on
        return plan

    def _held(self, key: KeyT) -> Dict[str, Any]:
        """The state arrays the optimizer holds for `key` (a frozen key's plan holds them,
        so that it is known unchanged, and uses none)."""
        opt = self.opt
        return {"mom1": opt.mom1.get(key), "mom2": opt.mom2.get(key),
                "average": None if opt.averages is None else opt.averages.get(key),
                "slow": opt.lookahead.get(key)}

    def step(self, key: KeyT, weights: Any, gradient: Any, state: Dict[str, Any], t: int,
             lr_scale: float) -> int:
        """One checked update with the key's (possibly new) state arrays. Returns 0: in
        skip mode whether it was skipped is known at `sync()` (raise mode raises here)."""
        hyper = self.opt._hyper_for(key)
        plan = self.plan(key, weights, state, hyper)
        if hyper.frozen:
            self.backend.zero_gradient(plan, key, weights, gradient)
        elif hyper.nonfinite == NONFINITE_APPLY:
            track = self.tracks.get(key)
            if track is not None:
                t = track.settle() + 1
            self.backend.launch(plan, hyper, key, weights, gradient, t, lr_scale)
            self._done(key, track, t)
        else:
            self._checked([key], [weights], [gradient], [plan], [hyper], lr_scale, plan.solo)
        self.plans[key] = plan
        return 0

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
        hypers = list(map(opt._hyper_for, keys))
        modes = _device.plan_modes(plans, hypers)
        if modes < 0:
            return False  # a key's settings changed its kind or froze it: plan again
        expected = plans[0].backend.expected(self.tables, plans)
        averages = opt.averages if opt.averages is not None else {}
        if not (_device.same_state(opt.mom1, keys, expected.m)
                and _device.same_state(opt.mom2, keys, expected.v)
                and _device.same_state(averages, keys, expected.avg)
                and _device.same_state(opt.lookahead, keys, expected.slow)):
            return False  # a state array was replaced: plan again
        nr_update = opt.nr_update
        if modes == 0 and not self.tracks:  # apply mode, nobody frozen: the counts known
            counts = [nr_update[key] + 1 for key in keys]
            plans[0].backend.launch_many(self.tables, hypers, keys, weights, gradients,
                                         plans, counts, lr_scale)
            nr_update.update(zip(keys, counts))
            return True
        self._checked(keys, weights, gradients, plans, hypers, lr_scale, self.tables)
        for key, hyper in zip(keys, hypers):
            if not hyper.frozen:
                nr_update[key] += 1
        return True

    def step_many(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                  lr_scale: float) -> None:
        """Checked tensors: one launch per group of tensors sharing dtype and kernel, plus
        one clip norm launch per group; new keys get their state first, frozen keys none."""
        self.refuse_capture("step_many")
        opt = self.opt
        plans, hypers, new = [], [], []
        for key, w in zip(keys, weights):
            hyper = opt._hyper_for(key)
            plan = self.plans.get(key)
            if (plan is None or (key in opt._stale and not hyper.frozen)
                    or not self._holds(plan, key) or not self._fits(plan, hyper)):
                if hyper.frozen:
                    plan = self.plan(key, w, self._held(key), hyper)
                else:
                    state = opt._state_for(key, self.backend, w)
                    plan = self.plan(key, w, state, hyper)
                    new.append((key, w.shape, state))
            plans.append(plan)
            hypers.append(hyper)
        calls = [opt.nr_update.get(key, 0) + 1 for key in keys]
        self._checked(keys, weights, gradients, plans, hypers, lr_scale, self.tables)
        for key, shape, state in new:
            opt._commit(key, shape, state, 0)
        for key, plan, hyper, t in zip(keys, plans, hypers, calls):
            self.plans[key] = plan
            if not hyper.frozen:
                opt.nr_update[key] = t

    # ------------------------------------------------------------ checked updates

    def _checked(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                 plans: List[Any], hypers: List[Any], lr_scale: float,
                 tables: Dict[Any, Any]) -> None:
        """launch_many with each key's count: known on the host (apply and raise modes),
        or a window of counts (skip mode). Leaves `opt.nr_update` to the caller."""
        opt = self.opt
        self.refuse_capture("an update that checks its gradient (nonfinite skip or raise)")
        n = len(keys)
        windows: Optional[List[Any]] = None
        counts = []
        tracks = self.tracks
        for i in range(n):
            hyper, key = hypers[i], keys[i]
            if hyper.frozen:
                counts.append(1)
            elif hyper.nonfinite == NONFINITE_SKIP:
                if windows is None:
                    windows = [None] * n
                windows[i] = self._window(key, plans[i])
                counts.append(windows[i][0])
            else:
                track = tracks.get(key)
                counts.append(opt.nr_update.get(key, 0) + 1 if track is None
                              else track.settle() + 1)

        def refused(i: int, outcome: int) -> None:
            opt._nonfinite_found(keys[i], outcome, weights[i])

        out = self.backend.launch_many(tables, hypers, keys, weights, gradients, plans,
                                       counts, lr_scale, windows, refused)
        for i in range(n):
            if hypers[i].frozen:
                continue
            track = tracks.get(keys[i])
            if windows is not None and windows[i] is not None:
                record, positions = out
                track.pending.append((record, positions[i]))
                track.reset = False
                track.weights = weights[i]
            else:
                self._done(keys[i], track, counts[i])

    def _done(self, key: KeyT, track: Optional[Track], t: int) -> None:
        """An update whose count t the host knew: a skip-mode key's device count is now
        behind; its next checked launch sets it."""
        if track is not None:
            track.base = t
            track.reset = True

    def _window(self, key: KeyT, plan: Any) -> tuple:
        """(first count, rows, counter) of a skip-mode key's next update: the counts from
        the last one the host read to the one with no skip since; at most MAX_WINDOW rows
        (else wait for the oldest pending launch)."""
        track = self.tracks.get(key)
        if track is None:
            track = self.tracks[key] = Track(self.opt.nr_update.get(key, 0))
        if plan.counter is None:
            self.backend.add_counter(plan)
            self.tables.clear()  # the tensor tables hold the counters' addresses
            plan.solo.clear()
            track.settle()
            track.reset = True
        track.confirm()
        while len(track.pending) >= MAX_WINDOW:
            track.pending[0][0].wait()
            track.confirm()
        return (track.base + 1, len(track.pending) + 1,
                track.base if track.reset else -1)

    def sync(self) -> None:
        """Bring `opt.nr_update` and the skip counts up to date: wait for the pending
        skip-mode launches, take their skipped calls off the counts and report them
        (`opt._nonfinite_found(key, outcome, weights, count)`)."""
        tracks = self.tracks
        for track in tracks.values():
            track.settle()
        opt = self.opt
        for key in list(tracks):
            track = tracks.pop(key)
            skipped = track.nan + track.inf
            if skipped:
                opt.nr_update[key] -= skipped
                if track.nan:
                    opt._nonfinite_found(key, OUTCOME_NAN, track.weights, track.nan)
                if track.inf:
                    opt._nonfinite_found(key, OUTCOME_INF, track.weights, track.inf)

    def forget(self, key: Any = None) -> None:
        """State arrays were replaced, moved or renamed: settle the counts kept on the
        device, then drop the prepared launches."""
        self.sync()
        self.plans.clear()
        self.tables.clear()

