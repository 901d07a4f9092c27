"""How the bench reports what it cannot do."""

class UsageError(Exception):
    """A bad option: reported as ``error: ...`` with exit status 2."""


class NotReady(Exception):
    """optim's core cannot be imported: reported with exit status 1."""


class Skip(Exception):
    """This implementation does not run this configuration: the message says why."""
