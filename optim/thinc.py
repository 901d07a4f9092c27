"""optim's optimizers as `thinc.api.Optimizer` instances, for Thinc and spaCy configs.

spaCy validates `[training.optimizer]` with `isinstance(value, thinc.api.Optimizer)`, so
the entry points `optim.Adam.v1`, `optim.SGD.v1` and `optim.RAdam.v1` (catalogue group
`thinc_optimizers`) return a `ThincOptimizer`: a thin subclass of Thinc's class that
forwards everything to an `optim.Optimizer`. Importing this module imports thinc.

Under Thinc 9 the wrapper reads like Thinc 9's Optimizer: the hyperparameters are
schedules, `optimizer.learn_rate(step=..., key=..., last_score=...)`, and assigning one
(a number, list, generator or schedule) reads it at the optimizer's step. Under Thinc 8.3
they are floats, as in 8.3.

`finish_update(model, optimizer)` does what Thinc's `Model.finish_update` does (every
node's parameters and every PyTorch shim's parameters) through ONE `step_many` call,
so on the GPU a whole model is updated in one launch per dtype and kernel.
"""
import copy
import functools
from typing import Any, Callable, List, Tuple

from .about import check_package as _check_package

_check_package()  # an entry point may reach this module under another project's optim/

import thinc.api  # noqa: E402 (after the check: its error names the real problem)

from . import optimizer as _optimizer  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .optimizer import Optimizer  # noqa: E402

# Attributes read or set by Thinc and spaCy (and ours), forwarded to the optim optimizer.
FORWARDED = ("learn_rate", "grad_clip", "b1", "b2", "beta1", "beta2", "eps", "L2",
             "weight_decay", "lookahead_alpha", "lookahead_k", "use_radam", "use_averages",
             "L2_is_weight_decay", "mom1", "mom2", "averages", "lookahead", "nr_update",
             "last_seen", "schedules", "last_score", "step", "ops")
# Thinc 9's schedule class; None under Thinc 8.3, whose schedules are generators.
THINC_SCHEDULE = getattr(thinc.api, "Schedule", None)
THINC_9 = THINC_SCHEDULE is not None
# What Thinc 9 exposes as schedules (b1/b2 are its names for beta1/beta2), and ours.
SCHEDULED = {"learn_rate": "learn_rate", "grad_clip": "grad_clip", "b1": "beta1",
             "b2": "beta2", "beta1": "beta1", "beta2": "beta2", "eps": "eps", "L2": "L2",
             "weight_decay": "weight_decay", "lookahead_alpha": "lookahead_alpha"}


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

    def bind(self, obj: Any) -> "ThincOptimizer":
        self.optimizer.bind(obj)
        return self

    def remap_keys(self, mapping: Any) -> "ThincOptimizer":
        self.optimizer.remap_keys(mapping)
        return self

    def __reduce__(self) -> Tuple[Any, ...]:
        """Pickled and deep-copied as the optimizer it wraps (Thinc's slots, shadowed by
        the forwarding properties here, hold nothing)."""
        return (type(self), (self.optimizer,))

    def __copy__(self) -> "ThincOptimizer":
        """An independent copy (see `Optimizer.__copy__`)."""
        return type(self)(copy.copy(self.optimizer))

    def __repr__(self) -> str:
        return f"<ThincOptimizer of {self.optimizer!r}>"


def _forward(name: str) -> property:
    def get(self: ThincOptimizer) -> Any:
        return getattr(self.optimizer, name)

    def set(self: ThincOptimizer, value: Any) -> None:
        setattr(self.optimizer, name, value)

    return property(get, set)


def _core(wrapper: ThincOptimizer) -> Optimizer:
    """The optim.Optimizer under the wrapper (and under a distributed optimizer)."""
    opt = wrapper.optimizer
    while not isinstance(opt, Optimizer):
        opt = opt.optimizer
    return opt


def _read_hyperparameter(view: Any, step: int, **extra: Any) -> float:
    return view.attrs["optimizer"].hyperparameter(view.attrs["name"], step, **extra)


def _schedule_property(name: str) -> property:
    """Thinc 9: the hyperparameter as a schedule. A Thinc 9 schedule that was given is
    returned as is; otherwise a `Schedule` that reads the optimizer's value at a step."""
    from .schedules import is_step_schedule

    def get(self: ThincOptimizer) -> Any:
        core = _core(self)
        held = core.schedules.get(name)
        if is_step_schedule(held):
            return held
        return THINC_SCHEDULE(f"optim.{name}", _read_hyperparameter,
                              attrs={"optimizer": core, "name": name})

    def set(self: ThincOptimizer, value: Any) -> None:
        core = _core(self)
        if (getattr(value, "_schedule", None) is _read_hyperparameter
                and value.attrs["optimizer"] is core and value.attrs["name"] == name):
            return  # optimizer.learn_rate = optimizer.learn_rate
        core.set_hyperparameter(name, value, absolute=True)

    return property(get, set, doc=f"{name} as a Thinc 9 schedule: {name}(step=..., **extra).")


for _name in FORWARDED:
    setattr(ThincOptimizer, _name, _forward(_name))
if THINC_9:
    for _name, _target in SCHEDULED.items():
        setattr(ThincOptimizer, _name, _schedule_property(_target))


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
