"""optim's optimizers as `thinc.api.Optimizer` instances, for Thinc and spaCy configs.

spaCy validates `[training.optimizer]` with `isinstance(value, thinc.api.Optimizer)`, so
the entry points `optim.Adam.v1`, `optim.SGD.v1` and `optim.RAdam.v1` (catalogue group
`thinc_optimizers`) return a `ThincOptimizer`: a thin subclass of Thinc's class that
forwards everything to an `optim.Optimizer`. Importing this module imports thinc.
"""
import functools
from typing import Any, Callable

import thinc.api

from . import optimizer as _optimizer
from .optimizer import Optimizer

# Attributes read or set by Thinc and spaCy (and ours), forwarded to the optim optimizer.
FORWARDED = ("learn_rate", "grad_clip", "b1", "b2", "beta1", "beta2", "eps", "L2",
             "weight_decay", "lookahead_alpha", "lookahead_k", "use_radam", "use_averages",
             "L2_is_weight_decay", "mom1", "mom2", "averages", "lookahead", "nr_update",
             "schedules", "last_score", "step", "ops")


class ThincOptimizer(thinc.api.Optimizer):
    """An `optim.Optimizer` that passes spaCy's `isinstance(x, thinc.api.Optimizer)` check."""

    __slots__ = ("optimizer",)

    def __init__(self, optimizer: Optimizer) -> None:  # Thinc's __init__ is not called
        object.__setattr__(self, "optimizer", optimizer)

    def __call__(self, key: Any, weights: Any, gradient: Any, *, lr_scale: float = 1.0) -> Any:
        return self.optimizer(key, weights, gradient, lr_scale=lr_scale)

    def step_schedules(self) -> None:
        self.optimizer.step_schedules()

    def __getattr__(self, name: str) -> Any:  # step_many, to_gpu, to_bytes, ...
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def from_bytes(self, data: bytes) -> "ThincOptimizer":
        self.optimizer.from_bytes(data)
        return self

    def from_disk(self, path: Any) -> "ThincOptimizer":
        self.optimizer.from_disk(path)
        return self

    def remap_keys(self, mapping: Any) -> "ThincOptimizer":
        self.optimizer.remap_keys(mapping)
        return self

    def __repr__(self) -> str:
        return f"<ThincOptimizer of {self.optimizer!r}>"


def _forward(name: str) -> property:
    def get(self: ThincOptimizer) -> Any:
        return getattr(self.optimizer, name)

    def set(self: ThincOptimizer, value: Any) -> None:
        setattr(self.optimizer, name, value)

    return property(get, set)


for _name in FORWARDED:
    setattr(ThincOptimizer, _name, _forward(_name))


def _as_thinc(factory: Callable[..., Optimizer]) -> Callable[..., ThincOptimizer]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> ThincOptimizer:
        return ThincOptimizer(factory(*args, **kwargs))

    return make


def load(path: str) -> ThincOptimizer:
    """`@optimizers = "optim.load.v1"`: resume a spaCy/Thinc run from a saved state file."""
    return ThincOptimizer(Optimizer.load(path))


SGD = _as_thinc(_optimizer.SGD)
Adam = _as_thinc(_optimizer.Adam)
RAdam = _as_thinc(_optimizer.RAdam)

__all__ = ["ThincOptimizer", "SGD", "Adam", "RAdam", "load"]
