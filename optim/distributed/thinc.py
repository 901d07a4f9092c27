"""The distributed optimizers as `thinc.api.Optimizer` instances, for spaCy configs.

`@optimizers = "optim.distributed.Adam.v1"` (and SGD, RAdam) take the arguments of
`optim.Adam.v1` plus `reduce`, `sharded`, `bucket_mb` and `timeout`. They are declared as
entry points (group `thinc_optimizers`) and registered here too, so importing this
module is enough where optim's metadata is not installed. Importing it imports thinc.
"""
from thinc.api import registry as _thinc_registry

from ..thinc import ThincOptimizer, _as_thinc
from . import optimizer as _distributed

SGD = _as_thinc(_distributed.SGD)
Adam = _as_thinc(_distributed.Adam)
RAdam = _as_thinc(_distributed.RAdam)

for _name, _factory in (("SGD", SGD), ("Adam", Adam), ("RAdam", RAdam)):
    _thinc_registry.optimizers.register(f"optim.distributed.{_name}.v1", func=_factory)

__all__ = ["ThincOptimizer", "SGD", "Adam", "RAdam"]
