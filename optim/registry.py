"""Function registries, built on catalogue and confection as in Thinc."""
import catalogue
import confection
from confection import Config

__all__ = ["registry", "Config"]


class registry(confection.registry):
    """`@optimizers` and `@schedules` for configs: `registry.resolve(config)`."""

    optimizers = catalogue.create("optim", "optimizers", entry_points=False)
    schedules = catalogue.create("optim", "schedules", entry_points=False)
