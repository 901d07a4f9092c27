"""step_many's kept batch (optim.cpu._batch.Batch): a call with the same keys as the last
one reruns that call's task table and gathered state arrays, checking only the arrays.

Every test drives two optimizers with the same inputs: `many` through step_many, `single`
through one call per key, in order, and requires bitwise equal weights, gradients and
state after every step. Between two steps a test changes the state the way a user or
the optimizer's own methods can (replaced, deleted or resized arrays, replaced dicts,
renamed keys, loaded bytes, a trip to the device, a new update kind...); the kept batch
must see each change, and whether it ran is checked by its identity (`opt._cpu.batch`).
Bad input on the kept batch's path must raise the error the general path raises, with
nothing touched.
"""
import copy
import math

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_reference import hyperparams, shapes

import fake_cupy as fc
from optim import Adam, Optimizer, backends

KEYS = [(0, "W"), (0, "b"), (1, "W"), (2, "W")]
SHAPES = [(6, 5), (5,), (6, 5), (300,)]  # keys 0 and 2 share a shape (remap_keys swaps them)
CONFIG = dict(learn_rate=0.01, L2=0.01, grad_clip=1.0, use_averages=True, lookahead_k=2)


def _state_equal(a, b, keys):
    """Bitwise the same state for `keys` (an entry may be missing: then in both)."""
    for key in keys:
        assert a.nr_update.get(key) == b.nr_update.get(key)
        for name in ("mom1", "mom2", "averages", "lookahead"):
            da, db = getattr(a, name) or {}, getattr(b, name) or {}
            assert (key in da) == (key in db), f"{name} {key}"
            if key in da:
                numpy.testing.assert_array_equal(da[key], db[key], err_msg=f"{name} {key}")


class Twin:
    """`many` and `single` with the same hyperparameters and weights, stepped together."""

    def __init__(self, hp, shapes_=SHAPES, keys=KEYS, dtype="float32", seed=0,
                 extra_keys=0):
        self.rng = numpy.random.default_rng(seed)
        self.keys, self.shapes, self.dtype = list(keys), list(shapes_), dtype
        self.many, self.single = Optimizer(**hp), Optimizer(**hp)
        self.ws = [self.rng.standard_normal(s).astype(dtype) for s in self.shapes]
        self.ws_single = [w.copy() for w in self.ws]
        for i in range(extra_keys):  # other keys the optimizers hold (a larger model)
            w = self.rng.standard_normal(3).astype(dtype)
            g = self.rng.standard_normal(3).astype(dtype)
            self.many(("extra", i), w.copy(), g.copy())
            self.single(("extra", i), w.copy(), g.copy())

    def gradients(self):
        return [self.rng.standard_normal(s).astype(self.dtype) for s in self.shapes]

    def step(self, lr_scale=1.0, keys=None):
        gs = self.gradients()
        gs_single = [g.copy() for g in gs]
        self.many.step_many(list(keys or self.keys), self.ws, gs, lr_scale=lr_scale)
        for key, w, g in zip(self.keys, self.ws_single, gs_single):
            self.single(key, w, g, lr_scale=lr_scale)
        self.check(gs, gs_single)

    def check(self, gs=(), gs_single=()):
        for i, key in enumerate(self.keys):
            numpy.testing.assert_array_equal(self.ws[i], self.ws_single[i], err_msg=f"{key}")
        for g, g_single in zip(gs, gs_single):
            numpy.testing.assert_array_equal(g, g_single)
            assert not numpy.any(g)
        _state_equal(self.many, self.single, self.keys)

    def both(self, change):
        """Apply change(optimizer, its weights) to both optimizers."""
        change(self.many, self.ws)
        change(self.single, self.ws_single)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hp=hyperparams(), shapes_=st.lists(shapes(), min_size=1, max_size=5),
       dtype=st.sampled_from(["float32", "float64"]), n_rounds=st.integers(2, 7),
       seed=st.integers(0, 2**32 - 1), lr_scale=st.sampled_from([1.0, 0.5]))
def test_repeated_batch_reruns_and_equals_single_calls(hp, shapes_, dtype, n_rounds, seed,
                                                      lr_scale):
    keys = [(i, "W") for i in range(len(shapes_))]
    twin = Twin(hp, shapes_, keys, dtype, seed)
    twin.step(lr_scale)
    batch = twin.many._cpu.batch
    assert batch is not None
    for _ in range(n_rounds - 1):
        twin.step(lr_scale, keys=[(k[0], k[1]) for k in keys])  # equal keys, new objects
        assert twin.many._cpu.batch is batch  # the kept batch ran


def _replace(name, key=KEYS[0]):
    def change(opt, ws):
        store = getattr(opt, name)
        store[key] = numpy.full_like(store[key], 0.25)
    return change


def _delete(name, key=KEYS[1]):
    def change(opt, ws):
        del getattr(opt, name)[key]
    return change


def _from_bytes(data):
    def change(opt, ws):
        opt.from_bytes(data)
    return change


def _set(name, value):
    return lambda opt, ws: setattr(opt, name, value)


def _single_call(key_index):
    def change(opt, ws):
        g = numpy.full_like(ws[key_index], 0.5)
        opt(KEYS[key_index], ws[key_index], g)
    return change


# (name, change, whether the kept batch may still run after it)
CHANGES = [
    ("replace mom1", _replace("mom1"), False),
    ("replace mom2", _replace("mom2"), False),
    ("replace average", _replace("averages"), False),
    ("replace lookahead", _replace("lookahead"), False),
    ("delete average", _delete("averages"), False),  # that key is no longer averaged
    ("replace the mom2 dict", lambda opt, ws: setattr(opt, "mom2", dict(opt.mom2)), False),
    ("replace the averages dict", lambda opt, ws: setattr(opt, "averages", {}), False),
    ("copy the lookahead dict", lambda opt, ws: setattr(opt, "lookahead", dict(opt.lookahead)),
     False),
    ("remap_keys", lambda opt, ws: opt.remap_keys({KEYS[0]: KEYS[2], KEYS[2]: KEYS[0]}),
     False),
    ("to_cpu", lambda opt, ws: opt.to_cpu(), False),
    ("update kind: SGD", lambda opt, ws: (_set("beta1", 0.0)(opt, ws),
                                          _set("beta2", 0.0)(opt, ws)), False),
    ("lookahead_k", _set("lookahead_k", 3), False),
    ("a new key", lambda opt, ws: opt(("new", 0), numpy.ones(4, "float32"),
                                      numpy.ones(4, "float32")), False),
    ("nr_update entry", lambda opt, ws: opt.nr_update.__setitem__(KEYS[3], 0), True),
    ("nr_update entry, large", lambda opt, ws: opt.nr_update.__setitem__(KEYS[3], 10**6),
     True),
    ("nr_update entry, a float", lambda opt, ws: opt.nr_update.__setitem__(KEYS[3], 2.0),
     False),  # (the general path takes it; the kept batch only reads ints)
    ("single call on a batch key", _single_call(1), True),
    ("state values in place", lambda opt, ws: opt.mom1[KEYS[2]].fill(0.125), True),
    ("learn_rate", _set("learn_rate", 0.003), True),
    ("grad_clip", _set("grad_clip", 0.0), True),
]


@pytest.mark.parametrize("extra_keys", [0, 40], ids=["walk", "lookup"])
@pytest.mark.parametrize("name,change,kept", CHANGES, ids=[c[0] for c in CHANGES])
def test_state_changes_between_calls_are_seen(name, change, kept, extra_keys):
    """extra_keys=40: the optimizer holds many more keys than the batch, so the batch
    checks the dicts key by key instead of entry by entry."""
    twin = Twin(CONFIG, extra_keys=extra_keys)
    for _ in range(3):  # steps 1 to 3: lookahead syncs at step 2
        twin.step()
    batch = twin.many._cpu.batch
    old = {name: dict(getattr(twin.many, name)) for name in ("mom1", "mom2", "averages",
                                                             "lookahead")}
    before = {n: {k: a.copy() for k, a in d.items()} for n, d in old.items()}
    twin.both(change)
    twin.check()
    for _ in range(3):
        twin.step()
    assert (twin.many._cpu.batch is batch) == kept
    if not kept:  # an array the optimizer no longer holds was not written by a stale batch
        for n, store in old.items():
            held = {id(a) for a in (getattr(twin.many, n) or {}).values()}
            for key, array in store.items():
                if id(array) not in held:
                    numpy.testing.assert_array_equal(array, before[n][key])


def test_from_bytes_between_calls():
    twin = Twin(CONFIG)
    twin.step()
    data = twin.many.to_bytes()  # the state after step 1
    twin.step()
    twin.step()
    batch = twin.many._cpu.batch
    twin.both(_from_bytes(data))
    twin.check()
    twin.step()
    assert twin.many._cpu.batch is not batch
    twin.step()


def test_to_gpu_and_back_between_calls():
    """A trip to the (fake) device replaces every state array with a copy."""
    previous = backends.set_gpu_backend(fc.HarnessBackend(block=32))
    try:
        twin = Twin(CONFIG)
        twin.step()
        twin.step()
        batch = twin.many._cpu.batch
        host = twin.many.mom1[KEYS[0]]
        twin.both(lambda opt, ws: opt.to_gpu())
        gs = twin.gradients()
        with pytest.raises(TypeError, match="to_cpu"):  # host arrays, device state
            twin.many.step_many(twin.keys, twin.ws, gs)
        twin.both(lambda opt, ws: opt.to_cpu())
        twin.step()
        assert twin.many._cpu.batch is not batch and twin.many.mom1[KEYS[0]] is not host
        twin.step()
    finally:
        backends.set_gpu_backend(previous)


def test_update_kind_change_allocates_state():
    """SGD with no state arrays, then Adam (beta1, beta2 set): the moments are made."""
    twin = Twin(dict(learn_rate=0.1, beta1=0.0, beta2=0.0, use_averages=False))
    twin.step()
    twin.step()
    assert not twin.many.mom1
    twin.both(lambda opt, ws: (_set("beta1", 0.9)(opt, ws), _set("beta2", 0.99)(opt, ws)))
    twin.step()
    assert set(twin.many.mom1) == set(KEYS)
    batch = twin.many._cpu.batch
    twin.step()
    assert twin.many._cpu.batch is batch


def test_copies_drop_the_batch():
    twin = Twin(CONFIG)
    twin.step()
    twin.step()
    twin.many = copy.deepcopy(twin.many)
    assert twin.many._cpu.batch is None
    twin.step()
    twin.step()


# ---------------------------------------------------------------- bad input

def _w(i, f):
    return lambda ws, gs: ws.__setitem__(i, f(ws[i]))


def _g(i, f):
    return lambda ws, gs: gs.__setitem__(i, f(gs[i]))


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a):
    return numpy.repeat(a, 2, axis=-1)[..., ::2]


def _state(name, key, f):
    def change(opt):
        f(getattr(opt, name)[key])
    return change


def _reshape_in_place(a):
    a.shape = a.shape[::-1] if a.ndim > 1 else (1, a.size)


BAD_ARRAYS = [
    ("weights float64", _w(0, lambda a: a.astype("float64")), TypeError),
    ("gradient float64", _g(1, lambda a: a.astype("float64")), TypeError),
    ("gradient float16", _g(2, lambda a: a.astype("float16")), TypeError),
    ("weights shape", _w(0, lambda a: a.reshape(5, 6).copy()), ValueError),
    ("gradient shape", _g(3, lambda a: a[:-1].copy()), ValueError),
    ("weights strided", _w(1, _strided), ValueError),
    ("gradient strided", _g(0, _strided), ValueError),
    ("weights read-only", _w(3, _readonly), ValueError),
    ("gradient read-only", _g(2, _readonly), ValueError),
    ("gradient a list", _g(1, lambda a: a.tolist()), TypeError),
    ("weights None", _w(2, lambda a: None), TypeError),
    ("one weights missing", lambda ws, gs: ws.pop(), ValueError),
]
BAD_STATE = [
    ("mom1 reshaped in place", _state("mom1", KEYS[0], _reshape_in_place), ValueError),
    ("lookahead reshaped in place", _state("lookahead", KEYS[2], _reshape_in_place),
     ValueError),  # (read at step 4, a lookahead sync)
    ("mom2 read-only", _state("mom2", KEYS[1], lambda a: setattr(a.flags, "writeable", False)),
     ValueError),
    ("average read-only", _state("averages", KEYS[3],
                                 lambda a: setattr(a.flags, "writeable", False)), ValueError),
    ("mom1 deleted", lambda opt: _delete("mom1")(opt, None), ValueError),
    ("lookahead deleted", lambda opt: _delete("lookahead")(opt, None), ValueError),
    ("count negative", lambda opt: opt.nr_update.__setitem__(KEYS[1], -5), ValueError),
]


def _snapshot(opt):
    return copy.deepcopy({n: getattr(opt, n) for n in ("mom1", "mom2", "averages",
                                                        "lookahead", "nr_update")})


def _assert_same_snapshot(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            numpy.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name} {key}")


def _error(opt, keys, ws, gs, lr_scale, kind):
    with pytest.raises(kind) as info:
        opt.step_many(keys, ws, gs, lr_scale=lr_scale)
    return str(info.value)


def _bad_call(twin, spoil_arrays=None, spoil_state=None, lr_scale=1.0, keys=None, kind=None):
    """step_many with bad input on the kept batch's path: the same error as the general
    path (a copy, which has no batch), nothing touched, and the batch still good."""
    for _ in range(3):
        twin.step()
    batch = twin.many._cpu.batch
    general = copy.deepcopy(twin.many)
    assert general._cpu.batch is None and twin.many._cpu.batch is batch
    if spoil_state is not None:
        spoil_state(twin.many)
        spoil_state(general)
    ws, gs = list(twin.ws), twin.gradients()
    if spoil_arrays is not None:
        spoil_arrays(ws, gs)
    keys = twin.keys if keys is None else keys
    ws_before, gs_before = copy.deepcopy(ws), copy.deepcopy(gs)
    state_before = _snapshot(twin.many)
    message = _error(twin.many, keys, ws, gs, lr_scale, kind)
    _assert_same_snapshot(_snapshot(twin.many), state_before)
    for a, b in zip(ws + gs, ws_before + gs_before):
        if isinstance(a, numpy.ndarray):
            numpy.testing.assert_array_equal(a, b)
        else:
            assert a == b
    assert message == _error(general, keys, ws, gs, lr_scale, kind)
    return message


@pytest.mark.parametrize("name,spoil,kind", BAD_ARRAYS, ids=[b[0] for b in BAD_ARRAYS])
def test_bad_arrays_on_the_kept_path(name, spoil, kind):
    twin = Twin(CONFIG)
    message = _bad_call(twin, spoil_arrays=spoil, kind=kind)
    assert "key" in message or "step_many" in message
    batch = twin.many._cpu.batch
    twin.step()  # good input again: the kept batch runs
    assert twin.many._cpu.batch is batch


@pytest.mark.parametrize("name,spoil,kind", BAD_STATE, ids=[b[0] for b in BAD_STATE])
def test_bad_state_on_the_kept_path(name, spoil, kind):
    _bad_call(Twin(CONFIG), spoil_state=spoil, kind=kind)


@pytest.mark.parametrize("lr_scale", [-1.0, math.nan, math.inf])
def test_bad_lr_scale_on_the_kept_path(lr_scale):
    message = _bad_call(Twin(CONFIG), lr_scale=lr_scale, kind=ValueError)
    assert "lr_scale" in message


def test_repeated_key_on_the_kept_path():
    message = _bad_call(Twin(CONFIG), keys=[KEYS[0], KEYS[1], KEYS[0], KEYS[3]],
                        kind=ValueError)
    assert "once" in message


class Key:
    """A key whose comparison runs Python code: at its `at`-th comparison, `hook()`
    (another update of the optimizer)."""

    def __init__(self, name, hook=None, at=1):
        self.name, self.hook, self.at = name, hook, at

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        self.at -= 1
        if self.hook is not None and self.at == 0:
            self.hook()
        return isinstance(other, Key) and self.name == other.name


def test_reentrant_update_while_the_batch_is_checked():
    """A key's __eq__ updates the optimizer while the kept batch compares keys: the
    inner call must not use (or refill) the batch being checked; the result is that of
    the inner update, then the outer one."""
    keys = [Key(i) for i in range(3)]
    twin = Twin(dict(CONFIG, lookahead_k=0), SHAPES[:3], keys)
    w_other = numpy.ones(7, "float32")
    w_other_single = w_other.copy()
    for _ in range(2):
        twin.step()
    twin.many.step_many([Key("other")], [w_other], [numpy.full(7, 0.5, "float32")])
    twin.single(Key("other"), w_other_single, numpy.full(7, 0.5, "float32"))
    twin.step()  # the batch of `keys` is kept again

    def inner():
        twin.many.step_many([Key("other")], [w_other], [numpy.full(7, 0.25, "float32")])

    twin.single(Key("other"), w_other_single, numpy.full(7, 0.25, "float32"))
    twin.step(keys=[Key(0, hook=inner), Key(1), Key(2)])
    numpy.testing.assert_array_equal(w_other, w_other_single)
    _state_equal(twin.many, twin.single, [Key("other")])
    twin.step()


def test_reentrant_update_of_the_same_keys():
    """The inner call has the batch's own keys and runs while the outer one reads the
    counts (the optimizer holds many keys, so the batch looks each one up): each call
    must update its own arrays, every one exactly once."""
    keys = [Key(i) for i in range(3)]
    twin = Twin(dict(CONFIG, lookahead_k=0), SHAPES[:3], keys, extra_keys=40)
    for _ in range(3):
        twin.step()
    inner_ws = [w.copy() for w in twin.ws]
    inner_gs = twin.gradients()
    inner_before = [w.copy() for w in inner_ws]

    def inner():
        twin.many.step_many(keys, inner_ws, inner_gs)

    keys[1].hook, keys[1].at = inner, 1  # the dicts' key: looking up an equal one runs it
    outer_keys = [Key(0), Key(1), Key(2)]
    outer_gs = twin.gradients()
    outer_before = [w.copy() for w in twin.ws]
    twin.many.step_many(outer_keys, twin.ws, outer_gs)
    assert keys[1].at < 0  # the hook ran
    for ws, gs, before in ((twin.ws, outer_gs, outer_before), (inner_ws, inner_gs, inner_before)):
        for w, g, w0 in zip(ws, gs, before):
            assert not numpy.any(g)
            assert numpy.all(w != w0)


def test_threads_sharing_one_optimizer():
    """Two threads calling step_many with the same keys on one optimizer (its kept batch
    runs without the GIL): each call updates its own arrays; none is skipped or given
    another call's arrays. (The counts of such racing calls are not defined.)"""
    import threading

    opt = Adam(0.01, grad_clip=0.0)
    keys = [(i, "W") for i in range(100)]
    opt.step_many(keys, [numpy.ones(4096, "float32") for _ in keys],
                  [numpy.ones(4096, "float32") for _ in keys])
    failures = []

    def work():
        ws = [numpy.ones(4096, "float32") for _ in keys]
        gs = [numpy.ones(4096, "float32") for _ in keys]
        for _ in range(40):
            for w, g in zip(ws, gs):
                w.fill(1.0)
                g.fill(0.75)
            opt.step_many(keys, ws, gs)
            if any(g[0] or g[-1] for g in gs) or any(w[0] == 1.0 for w in ws):
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
