"""The Optimizer's API: the spec's examples and configs, and clear errors for bad input."""
import copy
import math

import numpy
import pytest

import optim
from optim import Adam, Config, Optimizer, RAdam, SGD, registry

KEY = (0, "W")


def arrays(shape=(4, 3), dtype="float32", seed=0):
    rng = numpy.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def snapshot(opt):
    """Everything an error must leave unchanged."""
    stores = {}
    for name in ("mom1", "mom2", "averages", "lookahead"):
        store = getattr(opt, name)
        stores[name] = None if store is None else {k: v.copy() for k, v in store.items()}
    return stores, dict(opt.nr_update), dict(opt._states.shapes)


def assert_same(a, b):
    (sa, na, ha), (sb, nb, hb) = a, b
    assert na == nb and ha == hb
    for name in sa:
        if sa[name] is None:
            assert sb[name] is None
            continue
        assert sa[name].keys() == sb[name].keys()
        for k in sa[name]:
            numpy.testing.assert_array_equal(sa[name][k], sb[name][k])


def test_defaults_match_thinc():
    opt = Adam()
    assert (opt.learn_rate, opt.beta1, opt.beta2, opt.eps) == (0.001, 0.9, 0.999, 1e-8)
    assert (opt.L2, opt.grad_clip, opt.L2_is_weight_decay, opt.use_averages) == (0.0, 1.0, True, True)
    assert opt.b1 == 0.9 and opt.b2 == 0.999
    assert RAdam().use_radam and RAdam().weight_decay == 0.0
    sgd = SGD(0.1)
    assert sgd.beta1 == 0.0 and sgd.beta2 == 0.0 and sgd.use_averages


def test_spec_learn_rate_property_and_step_schedules_example():
    opt = Optimizer(learn_rate=0.001, L2=1e-6, grad_clip=1.0)
    assert opt.learn_rate == 0.001
    opt.learn_rate = 0.01
    assert opt.learn_rate == 0.01
    opt = Optimizer(learn_rate=0.001, schedules={"learn_rate": optim.decaying(0.001, 1e-4)})
    opt.step_schedules()
    assert opt.learn_rate == 0.001
    opt.step_schedules()
    assert opt.learn_rate == 0.000999900009999


def test_call_updates_in_place_and_zeroes_gradient():
    w, g = arrays()
    w0 = w.copy()
    out_w, out_g = Adam()(KEY, w, g)
    assert out_w is w and out_g is g
    assert not g.any()
    assert not numpy.array_equal(w, w0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_keeps_the_weights_dtype_and_shape(dtype):
    opt = Adam(lookahead_k=2)
    w, g = arrays((2, 3, 4), dtype)
    opt(KEY, w, g)
    for store in (opt.mom1, opt.mom2, opt.averages, opt.lookahead):
        assert store[KEY].dtype == dtype and store[KEY].shape == (2, 3, 4)


def test_empty_gradient_is_a_no_op():
    opt = Adam()
    w = numpy.zeros((0, 3), dtype="f")
    g = numpy.zeros((0, 3), dtype="f")
    assert opt(KEY, w, g) == (w, g)
    assert KEY not in opt.nr_update and not opt.mom1


CONFIGS = {
    "SGD": """
[optimizer]
@optimizers = SGD.v1
learn_rate = 0.001
L2 = 1e-6
L2_is_weight_decay = true
grad_clip = 1.0
use_averages = true
""",
    "Adam": """
[optimizer]
@optimizers = Adam.v1
learn_rate = 0.001
beta1 = 0.9
beta2 = 0.999
eps = 1e-08
L2 = 1e-6
L2_is_weight_decay = true
grad_clip = 1.0
use_averages = true
lookahead_k = 0
lookahead_alpha = 0.5
""",
    "RAdam": """
[optimizer]
@optimizers = RAdam.v1
learn_rate = 0.001
beta1 = 0.9
beta2 = 0.999
eps = 1e-08
weight_decay = 1e-6
grad_clip = 1.0
use_averages = true
lookahead_k = 0
lookahead_alpha = 0.5
""",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_configs_resolve(name):
    opt = registry.resolve(Config().from_str(CONFIGS[name]))["optimizer"]
    assert isinstance(opt, Optimizer)
    assert opt.learn_rate == 0.001 and opt.grad_clip == 1.0 and opt.use_averages
    assert opt.use_radam == (name == "RAdam")
    if name == "RAdam":
        assert opt.weight_decay == 1e-6
    else:
        assert opt.L2 == 1e-6


def test_schedule_sub_block_resolves():
    text = CONFIGS["Adam"].replace("learn_rate = 0.001\n", "") + """
[optimizer.learn_rate]
@schedules = warmup_linear.v1
initial_rate = 0.01
warmup_steps = 2
total_steps = 10
"""
    opt = registry.resolve(Config().from_str(text))["optimizer"]
    values = [opt.learn_rate]
    for _ in range(3):
        opt.step_schedules()
        values.append(opt.learn_rate)
    assert values == [0.0, 0.005, 0.01, 0.01 * 7 / 8]


@pytest.mark.parametrize("ops", [None, "numpy", "cupy"])
def test_ops_accepts_names(ops):
    assert Adam(ops=ops).ops == ops


def test_ops_accepts_thinc_ops_and_rejects_nonsense():
    thinc_api = pytest.importorskip("thinc.api")
    assert Adam(ops=thinc_api.NumpyOps()).ops == "numpy"
    with pytest.raises(ValueError, match="ops"):
        Adam(ops="tpu")


# ------------------------------------------------------------------ bad hyperparameters

@pytest.mark.parametrize("name,value", [
    ("learn_rate", -0.1), ("learn_rate", math.nan), ("learn_rate", math.inf),
    ("beta1", 1.0), ("beta2", -0.5), ("eps", -1e-8), ("L2", math.nan), ("grad_clip", -1.0),
    ("learn_rate", "fast"), ("learn_rate", None),
])
def test_bad_hyperparameters_raise_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        Adam(**{name: value})


def test_bad_schedules_raise_at_construction():
    with pytest.raises(ValueError, match="learn_rate"):
        Adam(learn_rate=[])
    with pytest.raises(ValueError, match="learn_rate"):
        Adam(learn_rate=iter([]))
    with pytest.raises(ValueError, match="learn_rate"):
        Adam(learn_rate=[0.1, "x"])
    with pytest.raises(ValueError, match="lookahead_k"):
        Adam(lookahead_k=-1)
    with pytest.raises(ValueError, match="cannot schedule"):
        Adam(schedules={"momentum": [0.1]})


def test_exhausted_iterator_keeps_its_last_value():
    opt = Adam(learn_rate=iter([0.3, 0.2]))
    assert opt.learn_rate == 0.3
    for _ in range(3):
        opt.step_schedules()
    assert opt.learn_rate == 0.2


def test_setting_a_bad_learn_rate_keeps_the_old_one():
    opt = Adam(learn_rate=0.01)
    with pytest.raises(ValueError):
        opt.learn_rate = -1.0
    assert opt.learn_rate == 0.01


# ------------------------------------------------------------------ bad arrays

def bad_calls():
    w, g = arrays()
    yield "shape mismatch", w, g[:3], ValueError, "shape"
    yield "size mismatch", w, g.ravel(), ValueError, "shape"
    yield "int weights", w.astype("int32"), g, TypeError, "float32 or float64"
    yield "float16", w.astype("float16"), g.astype("float16"), TypeError, "master copy"
    yield "mixed dtypes", w, g.astype("float64"), TypeError, "float64"
    yield "non-contiguous", numpy.asfortranarray(w.T.copy()).T.copy(order="F"), g, ValueError, "contiguous"
    yield "strided", numpy.zeros((4, 6), "f")[:, ::2], g, ValueError, "contiguous"
    ro = w.copy()
    ro.flags.writeable = False
    yield "read-only", ro, g, ValueError, "read-only"
    yield "list", w.tolist(), g, TypeError, "numpy"


@pytest.mark.parametrize("case", list(bad_calls()), ids=lambda c: c[0])
@pytest.mark.parametrize("first", [True, False], ids=["new-key", "known-key"])
def test_bad_arrays_raise_clear_errors_and_change_nothing(case, first):
    _, w, g, error, match = case
    opt = Adam(lookahead_k=2)
    if not first:
        w0, g0 = arrays()
        opt(KEY, w0, g0)
    before = snapshot(opt)
    w_before, g_before = copy.deepcopy(w), copy.deepcopy(g)
    with pytest.raises(error, match=match) as info:
        opt(KEY, w, g)
    assert repr(KEY) in str(info.value)
    assert_same(before, snapshot(opt))
    numpy.testing.assert_array_equal(numpy.asarray(w), numpy.asarray(w_before))
    numpy.testing.assert_array_equal(numpy.asarray(g), numpy.asarray(g_before))


def test_known_key_with_new_shape_is_rejected():
    opt = SGD(0.1, use_averages=False)
    w, g = arrays((4, 3))
    opt(KEY, w, g)
    w2, g2 = arrays((3, 4))
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        opt(KEY, w2, g2)
    assert opt.nr_update[KEY] == 1


@pytest.mark.parametrize("lr_scale", [-1.0, math.nan, math.inf])
def test_bad_lr_scale(lr_scale):
    opt = Adam()
    w, g = arrays()
    w0 = w.copy()
    with pytest.raises(ValueError, match="lr_scale"):
        opt(KEY, w, g, lr_scale=lr_scale)
    numpy.testing.assert_array_equal(w, w0)
    assert KEY not in opt.nr_update


def test_step_many_validates_everything_before_touching_anything():
    opt = Adam()
    good = [arrays(seed=i) for i in range(3)]
    bad_w, bad_g = arrays()
    weights = [w for w, _ in good] + [bad_w]
    grads = [g for _, g in good] + [bad_g.astype("float64")]
    before = [w.copy() for w in weights]
    with pytest.raises(TypeError, match=r"key 3"):
        opt.step_many(list(range(4)), weights, grads)
    for w, w0 in zip(weights, before):
        numpy.testing.assert_array_equal(w, w0)
    assert not opt.nr_update
    with pytest.raises(ValueError, match="once"):
        opt.step_many([1, 1], weights[:2], grads[:2])
    with pytest.raises(ValueError, match="2 gradients"):
        opt.step_many([1, 2, 3], weights[:3], grads[:2])


def test_gpu_without_cupy_names_the_extra(monkeypatch):
    import optim.backends as backends

    monkeypatch.setattr(backends, "_gpu_backend", None)
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises((ImportError, RuntimeError), match=r"optim\[cuda"):
            Adam().to_gpu()
    else:  # pragma: no cover - machines with CuPy
        pytest.skip("cupy is installed; this checks the error without it")
