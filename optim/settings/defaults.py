"""Hyperparameters: Thinc's defaults, the range each value must lie in, and the checks
shared by the optimizer, its file format and its wrappers."""
import math
import numbers
import operator
from typing import Any, Dict, Hashable, List, Tuple

KeyT = Hashable

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


def check_value(name: str, value: Any) -> float:
    """`value` as a float if it is a valid `name`, else a ValueError naming the rule."""
    low, high, rule = HYPERPARAMETERS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be finite and {rule}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """`value` as a bool if it is one (or the integer 0 or 1), else a TypeError."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    if type(value).__name__ == "bool_":  # numpy's bool
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__}: {value!r}")


def is_empty(gradient: Any) -> bool:
    """A gradient with no elements: Thinc's "nothing to do" (checked before anything else)."""
    return getattr(gradient, "size", None) == 0


_SIZE = operator.attrgetter("size")


def any_empty(gradients: List[Any]) -> bool:
    try:
        return 0 in map(_SIZE, gradients)
    except AttributeError:
        return any(is_empty(g) for g in gradients)


def shape_error(key: KeyT, got: Tuple[int, ...], expected: Tuple[int, ...]) -> str:
    return (f"key {key!r}: weights have shape {tuple(got)}, but this key was updated with "
            f"shape {tuple(expected)} before")
