"""The NumPy backend's updates for one optimizer: `optim._kernels` does the math; this
object owns the CPU fast paths and their cache (the last `step_many`'s `Batch`)."""
from typing import Any, Dict, List, Optional

from .. import _batch, _kernels
from ..hyperparams import KeyT


class CpuUpdates(_kernels.KnownKeys):
    """`Updates` (see optim.backends) for NumPy arrays. The per-call hot path,
    `step_known(key, weights, gradient, lr_scale) -> bool`, is `_kernels.KnownKeys`'s (C);
    it holds the optimizer's own dicts (and, with groups, its key -> Hyper dict), and
    the optimizer builds a new CpuUpdates whenever one of them is replaced."""

    __slots__ = ("batch",)

    def __init__(self, opt: Any) -> None:
        super().__init__(opt._hyper, opt._mom1, opt._mom2, opt._averages, opt._lookahead,
                         opt._nr_update, opt._shapes, opt._key_hyper, opt._nonfinite_found)
        self.batch: Optional[_batch.Batch] = None

    @staticmethod
    def check(key: KeyT, weights: Any, gradient: Any) -> None:
        _kernels.check_pair(key, weights, gradient)

    def hyper_of(self, key: KeyT) -> Any:
        """The key's Hyper (resolved by the optimizer before any update of the key)."""
        return self.hyper if self.key_hyper is None else self.key_hyper[key]

    def step(self, key: KeyT, weights: Any, gradient: Any, state: Dict[str, Any], t: int,
             lr_scale: float) -> int:
        """One checked update with the key's (possibly new) state arrays; its outcome
        (0: updated, 1 / 2: a NaN / an inf was found and nothing but the gradient
        changed, or in raise mode nothing at all)."""
        return _kernels.step(self.hyper_of(key), key, weights, gradient, state["mom1"],
                             state["mom2"], state["average"], state["slow"], t, lr_scale)

    def step_many_again(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                        lr_scale: float) -> bool:
        """Rerun the kept batch if C code finds the same keys, arrays and state."""
        batch = self.batch
        return batch is not None and batch.again(keys, weights, gradients, self.nr_update,
                                                 lr_scale, self._sources(), self.on_nonfinite)

    def step_many_known(self, keys: List[KeyT], weights: List[Any], gradients: List[Any],
                        lr_scale: float) -> bool:
        """Known keys with complete state: the kernels validate dtypes, contiguity and
        every shape; False (nothing touched) when the general path is needed."""
        if not _batch.known_shapes(list(map(self.shapes.get, keys)), weights, gradients):
            return False
        if self.key_hyper is None:
            hypers = [self.hyper] * len(keys)
        else:
            hypers = list(map(self.key_hyper.get, keys))
            if None in hypers or any(h.frozen for h in hypers):
                return False
        nr_update = self.nr_update
        counts = [t + 1 for t in map(nr_update.__getitem__, keys)]
        no_state = [None] * len(keys)
        batch = _batch.step_many(
            hypers, keys, weights, gradients,
            list(map(self.mom1.get, keys)) if self.mom1 else no_state,
            list(map(self.mom2.get, keys)) if self.mom2 else no_state,
            list(map(self.averages.get, keys)) if self.averages else no_state,
            list(map(self.lookahead.get, keys)) if self.lookahead else no_state,
            counts, lr_scale)
        skipped = dict(batch.outcomes())
        if not skipped:
            nr_update.update(zip(keys, counts))
        elif batch.written:
            nr_update.update((k, t) for i, (k, t) in enumerate(zip(keys, counts))
                             if i not in skipped)
        self.keep(batch)
        for i, outcome in skipped.items():  # raises at the first in raise mode
            self.on_nonfinite(keys[i], outcome, weights[i])
        return True

    def step_many(self, hypers: List[Any], keys: List[KeyT], weights: List[Any],
                  gradients: List[Any], states: List[Dict[str, Any]], counts: List[int],
                  lr_scale: float) -> Any:
        """Checked tensors with their (possibly new) state: one call; returns the Batch
        for `keep` once the optimizer has stored the new state."""
        return _batch.step_many(hypers, keys, weights, gradients,
                                [s["mom1"] for s in states], [s["mom2"] for s in states],
                                [s["average"] for s in states],
                                [s["slow"] for s in states], counts, lr_scale)

    def _sources(self) -> tuple:
        """The dicts a kept batch took its state arrays from."""
        return (self.mom1, self.mom2, self.averages, self.lookahead, self.shapes)

    def keep(self, batch: "_batch.Batch") -> None:
        """Keep a batch whose state arrays are the ones the dicts hold now, to run again
        when the same keys come next. Batch.again also checks that the dicts still map
        the keys to its arrays, so an entry a user replaced is seen too."""
        self.batch = batch.bind(self._sources(), self.nr_update)

    def forget(self, key: Any = None) -> None:
        """State arrays were replaced or renamed (one key's, or all): drop the batch."""
        self.batch = None
