"""optim's distribution name and version, and the check for the unrelated PyPI ``optim``.

setup.cfg reads ``__version__`` from this file without importing optim (no compiled module
is needed to build), so it is the one place the version is written.

The package index's name ``optim`` belongs to an unrelated 2019 project ("Playground for
optimizers", 0.1.0) that also installs a package ``optim/`` (``__init__.py`` and
``optim.py``); ours is published as ``thinc-optim``. Installed into the same environment,
the two write into the same folder: whichever was installed last owns
``optim/__init__.py``, and uninstalling either deletes files of the other.
"""
import os
import sys
from typing import Optional

__title__ = "thinc-optim"  # the distribution name: pip install thinc-optim
__version__ = "0.3.0.dev0"

FOREIGN = "optim"  # the unrelated distribution on the package index
FOREIGN_FILE = "optim.py"  # a module it installs into optim/ and we never ship
FIX = f"pip uninstall -y {FOREIGN} {__title__} && pip install {__title__}"


def _foreign_version() -> Optional[str]:
    """The installed version of the unrelated distribution, if its metadata is there."""
    from importlib import metadata

    try:
        return metadata.version(FOREIGN)
    except metadata.PackageNotFoundError:
        return None


def foreign_files(package_dir: str) -> Optional[str]:
    """A warning if the unrelated ``optim`` has files in `package_dir` (our optim/), else None.

    Costs one stat at import; the package metadata is read only when the file is there.
    """
    if not isinstance(package_dir, (str, os.PathLike)):
        raise TypeError(f"package_dir must be a path, got {type(package_dir).__name__}")
    if not os.path.exists(os.path.join(package_dir, FOREIGN_FILE)):
        return None
    version = _foreign_version()
    which = f"{FOREIGN} {version}" if version else f"an {FOREIGN}/{FOREIGN_FILE} of unknown origin"
    return (f"the unrelated PyPI project '{FOREIGN}' (\"Playground for optimizers\") shares "
            f"{package_dir} with {__title__} (found {which}). optim works now, but "
            f"uninstalling or reinstalling '{FOREIGN}' deletes or replaces optim/__init__.py. "
            f"To keep only {__title__}: {FIX}")


def check_package() -> None:
    """Raise ImportError unless the imported package ``optim`` is this distribution's.

    For entry points (``python -m optim``, the Thinc/spaCy registry functions) that run
    our submodules even when another project's ``optim/__init__.py`` replaced ours.
    """
    package = sys.modules.get("optim")
    if getattr(package, "__title__", None) == __title__:
        return
    found = getattr(package, "__version__", "unknown")
    raise ImportError(
        f"'import optim' gives another project's package (version {found}, from "
        f"{getattr(package, '__file__', None)}), not {__title__}'s: the unrelated PyPI "
        f"project '{FOREIGN}' was installed over it (both install the package optim/). "
        f"Fix: {FIX}")
