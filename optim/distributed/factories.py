"""`optim.distributed.SGD` / `Adam` / `RAdam`: the local factories with the distributed
options added, and the local optimizer's attributes a `DistributedOptimizer` forwards.
Both are made for a wrapper class given to them (`optim.distributed.optimizer`)."""
import functools
import inspect
from typing import Any, Optional

from .plan import DEFAULT_BUCKET_MB


def forwarded(name: str, settable: bool) -> property:
    """A property reading (and, if settable, setting) the local optimizer's `name`."""

    def get(self: Any) -> Any:
        return getattr(self.optimizer, name)

    def set(self: Any, value: Any) -> None:
        setattr(self.optimizer, name, value)

    return property(get, set if settable else None,
                    doc=f"The local optimizer's {name} (the same on every rank).")


def distributed_factory(factory: Any, wrapper: Any) -> Any:
    """`factory`'s arguments plus reduce, sharded, bucket_mb, timeout and group: the
    optimizer it makes, wrapped in `wrapper` (DistributedOptimizer) with those."""

    @functools.wraps(factory)
    def make(*args: Any, reduce: str = "mean", sharded: bool = False,
             bucket_mb: float = DEFAULT_BUCKET_MB, timeout: Optional[float] = None,
             group: Any = None, **kwargs: Any) -> Any:
        return wrapper(factory(*args, **kwargs), reduce=reduce, sharded=sharded,
                       bucket_mb=bucket_mb, timeout=timeout, group=group)

    base = inspect.signature(factory)
    extra = [
        inspect.Parameter("reduce", inspect.Parameter.KEYWORD_ONLY, default="mean",
                          annotation=str),
        inspect.Parameter("sharded", inspect.Parameter.KEYWORD_ONLY, default=False,
                          annotation=bool),
        inspect.Parameter("bucket_mb", inspect.Parameter.KEYWORD_ONLY,
                          default=DEFAULT_BUCKET_MB, annotation=float),
        inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Optional[float]),
        inspect.Parameter("group", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Any),
    ]
    params = list(base.parameters.values()) + extra
    make.__signature__ = base.replace(parameters=params,  # type: ignore[attr-defined]
                                      return_annotation=wrapper)
    del make.__wrapped__
    make.__doc__ = (f"{factory.__doc__} Data-parallel over torch.distributed "
                    f"(optim.distributed.{wrapper.__name__}).")
    return make
