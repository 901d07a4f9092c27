"""The NumPy backend's updates for one optimizer: `optim._kernels` does the math; this
object owns the CPU fast paths and their cache (the last `step_many`'s `Batch`)."""
from typing import Any, Dict, List, Optional, Tuple

from . import _batch
from .. import _kernels
from ..settings.defaults import KeyT


class CpuUpdates(_kernels.KnownKeys):
    """`Updates` (see optim.backends) for NumPy arrays, lent an `Owner`. The per-call hot
    path, `step_known(key, weights, gradient, lr_scale) -> bool`, is
    `_kernels.KnownKeys`'s (C), over the owner's `KeyStates`, and so is
    `step_many_again(keys, weights, gradients, lr_scale) -> bool`, which reruns the kept
    `batch`."""

    __slots__ = ()

    def __init__(self, owner: Any) -> None:
        super().__init__(owner.hyper, owner.states, owner.key_hyper, owner.report)

    @staticmethod
    def check(key: KeyT, weights: Any, gradient: Any) -> None:
        _kernels.check_pair(key, weights, gradient)

    @staticmethod
    def zero_gradient(key: KeyT, weights: Any, gradient: Any) -> None:
        """A frozen key's update: the pair validated, the gradient zeroed."""
        _kernels.zero_gradient_of(key, weights, gradient)

    @staticmethod
    def step(key: KeyT, weights: Any, gradient: Any, hyper: Any, state: Dict[str, Any],
             t: int, lr_scale: float) -> int:
        """One checked update with the key's (possibly new) state arrays; its outcome
        (OUTCOME_UPDATED, or _NAN / _INF: nothing but the gradient changed, or in raise
        mode nothing at all)."""
        return _kernels.step(hyper, key, weights, gradient, state["mom1"], state["mom2"],
                             state["average"], state["slow"], t, lr_scale)

    def step_many_known(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                        lr_scale: float) -> Optional[Tuple["_batch.Batch", List[int]]]:
        """Known keys with complete state (the kernels validate dtypes, contiguity and
        every shape): the batch run and its counts, for the owner to settle and `keep`;
        None (nothing touched) when the general path is needed."""
        states = self.states
        if not _batch.known_shapes(list(map(states.shapes.get, keys)), weights, gradients):
            return None
        if self.key_hyper is None:
            hypers = [self.hyper] * len(keys)
        else:
            hypers = list(map(self.key_hyper.get, keys))
            if None in hypers or any(h.frozen for h in hypers):
                return None
        nr_update = states.nr_update
        counts = [t + 1 for t in map(nr_update.__getitem__, keys)]
        no_state = [None] * len(keys)
        averages = states.averages
        return _batch.step_many(
            hypers, keys, weights, gradients,
            list(map(states.mom1.get, keys)) if states.mom1 else no_state,
            list(map(states.mom2.get, keys)) if states.mom2 else no_state,
            list(map(averages.get, keys)) if averages else no_state,
            list(map(states.lookahead.get, keys)) if states.lookahead else no_state,
            counts, lr_scale), counts

    @staticmethod
    def step_many(keys: List[KeyT], weights: List[Any], gradients: List[Any],
                  hypers: List[Any], states: List[Dict[str, Any]], counts: List[int],
                  lr_scale: float) -> "_batch.Batch":
        """Checked tensors with their (possibly new) state: one call; returns the Batch
        for the owner to settle and `keep`."""
        return _batch.step_many(hypers, keys, weights, gradients,
                                [s["mom1"] for s in states], [s["mom2"] for s in states],
                                [s["average"] for s in states],
                                [s["slow"] for s in states], counts, lr_scale)

    def _sources(self) -> tuple:
        """The dicts a kept batch took its state arrays from."""
        states = self.states
        return (states.mom1, states.mom2, states.averages, states.lookahead, states.shapes)

    def keep(self, batch: "_batch.Batch") -> None:
        """Keep a batch whose state arrays are the ones the dicts hold now, to run again
        when the same keys come next. Batch.again also checks that the dicts still map
        the keys to its arrays, so an entry a user replaced is seen too."""
        self.batch = batch.bind(self._sources(), self.states.nr_update)

    def forget(self) -> None:
        """State arrays were replaced or renamed: drop the batch."""
        self.batch = None
