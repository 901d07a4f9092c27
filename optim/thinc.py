"""optim's optimizers as `thinc.api.Optimizer` instances, for Thinc and spaCy configs.

spaCy validates `[training.optimizer]` with `isinstance(value, thinc.api.Optimizer)`, so
the entry points `optim.Adam.v1`, `optim.SGD.v1` and `optim.RAdam.v1` (catalogue group
`thinc_optimizers`) return a `ThincOptimizer`: a thin subclass of Thinc's class that
forwards everything to an `optim.Optimizer`. Importing this module imports thinc.

`finish_update(model, optimizer)` does what Thinc's `Model.finish_update` does (every
node's parameters and every PyTorch shim's parameters) through ONE `step_many` call,
so on the GPU a whole model is updated in one launch per dtype and kernel.
"""
import functools
from typing import Any, Callable, List, Tuple

import thinc.api

from . import optimizer as _optimizer
from .checkpoint import load_checkpoint, save_checkpoint
from .optimizer import Optimizer

from .about import check_package as _check_package

_check_package()  # an entry point may reach this module under another project's optim/

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


def finish_update(model: Any, optimizer: Any) -> None:
    """`model.finish_update(optimizer)`, as one `optimizer.step_many` call.

    Collects (key, weights, gradient) exactly as Thinc does - the PyTorch shims' named
    parameters that have a gradient (skipped, but zeroed, when the shim's gradient
    scaler found an infinity), then every node's parameters that have a gradient - and
    updates them together. Same numbers, bitwise, as Thinc's loop. Other shims
    (TensorFlow, MXNet) run their own `finish_update`. A key met twice (a shim shared
    by two nodes) gets its second update in a second call, as in Thinc's loop.
    """
    from thinc.shims import PyTorchShim
    from thinc.util import torch2xp, xp2torch

    batch: List[Tuple[Any, Any, Any, Callable[[Any], None]]] = []
    torch_shims: List[Any] = []

    def flush() -> None:
        if batch:
            optimizer.step_many([b[0] for b in batch], [b[1] for b in batch],
                                [b[2] for b in batch])
            for _, weights, _, store in batch:
                store(weights)
            batch.clear()

    def add(key: Any, weights: Any, gradient: Any, store: Callable[[Any], None]) -> None:
        if any(key == b[0] for b in batch):
            flush()
        batch.append((key, weights, gradient, store))

    nodes = list(model.walk())
    for node in nodes:
        for shim in node.shims:
            if not isinstance(shim, PyTorchShim):
                flush()
                shim.finish_update(optimizer)
                continue
            torch_shims.append(shim)
            if shim._grad_scaler.found_inf:
                continue
            for name, param in shim._model.named_parameters():
                if param.grad is not None:
                    add((shim.id, name), torch2xp(param.data), torch2xp(param.grad),
                        functools.partial(_store_torch, param, xp2torch))
    for node in nodes:
        for name in node.param_names:
            if node.has_grad(name):
                add((node.id, name), node.get_param(name), node.get_grad(name),
                    functools.partial(node.set_param, name))
    flush()
    for shim in torch_shims:
        for _, param in shim._model.named_parameters():
            if param.grad is not None:
                param.grad.zero_()
        shim._grad_scaler.update()


def _store_torch(param: Any, xp2torch: Callable, weights: Any) -> None:
    """What PyTorchShim.finish_update does with the updated weights."""
    param.data = xp2torch(weights, requires_grad=True, device=param.device)


SGD = _as_thinc(_optimizer.SGD)
Adam = _as_thinc(_optimizer.Adam)
RAdam = _as_thinc(_optimizer.RAdam)

__all__ = ["ThincOptimizer", "SGD", "Adam", "RAdam", "load", "finish_update",
           "save_checkpoint", "load_checkpoint"]
