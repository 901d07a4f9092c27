"""spaCy training across ranks: the sharded corpus, the lockstep batcher, the start.

* `@readers = "optim.sharded_corpus.v1"` wraps any corpus reader: rank r of W reads
  examples r, r + W, r + 2W, ... (all of them inside `unsharded()`, which the launcher
  uses while `init_nlp` infers labels and shapes, so every rank builds the same pipeline).
* `@batchers = "optim.lockstep_batches.v1"` wraps any batcher so that every rank takes a
  batch at the same steps: an epoch ends on all ranks when the first rank runs out (ranks'
  shards differ in size, and a word-count batcher cuts them into different numbers of
  batches). `optim.spacy_train` adds it around `[training.batcher]` on 2+ ranks.
* `broadcast_pipeline(nlp)` gives every rank rank 0's weights.

Importing this module imports spaCy and registers both names (they are also declared as
entry points, groups `spacy_readers` and `spacy_batchers`).
"""
import contextlib
from typing import Any, Callable, Iterable, Iterator, List, Optional

import numpy
from spacy import registry as _spacy_registry

from .flat import broadcast_arrays
from .group import Group, join

_sharding = [True]


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """Within this block, sharded corpora give every rank all their examples."""
    _sharding.append(False)
    try:
        yield
    finally:
        _sharding.pop()


def sharded_corpus(corpus: Callable[[Any], Iterable[Any]], rank: Optional[int] = None,
                   world_size: Optional[int] = None) -> Callable[[Any], Iterator[Any]]:
    """`corpus`'s examples, round-robin over the ranks: rank r keeps every W-th example
    from the r-th. rank/world_size default to the process group's."""
    if (rank is None) != (world_size is None):
        raise ValueError("sharded_corpus: give both rank and world_size, or neither")
    if world_size is not None and not (isinstance(world_size, int) and world_size >= 1
                                       and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"sharded_corpus: need 0 <= rank < world_size, got rank {rank!r} "
                         f"of {world_size!r}")

    def read(nlp: Any) -> Iterator[Any]:
        if not _sharding[-1]:
            yield from corpus(nlp)
            return
        r, n = (rank, world_size) if world_size is not None else _rank_and_size(join())
        for i, example in enumerate(corpus(nlp)):
            if i % n == r:
                yield example

    return read


def lockstep_batches(batcher: Callable[[Iterable[Any]], Iterable[Any]]
                     ) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """`batcher`'s batches while every rank has one: a one-integer all-reduce a batch,
    started one batch ahead so that it runs while the current batch trains."""

    def batch(items: Iterable[Any]) -> Iterator[Any]:
        group = join()
        batches = iter(batcher(items))

        def ask() -> tuple:
            following = next(batches, None)
            have = numpy.array([0 if following is None else 1], dtype=numpy.int64)
            return following, group.start_all_reduce(have, "the lockstep batch check")

        current, check = ask()
        while int(check.wait()[0]) == group.world_size:
            following, next_check = ask()
            yield current
            current, check = following, next_check

    return batch


def pipeline_params(nlp: Any) -> List[Any]:
    """Every parameter array of the pipeline's Thinc models, once each, in walk order."""
    from thinc.api import Model

    seen, arrays = set(), []
    for _, component in nlp.components:
        model = getattr(component, "model", None)
        if not isinstance(model, Model):
            continue
        for node in model.walk():
            for name in node.param_names:
                if node.has_param(name) and (node.id, name) not in seen:
                    seen.add((node.id, name))
                    arrays.append(node.get_param(name))
    return arrays


def broadcast_pipeline(nlp: Any, group: Optional[Group] = None, src: int = 0) -> int:
    """Give every rank rank `src`'s weights (a collective); returns how many arrays."""
    arrays = pipeline_params(nlp)
    broadcast_arrays(arrays, src=src, group=group)
    return len(arrays)


def _rank_and_size(group: Group) -> tuple:
    return group.rank, group.world_size


_spacy_registry.readers.register("optim.sharded_corpus.v1", func=sharded_corpus)
_spacy_registry.batchers.register("optim.lockstep_batches.v1", func=lockstep_batches)

__all__ = ["sharded_corpus", "lockstep_batches", "unsharded", "pipeline_params",
           "broadcast_pipeline"]
