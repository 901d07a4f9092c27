"""Per-key state: every array and count an optimizer keeps for a key, in one object.

A key's state is its arrays, `ARRAYS` (first and second moments, parameter average,
lookahead's slow weights), its shape and its update count. `KeyStates` holds them as
the dicts Thinc's optimizer exposes (`mom1`, `mom2`, `averages`, `lookahead`,
`nr_update`) plus `shapes` and `stale`, and is the one object the Optimizer, the CPU and
device backends, the file format and the distributed wrapper read and change state
through. The hot paths read its dicts on every call (`_kernels.StateDicts`), so a dict
replaced by a user (`optimizer.mom1 = {...}`) is seen at the next update.
"""
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from . import _kernels
from .backends import NUMPY, backend_for
from .settings.defaults import KeyT

ARRAYS = ("mom1", "mom2", "average", "slow")  # a key's state arrays (the file's names)
_DICTS = {"mom1": "mom1", "mom2": "mom2", "average": "averages", "slow": "lookahead"}
StateT = Dict[str, Any]  # ARRAYS -> array or None


class KeyStates(_kernels.StateDicts):
    """Every key's state arrays, shape and update count; `stale`: keys whose arrays
    may not fit their settings any more (their next update takes the general path)."""

    __slots__ = ("stale",)

    def __init__(self, averages: bool = True) -> None:
        self.mom1, self.mom2, self.lookahead, self.shapes = {}, {}, {}, {}
        self.averages = {} if averages else None
        self.nr_update = defaultdict(int)
        self.stale: set = set()

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_rebuilt, (self.mom1, self.mom2, self.averages, self.lookahead,
                           self.nr_update, self.shapes, self.stale))

    # ------------------------------------------------------------ reading

    def store(self, name: str) -> Optional[Dict[KeyT, Any]]:
        """The dict of one of `ARRAYS` (None: averages are off)."""
        return getattr(self, _DICTS[name])

    def stores(self) -> List[Dict[KeyT, Any]]:
        """The array dicts there are (averages' only when on)."""
        return [store for store in map(self.store, ARRAYS) if store is not None]

    def arrays(self, key: KeyT) -> StateT:
        """The arrays held for `key` (None where there is none)."""
        return {name: None if store is None else store.get(key)
                for name, store in zip(ARRAYS, map(self.store, ARRAYS))}

    def known(self) -> Iterator[KeyT]:
        """Keys that have had an update, in the order they first had one."""
        return iter(self.shapes)

    # ------------------------------------------------------------ changing

    def allocate(self, key: KeyT, hyper: Any, backend: Any, weights: Any) -> StateT:
        """The arrays `key`'s next update needs under `hyper`: those held, and zeros (or
        a copy of the weights, for lookahead) for those missing, not yet stored. None
        for a frozen key. TypeError if a held array is on another device."""
        if hyper.frozen:
            return dict.fromkeys(ARRAYS)
        state = self.arrays(key)
        for name, array in state.items():
            if array is not None and backend_for(array) is not backend:
                where = "to_gpu()" if backend is not NUMPY else "to_cpu()"
                raise TypeError(
                    f"key {key!r}: the optimizer's {name} is a {backend_for(array).name} "
                    f"array but the weights are {backend.name}; call optimizer.{where} first")
        if hyper.kind != "sgd" and state["mom1"] is None:
            state["mom1"] = backend.zeros_like(weights)
            state["mom2"] = backend.zeros_like(weights)
        if self.averages is not None and state["average"] is None:
            state["average"] = backend.zeros_like(weights)
        if hyper.lookahead_k > 0 and state["slow"] is None:
            state["slow"] = backend.copy(weights)
        return state

    def commit(self, key: KeyT, shape: Tuple[int, ...], state: StateT, t: int) -> None:
        """An update of `key` happened: keep its arrays, shape and count t."""
        for name, array in state.items():
            store = self.store(name)
            if array is not None and store is not None:
                store[key] = array
        self.shapes[key] = tuple(shape)
        self.nr_update[key] = t
        self.stale.discard(key)

    def uncount(self, key: KeyT, n: int) -> None:
        """n updates of `key` counted ahead were skipped (a device's skip mode)."""
        self.nr_update[key] -= n

    def mark_stale(self) -> None:
        """Every key's next update takes the general path (settings changed)."""
        self.stale.update(self.shapes)

    def set_averages(self, on: bool) -> None:
        """Keep parameter averages from the next update (on), or drop them."""
        if on != (self.averages is not None):
            self.averages = {} if on else None
            self.mark_stale()

    def rename(self, mapping: Mapping[KeyT, KeyT], *others: Dict[KeyT, Any]) -> None:
        """Rename keys in every dict of the state (and in `others`, dicts keyed alike);
        ValueError, changing nothing, if two keys would get one name."""
        renamed = {mapping.get(key, key) for key in self.shapes}
        if len(renamed) != len(self.shapes):
            raise ValueError("remap_keys: two keys would get the same name")
        for store in self.stores() + [self.nr_update, self.shapes, *others]:
            items = [(mapping.get(k, k), v) for k, v in store.items()]
            store.clear()
            store.update(items)
        self.stale = {mapping.get(k, k) for k in self.stale}

    def move(self, convert: Callable[[Any], Any]) -> None:
        """Replace every array by `convert(array)` (to another device)."""
        for store in self.stores():
            for key, array in store.items():
                store[key] = convert(array)


def _rebuilt(mom1: dict, mom2: dict, averages: Optional[dict], lookahead: dict,
             nr_update: Any, shapes: dict, stale: set) -> KeyStates:
    states = KeyStates.__new__(KeyStates)
    states.mom1, states.mom2, states.averages = mom1, mom2, averages
    states.lookahead, states.nr_update, states.shapes = lookahead, nr_update, shapes
    states.stale = stale
    return states
