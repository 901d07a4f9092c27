"""Data-parallel training on torch.distributed (the `thinc-optim[distributed]` extra).

    import optim.distributed
    opt = optim.distributed.Adam(0.001)          # joins the group torchrun describes
    model.finish_update(opt)                     # records the tensors
    opt.step_schedules()                         # one bucketed all-reduce + one update

torch is imported only when a group of two or more processes is joined. See
docs/distributed.md for the contract (when weights change, what is a collective).
"""
from .group import DEFAULT_TIMEOUT, DistributedError, Group, from_process_group, join
from .optimizer import DEFAULT_BUCKET_MB, SGD, Adam, DistributedOptimizer, RAdam
from .flat import broadcast_arrays

__all__ = ["DistributedOptimizer", "DistributedError", "Group", "join", "from_process_group",
           "broadcast_arrays", "SGD", "Adam", "RAdam", "DEFAULT_TIMEOUT", "DEFAULT_BUCKET_MB"]
