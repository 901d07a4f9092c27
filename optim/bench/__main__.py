"""``python -m optim.bench``: the same as ``python -m optim bench``."""
import sys

from .cli import main

sys.exit(main())
