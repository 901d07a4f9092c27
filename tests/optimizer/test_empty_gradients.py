"""Issue 11: a gradient with no elements is a no-op whatever the weights are, as in Thinc.

Thinc's `Optimizer.__call__` returns `(weights, gradient)` at once when the gradient is
empty, before looking at the weights. We do the same on the host path, on the device path
(the CPU-executed fake device of tests/fake_cupy.py) and in `step_many`: nothing is
allocated, no update is counted, and every check on non-empty gradients stays as strict.
"""
import shutil

import numpy
import pytest

import fake_cupy as fc
import optim
from optim import backends

FACTORIES = {
    "sgd": lambda: optim.SGD(0.1),
    "adam": lambda: optim.Adam(0.123, L2=0.1, L2_is_weight_decay=False, lookahead_k=2),
    "radam": lambda: optim.Optimizer(learn_rate=0.123, use_averages=False, use_radam=True,
                                     L2=0.1, L2_is_weight_decay=False),
}
EMPTY_SHAPES = [(0,), (0, 2), (2, 0), (3, 0, 4)]
WEIGHT_SHAPES = [(1, 2), (0,), (5,), (2, 0)]


@pytest.fixture
def device():
    backend = fc.HarnessBackend()
    previous = backends.set_gpu_backend(backend)
    try:
        yield backend
    finally:
        backends.set_gpu_backend(previous)


def assert_untouched(opt: optim.Optimizer, key) -> None:
    assert key not in opt.nr_update
    for store in (opt.mom1, opt.mom2, opt.lookahead, opt.averages or {}):
        assert key not in store


def test_the_issue_example():
    optimizer = optim.Optimizer(learn_rate=0.123, use_averages=False, use_radam=True,
                                L2=0.1, L2_is_weight_decay=False)
    _, gradient = optimizer((0, "x"), numpy.zeros((1, 2)), numpy.zeros(0))
    assert gradient.size == 0
    assert_untouched(optimizer, (0, "x"))


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("gshape", EMPTY_SHAPES)
@pytest.mark.parametrize("wshape", WEIGHT_SHAPES)
@pytest.mark.parametrize("wdtype", ["float32", "float64", "float16", "int64"])
def test_empty_gradient_host(kind, gshape, wshape, wdtype):
    opt = FACTORIES[kind]()
    w = numpy.ones(wshape, dtype=wdtype)
    g = numpy.zeros(gshape, dtype="float32")
    w_out, g_out = opt(("k", 1), w, g)
    assert w_out is w and g_out is g
    assert (w == 1).all()
    assert_untouched(opt, ("k", 1))


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_empty_gradient_for_a_known_key_keeps_its_state(kind):
    """An empty gradient for a key with state and another shape: nothing changes."""
    opt = FACTORIES[kind]()
    w = numpy.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    opt("k", w, numpy.full((2, 3), 0.5, dtype="float32"))
    before = opt.to_bytes()
    w_before = w.copy()
    opt("k", numpy.zeros((7,), dtype="float64"), numpy.zeros((0,), dtype="float64"))
    opt("k", w, numpy.zeros((0, 3), dtype="float32"))
    assert opt.nr_update["k"] == 1
    assert opt.to_bytes() == before
    numpy.testing.assert_array_equal(w, w_before)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_non_empty_gradients_are_still_checked(device, kind):
    opt = FACTORIES[kind]()
    w = numpy.zeros((1, 2), dtype="float32")
    with pytest.raises(ValueError, match="shape"):
        opt("k", w, numpy.zeros((2,), dtype="float32"))
    with pytest.raises(TypeError, match="float64"):
        opt("k", w, numpy.zeros((1, 2), dtype="float64"))
    with pytest.raises(TypeError):
        opt("k", w, fc.to_fake_device(numpy.zeros((1, 2), dtype="float32")))
    assert_untouched(opt, "k")


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_step_many_skips_empty_gradients(kind):
    """Empty entries are dropped before any check; the others update exactly as alone."""
    rng = numpy.random.default_rng(3)
    ws = [rng.standard_normal(s).astype("float32") for s in [(4, 3), (5,), (2, 2)]]
    gs = [rng.standard_normal(w.shape).astype("float32") for w in ws]
    many, single = FACTORIES[kind](), FACTORIES[kind]()
    ws_single = [w.copy() for w in ws]
    for key, w, g in zip("abc", ws_single, gs):
        single(key, w, g.copy())
    keys = ["a", "empty1", "b", "empty2", "c"]
    weights = [ws[0], numpy.zeros((1, 2)), ws[1], numpy.zeros(3, dtype="float16"), ws[2]]
    grads = [gs[0].copy(), numpy.zeros(0), gs[1].copy(), numpy.zeros((0, 4)), gs[2].copy()]
    many.step_many(keys, weights, grads)
    for w, w_single in zip(ws, ws_single):
        numpy.testing.assert_array_equal(w, w_single)
    assert_untouched(many, "empty1")
    assert_untouched(many, "empty2")
    assert many.nr_update["a"] == 1
    # the hot path (all keys known) skips them too
    many.step_many(keys, weights, [g.copy() if g.size else g for g in grads])
    assert many.nr_update["a"] == 2
    assert_untouched(many, "empty1")


@pytest.mark.skipif(not shutil.which("g++"), reason="g++ runs the GPU kernels on the host")
@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("gshape", [(0,), (2, 0)])
def test_empty_gradient_on_the_device(device, kind, gshape):
    opt = FACTORIES[kind]()
    w = fc.to_fake_device(numpy.ones((1, 2), dtype="float32"))
    g = fc.to_fake_device(numpy.zeros(gshape, dtype="float32"))
    w_out, g_out = opt(("k", 1), w, g)
    assert w_out is w and g_out is g
    assert_untouched(opt, ("k", 1))
    assert device.launches == []
    # a known device key: step_many with an empty entry launches only for the others
    w2 = fc.to_fake_device(numpy.ones((3,), dtype="float32"))
    opt.step_many(["x", "y"], [w2, w], [fc.to_fake_device(numpy.full(3, 0.5, "float32")), g])
    assert opt.nr_update["x"] == 1
    assert_untouched(opt, "y")
    assert device.launches and all("sum_squares" in n or n.startswith("optim_")
                                   for n in device.launches)
    assert not (w2.view(numpy.ndarray) == 1).all()


def test_documented_differences_from_thinc():
    """docs/numerics.md: (5, 0) gradients are no-ops here, 0-d gradients are updated."""
    thinc_api = pytest.importorskip("thinc.api")
    ours, theirs = optim.Adam(0.1), thinc_api.Adam(0.1)
    for opt in (ours, theirs):
        opt(("k", 1), numpy.zeros((5, 0), dtype="f"), numpy.zeros((5, 0), dtype="f"))
    assert ("k", 1) not in ours.nr_update
    assert theirs.nr_update[("k", 1)] == 1
    w = numpy.array(1.0, dtype="f")
    ours("s", w, numpy.array(0.5, dtype="f"))
    assert ours.nr_update["s"] == 1 and w < 1.0
    with pytest.raises(TypeError):
        theirs(("s", 1), numpy.array(1.0, dtype="f"), numpy.array(0.5, dtype="f"))
