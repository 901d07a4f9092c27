"""optim: fused Cython optimizers (SGD, Adam, RAdam) for Thinc and spaCy pipelines.

Published on the package index as ``thinc-optim`` (optim.about explains why).
"""
import importlib.util as _importlib_util
import os as _os
import warnings as _warnings

from . import about as _about
from .about import __title__, __version__

_foreign = _about.foreign_files(_os.path.dirname(_os.path.abspath(__file__)))
if _foreign:  # the unrelated PyPI 'optim' wrote into this folder too
    _warnings.warn(_foreign, RuntimeWarning, stacklevel=2)

if _importlib_util.find_spec(__name__ + "._kernels") is None:  # a source tree, unbuilt
    raise ImportError(
        f"optim's compiled kernels are not built in {_os.path.dirname(__file__)} (this is "
        "a source tree): build them in place with `pip install -e .` (or `python setup.py "
        "build_ext --inplace`), or import an installed optim from outside this folder")

from .cpu import get_num_threads, set_num_threads, show_config
from .optimizer import ADAM_DEFAULTS, RADAM_DEFAULTS, SGD_DEFAULTS, SGD, Adam, Optimizer, RAdam
from .settings.per_tensor import NonFiniteError
from .registry import Config, registry
from .schedules import (
    Schedule,
    compounding,
    constant,
    constant_then,
    cyclic_triangular,
    decaying,
    plateau,
    sequence,
    slanted_triangular,
    warmup_linear,
)


@registry.optimizers("load.v1")
def load(path) -> Optimizer:
    """Build an optimizer from a file written by `Optimizer.to_disk`."""
    return Optimizer.load(path)


__all__ = [
    "Optimizer", "SGD", "Adam", "RAdam", "ADAM_DEFAULTS", "SGD_DEFAULTS", "RADAM_DEFAULTS",
    "registry", "Config", "Schedule", "constant", "constant_then", "decaying", "compounding",
    "warmup_linear", "slanted_triangular", "cyclic_triangular", "plateau", "sequence", "load",
    "set_num_threads", "get_num_threads", "show_config", "NonFiniteError",
]
