"""A device backend's updates for one optimizer: the backend (CuPy's, or the tests' fake
one) compiles and launches; this object owns the optimizer's prepared launches (a `Plan`
per key), `step_many`'s device tables, the hot paths that reuse them, and, in skip mode,
what the host knows of each key's update count (`Track`), which lives on the device.

Update counts in skip mode (docs/gpu.md, "Groups and the non-finite skip"): whether an
update was skipped is decided on the device, and the host never waits to learn it. Each
checked launch copies its verdicts into pinned host memory behind it, with an event;
the host reads them when the event has passed (`event.done`, which does not wait).
Until then a key's count is one of a few: the host uploads the coefficient rows of each
(its *window*) and the device picks the row of the count it holds. The optimizer's
`nr_update` counts every call meanwhile; `sync()` (the optimizer calls it before saving,
moving or reading skip counts) waits for what is still in flight and returns the
skipped calls, which the optimizer takes off its counts and reports.
"""
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

from . import _tables
from .._kernels import NONFINITE_APPLY, NONFINITE_SKIP
from .._kernels_cuda import GO as _GO, INF as _INF, NAN as _NAN
from ..settings.defaults import KeyT

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
    """`Updates` (see optim.backends) for one device backend's arrays, lent an `Owner`:
    the optimizer's per-key state, each key's Hyper and its report."""

    __slots__ = ("backend", "owner", "states", "plans", "tables", "tracks")

    def __init__(self, owner: Any, backend: Any) -> None:
        self.backend = backend
        self.owner = owner
        self.states = owner.states
        self.plans: Dict[KeyT, Any] = {}   # key -> prepared launch (optim.cuda.cupy.Plan)
        self.tables: Dict[Any, Any] = {}   # step_many's device tables per segment set
        self.tracks: Dict[KeyT, Track] = {}  # skip mode: key -> what the host knows

    @staticmethod
    def check(key: KeyT, weights: Any, gradient: Any) -> None:
        from .cupy import check_device_pair

        check_device_pair(key, weights, gradient)

    def _holds(self, plan: Any, key: KeyT) -> bool:
        """The plan's arrays are the ones the state holds for `key` (the per-call hot
        path asks: the dicts are read directly, no record of them is built)."""
        states = self.states
        averages = states.averages
        return plan.holds(states.mom1.get(key), states.mom2.get(key),
                          None if averages is None else averages.get(key),
                          states.lookahead.get(key))

    @staticmethod
    def _fits(plan: Any, hyper: Any) -> bool:
        """The plan was prepared for what the key's Hyper says (frozen, update kind)."""
        if hyper.frozen:
            return plan.frozen
        return not plan.frozen and plan.kind == hyper.kind

    def step_known(self, key: KeyT, weights: Any, gradient: Any, lr_scale: float) -> bool:
        """A key with a prepared launch whose state and settings' kind are unchanged: no
        allocation, no host read (but in raise mode). Counts the update, as the general
        path's commit does (in skip mode ahead: `sync` corrects). False: take the general
        path."""
        plan = self.plans.get(key)
        if (plan is None or type(weights) is not plan.array_type
                or type(gradient) is not plan.array_type or not gradient.size
                or not self._holds(plan, key)):
            return False
        hyper = self.owner.hyper_for(key)
        if not self._fits(plan, hyper):
            return False
        if hyper.frozen:
            plan.backend.zero_gradient(plan, key, weights, gradient)
            return True
        nr_update = self.states.nr_update
        if hyper.nonfinite == NONFINITE_APPLY:
            track = self.tracks.get(key)
            t = nr_update[key] + 1 if track is None else track.settle() + 1
            plan.backend.launch(plan, hyper, key, weights, gradient, t, lr_scale)
            self._done(key, track, t)
        else:
            self._checked([key], [weights], [gradient], [plan], [hyper], lr_scale, plan.solo)
        nr_update[key] += 1
        return True

    @staticmethod
    def zero_gradient(key: KeyT, weights: Any, gradient: Any) -> None:
        """A frozen key's update by a single call: the gradient zeroed, nothing else."""
        gradient.fill(0)

    def refuse_capture(self, what: str) -> None:
        """The backend's RuntimeError when `what` (which allocates) would run under CUDA
        graph capture (backends without graphs have no `refuse_capture`)."""
        refuse = getattr(self.backend, "refuse_capture", None)
        if refuse is not None:
            refuse(what)

    def _plan(self, key: KeyT, weights: Any, state: Dict[str, Any], hyper: Any) -> Any:
        """A key's launch over `state` (a frozen key's: over the arrays held, which it
        uses none of, so that it is known unchanged)."""
        if hyper.frozen:
            state = self.states.arrays(key)
        plan = self.backend.plan(key, hyper.kind, self.states.averages is not None, weights,
                                 state["mom1"], state["mom2"], state["average"],
                                 state["slow"], frozen=bool(hyper.frozen))
        old = self.plans.get(key)
        if old is not None and old.counter is not None:
            plan.counter = old.counter  # the key's count on the device goes on
        return plan

    def step(self, key: KeyT, weights: Any, gradient: Any, hyper: Any, state: Dict[str, Any],
             t: int, lr_scale: float) -> int:
        """One checked update with the key's (possibly new) state arrays. Returns 0: in
        skip mode whether it was skipped is known at `sync()` (raise mode raises here)."""
        plan = self._plan(key, weights, state, hyper)
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
                        lr_scale: float) -> Optional[Tuple[List[KeyT], List[int]]]:
        """Keys with prepared launches whose state is unchanged. The backend checks every
        array against its plan before launching. Returns the keys to count (frozen ones
        left out) and their counts, for the owner to commit; None (nothing touched)
        when the general path is needed."""
        if not keys:
            return None
        plans = list(map(self.plans.get, keys))
        if None in plans:
            return None
        array_type = {plans[0].array_type}
        if set(map(type, weights)) != array_type or set(map(type, gradients)) != array_type:
            return None
        hypers = list(map(self.owner.hyper_for, keys))
        modes = _tables.plan_modes(plans, hypers)
        if modes < 0:
            return None  # a key's settings changed its kind or froze it: plan again
        expected = plans[0].backend.expected(self.tables, plans)
        states = self.states
        averages = states.averages if states.averages is not None else {}
        if not (_tables.same_state(states.mom1, keys, expected.m)
                and _tables.same_state(states.mom2, keys, expected.v)
                and _tables.same_state(averages, keys, expected.avg)
                and _tables.same_state(states.lookahead, keys, expected.slow)):
            return None  # a state array was replaced: plan again
        nr_update = states.nr_update
        if modes == 0 and not self.tracks:  # apply mode, nobody frozen: the counts known
            counts = [nr_update[key] + 1 for key in keys]
            plans[0].backend.launch_many(self.tables, hypers, keys, weights, gradients,
                                         plans, counts, lr_scale)
            return keys, counts
        self._checked(keys, weights, gradients, plans, hypers, lr_scale, self.tables)
        counted = [key for key, hyper in zip(keys, hypers) if not hyper.frozen]
        return counted, [nr_update[key] + 1 for key in counted]

    def step_many(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                  hypers: List[Any], states: List[Dict[str, Any]], lr_scale: float) -> None:
        """Checked tensors with their (possibly new) state arrays: one launch per segment
        of tensors sharing dtype and kernel, plus one clip norm launch per segment."""
        self.refuse_capture("step_many")
        plans = []
        stale = self.states.stale
        for key, w, hyper, state in zip(keys, weights, hypers, states):
            plan = self.plans.get(key)
            if (plan is None or (key in stale and not hyper.frozen)
                    or not self._holds(plan, key) or not self._fits(plan, hyper)):
                plan = self._plan(key, w, state, hyper)
            plans.append(plan)
        self._checked(keys, weights, gradients, plans, hypers, lr_scale, self.tables)
        self.plans.update(zip(keys, plans))

    # ------------------------------------------------------------ checked updates

    def _checked(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                 plans: List[Any], hypers: List[Any], lr_scale: float,
                 tables: Dict[Any, Any]) -> None:
        """launch_many with each key's count: known on the host (apply and raise modes),
        or a window of counts (skip mode). Counts nothing: the caller commits them."""
        self.refuse_capture("an update that checks its gradient (nonfinite skip or raise)")
        n = len(keys)
        windows: Optional[List[Any]] = None
        counts = []
        tracks = self.tracks
        nr_update = self.states.nr_update
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
                counts.append(nr_update.get(key, 0) + 1 if track is None
                              else track.settle() + 1)

        report = self.owner.report

        def refused(i: int, outcome: int) -> None:
            report(keys[i], outcome, weights[i])

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
            track = self.tracks[key] = Track(self.states.nr_update.get(key, 0))
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

    def sync(self) -> List[Tuple[KeyT, Any, int, int]]:
        """Wait for the pending skip-mode launches; (key, weights, NaNs, infs) of each key
        that skipped updates counted ahead, for the optimizer to take off its counts
        and report."""
        tracks = self.tracks
        for track in tracks.values():
            track.settle()
        skipped = [(key, track.weights, track.nan, track.inf)
                   for key, track in tracks.items() if track.nan or track.inf]
        tracks.clear()
        return skipped

    def forget(self) -> None:
        """State arrays were replaced, moved or renamed (the optimizer synced first):
        drop the prepared launches."""
        self.tracks.clear()
        self.plans.clear()
        self.tables.clear()
