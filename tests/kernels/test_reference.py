"""optim's Optimizer against the independent NumPy reference (tests/reference.py).

The reference implements docs/numerics.md in float64 with whole-array NumPy; these
tests drive both with the same random inputs over random shapes, dtypes,
hyperparameters, keys and steps, and compare after every single call.

Tolerances
----------
float64 arrays: rtol 1e-10 (and atol 1e-10 * max|expected|). Both sides compute in
double; they differ only in the order of the scalar folding (lr * s * correction) and
of the per-element arithmetic, a few ulps (~1e-16) per step. Over <= 10 steps nothing
amplifies that by more than ~1e2, so 1e-10 has a wide margin yet catches any formula
error, which shows at 1e-6 or more.

float32 arrays: rtol 1e-5 (and atol 1e-5 * max|expected|, for elements that pass
through zero by cancellation, e.g. a moment whose gradients change sign). The
implementation rounds every stored value to float32 each step (~6e-8 relative), the
reference does not; after <= 10 steps that is < 1e-6. 1e-5 leaves 10x margin; formula
errors (a wrong bias correction, averages decay, decay placement, clip factor...)
show at 1e-3 or more.
"""
import math

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import ReferenceOptimizer, radam_rho

from optim import Adam, Optimizer, RAdam, SGD, _kernels

TOL = {numpy.dtype("float32"): 1e-5, numpy.dtype("float64"): 1e-10}

SETTINGS = settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_close(actual, expected, dtype, what, scale_from=()):
    """|actual - expected| <= tol * |expected| + tol * scale, where scale is the largest
    magnitude among `expected` and the inputs it was computed from (`scale_from`): an
    update like w - step can cancel to ~0, and its rounding error is relative to |w| and
    |step|, not to the small result (this matters for tiny arrays)."""
    actual = numpy.asarray(actual)
    expected = numpy.asarray(expected, dtype="float64")
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = TOL[numpy.dtype(dtype)]
    scale = max([float(numpy.max(numpy.abs(a))) for a in (expected, *scale_from)
                 if numpy.size(a)] or [0.0])
    numpy.testing.assert_allclose(
        actual.astype("float64"), expected, rtol=tol, atol=tol * scale + 1e-300,
        err_msg=what,
    )


# ---------------------------------------------------------------- strategies

@st.composite
def shapes(draw):
    ndim = draw(st.integers(1, 3))
    if ndim == 1:
        return (draw(st.integers(1, 2000)),)
    if ndim == 2:
        return (draw(st.integers(1, 44)), draw(st.integers(1, 44)))
    return tuple(draw(st.integers(1, 12)) for _ in range(3))


@st.composite
def hyperparams(draw):
    kind = draw(st.sampled_from(["sgd", "adam", "radam"]))
    hp = dict(
        learn_rate=draw(st.sampled_from([1e-4, 1e-3, 0.01, 0.1, 0.3])
                        | st.floats(1e-4, 0.3)),
        L2=draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.1])),
        L2_is_weight_decay=draw(st.booleans()),
        grad_clip=draw(st.sampled_from([0.0, 0.1, 1.0, 10.0])),
        use_averages=draw(st.booleans()),
        lookahead_k=draw(st.sampled_from([0, 0, 1, 2, 3])),
        lookahead_alpha=draw(st.sampled_from([0.5, 1.0]) | st.floats(0.05, 1.0)),
    )
    if kind == "sgd":
        hp.update(beta1=0.0, beta2=0.0, use_radam=False)
    else:
        hp["eps"] = draw(st.sampled_from([1e-8, 1e-6, 1e-3]))
        # small beta2 values make RAdam cross its rectification threshold
        # (rho_t >= 5) within a few steps: t = 6 for beta2 in [0.9, 0.999], 7 for 0.8.
        b2 = draw(st.sampled_from([0.8, 0.9, 0.99, 0.999]) | st.floats(0.5, 0.999))
        b1 = draw(st.sampled_from([0.0, 0.5, 0.9]) | st.floats(0.0, 0.95))
        if kind == "adam":
            # Adam runs whenever either beta is non-zero (incl. beta1 > 0, beta2 == 0).
            if draw(st.booleans()) and b1 > 0:
                b2 = 0.0
                # With beta2 == 0, v = g_eff**2 of this step alone, and the direction
                # m / sqrt(v) divides by |g_eff|. Coupled L2 makes g_eff = g + L2 * w,
                # which can cancel to ~0 for one element; its rounding (float32 in the
                # kernel, float64 here) then moves m / |g_eff| by any amount. That is
                # ill-conditioning, not a formula error, so that combination is left out.
                hp["L2_is_weight_decay"] = True
            hp.update(beta1=b1, beta2=b2, use_radam=False)
        else:
            hp.update(beta1=b1, beta2=b2, use_radam=True,
                      weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])))
    return hp


def _arrays(rng, shape, dtype, wscale, gscale):
    w = (rng.standard_normal(shape) * wscale).astype(dtype)
    g = (rng.standard_normal(shape) * gscale).astype(dtype)
    return w, g


# ---------------------------------------------------------------- the main test

def _run(hp, specs, n_rounds, lr_schedule, seed, gscale):
    """specs: list of (key, shape, dtype). Drive optim and the reference; compare."""
    rng = numpy.random.default_rng(seed)
    kwargs = dict(hp)
    if lr_schedule:
        lrs = [hp["learn_rate"] * f for f in rng.uniform(0.2, 1.5, size=n_rounds)]
        kwargs["learn_rate"] = list(lrs)
    opt = Optimizer(**kwargs)
    ref = ReferenceOptimizer(**hp)
    weights = {}
    for key, shape, dtype in specs:
        weights[key] = (rng.standard_normal(shape) * rng.choice([1e-2, 1.0, 3.0])).astype(dtype)
    for r in range(n_rounds):
        if lr_schedule:
            ref.learn_rate = lrs[r]
            assert opt.learn_rate == lrs[r]
        order = rng.permutation(len(specs))
        for i in order:
            if len(specs) > 1 and rng.random() < 0.2:
                continue  # keys advance at different rates
            key, shape, dtype = specs[i]
            w = weights[key]
            g = (rng.standard_normal(shape) * gscale).astype(dtype)
            s = float(rng.choice([1.0, 1.0, 0.5, 2.0, 0.1]))
            prev = {name: getattr(ref, name).get(key, numpy.zeros(0)).copy()
                    for name in ("mom1", "mom2", "lookahead")}
            prev["averages"] = (ref.averages.get(key, numpy.zeros(0)).copy()
                                if ref.averages is not None else None)
            w_prev = w.astype("float64")
            expected = ref.step(key, w, g, lr_scale=s)
            w_out, g_out = opt(key, w, g, lr_scale=s)
            t = ref.nr_update[key]
            ctx = f"key={key} t={t} dtype={dtype} shape={shape} hp={hp} s={s}"
            assert numpy.shares_memory(w_out, w) and numpy.shares_memory(g_out, g), ctx
            assert w.dtype == numpy.dtype(dtype) and w.shape == shape, ctx
            assert not numpy.any(g), f"gradient not zeroed: {ctx}"
            assert opt.nr_update[key] == t, ctx
            g64 = g.astype("float64")
            assert_close(w, expected, dtype, f"weights {ctx}", (w_prev,))
            if ref.kind() != "sgd":
                for name, inputs in (("mom1", (prev["mom1"], g64)),
                                     ("mom2", (prev["mom2"], g64 * g64))):
                    got = getattr(opt, name)[key]
                    assert got.dtype == w.dtype, f"{name} dtype {ctx}"
                    assert_close(got, getattr(ref, name)[key], dtype, f"{name} {ctx}", inputs)
            if hp["use_averages"]:
                avg = opt.averages[key]
                assert avg.dtype == w.dtype, f"averages dtype {ctx}"
                assert_close(avg, ref.averages[key], dtype, f"averages {ctx}",
                             (prev["averages"], w_prev))
            else:
                assert opt.averages is None
            if hp["lookahead_k"] > 0:
                assert_close(opt.lookahead[key], ref.lookahead[key], dtype,
                             f"lookahead slow weights {ctx}", (prev["lookahead"], w_prev))
        if lr_schedule:
            opt.step_schedules()


@SETTINGS
@given(
    hp=hyperparams(),
    shapes_=st.lists(shapes(), min_size=1, max_size=3),
    dtypes=st.lists(st.sampled_from(["float32", "float64"]), min_size=3, max_size=3),
    n_rounds=st.integers(1, 10),
    lr_schedule=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    gscale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
)
def test_optimizer_matches_reference(hp, shapes_, dtypes, n_rounds, lr_schedule, seed, gscale):
    keys = [(i, "W") if i % 2 == 0 else ("layer", i) for i in range(len(shapes_))]
    specs = [(k, sh, dtypes[i]) for i, (k, sh) in enumerate(zip(keys, shapes_))]
    _run(hp, specs, n_rounds, lr_schedule, seed, gscale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("beta2", [0.8, 0.9, 0.999])
def test_radam_both_branches_many_steps(dtype, beta2):
    """RAdam over 12 steps: the first updates are un-rectified, later ones rectified."""
    rect = [radam_rho(t, beta2) >= 5 for t in range(1, 13)]
    assert not rect[0] and rect[-1]  # the run crosses the threshold
    hp = dict(learn_rate=0.01, beta1=0.9, beta2=beta2, eps=1e-8, L2=1e-3,
              L2_is_weight_decay=True, grad_clip=1.0, use_averages=True,
              lookahead_k=0, lookahead_alpha=0.5, use_radam=True, weight_decay=0.01)
    _run(hp, [((0, "W"), (37, 5), dtype)], 12, False, 1234, 1.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_many_steps(dtype):
    """Adam over 200 steps with every option on: no drift beyond rounding."""
    hp = dict(learn_rate=0.01, beta1=0.9, beta2=0.999, eps=1e-8, L2=1e-2,
              L2_is_weight_decay=False, grad_clip=1.0, use_averages=True,
              lookahead_k=5, lookahead_alpha=0.5, use_radam=False)
    # float32 over 200 steps: ~200 roundings, allow 4x the per-10-step tolerance
    old = TOL[numpy.dtype("float32")]
    TOL[numpy.dtype("float32")] = 4e-5
    try:
        _run(hp, [((0, "W"), (300,), dtype), ((1, "b"), (3,), dtype)], 200, False, 7, 0.5)
    finally:
        TOL[numpy.dtype("float32")] = old


@pytest.mark.parametrize("n", [65537, 1_000_003])
@pytest.mark.parametrize("kind", ["sgd", "adam", "radam"])
def test_large_arrays(n, kind):
    """Sizes past any blocking/threading threshold, odd lengths, every option on."""
    hp = dict(learn_rate=0.01, L2=1e-3, L2_is_weight_decay=kind != "adam", grad_clip=1.0,
              use_averages=True, lookahead_k=2, lookahead_alpha=0.5)
    if kind == "sgd":
        hp.update(beta1=0.0, beta2=0.0, use_radam=False)
    else:
        hp.update(beta1=0.9, beta2=0.9, use_radam=kind == "radam",
                  weight_decay=0.01 if kind == "radam" else 0.0)
    _run(hp, [((0, "W"), (n,), "float32")], 3, False, 11, 1.0)


def test_clip_norm_accumulates_in_double():
    """SGD, lr 1, w = 0, one huge float32 gradient: w = -g * grad_clip / ||g||. A float32
    accumulator over 4M elements would be off by ~1e-4; the contract's double sum is
    exact to ~1e-7, which the per-element float32 rounding (6e-8) lets us see."""
    rng = numpy.random.default_rng(0)
    g = (rng.standard_normal(4_000_000) + 0.5).astype("float32")
    norm = math.sqrt(float(numpy.sum(g.astype("float64") ** 2)))
    w = numpy.zeros_like(g)
    SGD(1.0, grad_clip=1.0, use_averages=False)("k", w, g.copy())
    numpy.testing.assert_allclose(w, -g.astype("float64") / norm, rtol=3e-7)


@pytest.mark.parametrize("kind", ["adam", "radam"])
@pytest.mark.parametrize("beta1,beta2", [(0.9, 0.999), (0.999, 0.9999), (0.5, 0.99999)])
def test_moment_coefficients_are_computed_in_double(kind, beta1, beta2):
    """float32, first update: m = (1 - beta1) * g and v = (1 - beta2) * g * g to float32
    rounding (~2e-7). The coefficients are per-call scalars (docs/numerics.md: computed
    once, in double). Forming 1 - beta2 in float32 from float32(beta2) instead is off by
    1.3e-5 (beta2 = 0.999), 1.7e-4 (0.9999), 1.4e-3 (0.99999) relative (Thinc's CPU
    kernel has that bias; see test_against_thinc.py)."""
    opt = Optimizer(0.001, beta1=beta1, beta2=beta2, grad_clip=0.0, use_radam=kind == "radam")
    g = numpy.linspace(-2.0, 3.0, 101).astype("float32")
    w = numpy.zeros_like(g)
    opt("k", w, g.copy())
    g64 = g.astype("float64")
    numpy.testing.assert_allclose(opt.mom1["k"], (1 - beta1) * g64, rtol=3e-7, atol=0,
                                  err_msg="mom1")
    numpy.testing.assert_allclose(opt.mom2["k"], (1 - beta2) * g64 * g64, rtol=3e-7, atol=0,
                                  err_msg="mom2")


def test_lookahead_first_sync_is_not_a_scale_by_alpha():
    """Slow weights start as a copy of the weights (not zeros): with lr = 0 and k = 1
    the weights must not move (Thinc's pre-release scaled them by alpha)."""
    opt = SGD(0.0, lookahead_k=1, lookahead_alpha=0.5, use_averages=False, grad_clip=0.0)
    w = numpy.linspace(-1, 1, 11, dtype="float32")
    w0 = w.copy()
    opt((0, "W"), w, numpy.ones_like(w))
    numpy.testing.assert_array_equal(w, w0)


# ---------------------------------------------------------------- factories

FACTORY_CASES = [
    (SGD, dict(learn_rate=0.1), dict(learn_rate=0.1, beta1=0.0, beta2=0.0)),
    (Adam, dict(), dict()),
    (Adam, dict(learn_rate=0.02, L2=1e-3, L2_is_weight_decay=False, grad_clip=0.0),
     dict(learn_rate=0.02, L2=1e-3, L2_is_weight_decay=False, grad_clip=0.0)),
    (RAdam, dict(), dict(use_radam=True)),
    (RAdam, dict(learn_rate=0.01, weight_decay=0.1, beta2=0.9),
     dict(learn_rate=0.01, weight_decay=0.1, beta2=0.9, use_radam=True)),
]


@pytest.mark.parametrize("factory,args,ref_args", FACTORY_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_factories_and_defaults(factory, args, ref_args, dtype):
    """SGD/Adam/RAdam with Thinc's defaults (Adam: lr 0.001, betas 0.9/0.999, eps 1e-8,
    L2 0, grad_clip 1.0, L2_is_weight_decay True, use_averages True)."""
    opt = factory(**args)
    ref = ReferenceOptimizer(**ref_args)
    assert opt.averages is not None  # use_averages defaults to True
    if "learn_rate" not in args:
        assert opt.learn_rate == 0.001
    rng = numpy.random.default_rng(3)
    w = rng.standard_normal((20, 3)).astype(dtype)
    for t in range(1, 9):
        g = (rng.standard_normal((20, 3)) * (0.05 if t % 2 else 3.0)).astype(dtype)
        expected = ref.step("k", w, g)
        opt("k", w, g)
        assert_close(w, expected, dtype, f"{factory.__name__} t={t}")
        assert_close(opt.averages["k"], ref.averages["k"], dtype, "averages")


# ---------------------------------------------------------------- step_many

def _state_equal(a, b, keys):
    for key in keys:
        assert a.nr_update[key] == b.nr_update[key]
        for name in ("mom1", "mom2"):
            da, db = getattr(a, name), getattr(b, name)
            assert (key in da) == (key in db), name
            if key in da:
                numpy.testing.assert_array_equal(da[key], db[key], err_msg=f"{name} {key}")
        if a.averages is not None or b.averages is not None:
            numpy.testing.assert_array_equal(a.averages[key], b.averages[key],
                                             err_msg=f"averages {key}")
        assert (key in a.lookahead) == (key in b.lookahead)
        if key in a.lookahead:
            numpy.testing.assert_array_equal(a.lookahead[key], b.lookahead[key],
                                             err_msg=f"lookahead {key}")


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    hp=hyperparams(),
    shapes_=st.lists(shapes(), min_size=1, max_size=4),
    dtype=st.sampled_from(["float32", "float64"]),
    n_rounds=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    gscale=st.sampled_from([1e-3, 1.0, 10.0]),
    lr_scale=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_step_many_equals_single_calls_bitwise(hp, shapes_, dtype, n_rounds, seed, gscale, lr_scale):
    rng = numpy.random.default_rng(seed)
    keys = [(i, "W") for i in range(len(shapes_))]
    many, single = Optimizer(**hp), Optimizer(**hp)
    ws = [(rng.standard_normal(sh)).astype(dtype) for sh in shapes_]
    ws_single = [w.copy() for w in ws]
    for r in range(n_rounds):
        gs = [(rng.standard_normal(sh) * gscale).astype(dtype) for sh in shapes_]
        gs_single = [g.copy() for g in gs]
        many.step_many(keys, ws, gs, lr_scale=lr_scale)
        for key, w, g in zip(keys, ws_single, gs_single):
            single(key, w, g, lr_scale=lr_scale)
        for i, key in enumerate(keys):
            numpy.testing.assert_array_equal(ws[i], ws_single[i], err_msg=f"weights {key} round {r}")
            numpy.testing.assert_array_equal(gs[i], gs_single[i], err_msg=f"gradient {key}")
            assert not numpy.any(gs[i])
        _state_equal(many, single, keys)


def test_step_many_repeated_key():
    """The same key twice in one step_many call: either exactly as if called in order
    (t goes 1, 2), or a ValueError raised before any array or state is touched."""
    rng = numpy.random.default_rng(5)
    many, single = Adam(0.01), Adam(0.01)
    w = rng.standard_normal(50).astype("float32")
    w0, w2 = w.copy(), w.copy()
    g1 = rng.standard_normal(50).astype("float32")
    g2 = rng.standard_normal(50).astype("float32")
    gs = [g1.copy(), g2.copy()]
    try:
        many.step_many(["k", "k"], [w, w], gs)
    except ValueError as err:
        assert "k" in str(err) or "key" in str(err)
        numpy.testing.assert_array_equal(w, w0)
        numpy.testing.assert_array_equal(gs[0], g1)
        numpy.testing.assert_array_equal(gs[1], g2)
        assert "k" not in many.mom1 and many.nr_update.get("k", 0) == 0
        return
    single("k", w2, g1.copy())
    single("k", w2, g2.copy())
    numpy.testing.assert_array_equal(w, w2)
    assert many.nr_update["k"] == 2
    _state_equal(many, single, ["k"])


@pytest.mark.parametrize("factory", [SGD, Adam, RAdam])
def test_empty_gradient_is_a_no_op(factory):
    """As in Thinc: returns (weights, gradient) untouched and counts no update."""
    opt = factory(0.01)
    w, g = numpy.zeros((0, 5), dtype="float32"), numpy.zeros((0, 5), dtype="float32")
    w_out, g_out = opt((3, "W"), w, g)
    assert w_out is w and g_out is g
    assert opt.nr_update.get((3, "W"), 0) == 0
    # and the key still works normally afterwards, from t = 1
    ref = ReferenceOptimizer(0.01, **({"beta1": 0.0, "beta2": 0.0} if factory is SGD else
                                      {"use_radam": factory is RAdam}))
    w = numpy.linspace(-1, 1, 12, dtype="float32")
    g = numpy.linspace(1, -2, 12, dtype="float32")
    expected = ref.step((3, "W"), w, g)
    opt((3, "W"), w, g)
    assert opt.nr_update[(3, "W")] == 1
    assert_close(w, expected, "float32", "after an empty update")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("b1s,b2s", [
    ([0.0, 0.9, 0.9, 0.0, 0.9], [0.0, 0.999, 0.999, 0.0, 0.99]),  # SGD -> Adam -> SGD -> Adam
    ([0.9, 0.0, 0.0, 0.5], [0.999, 0.0, 0.0, 0.9]),               # Adam -> SGD -> Adam
], ids=["sgd-first", "adam-first"])
def test_scheduled_betas_switch_between_sgd_and_adam(dtype, b1s, b2s):
    """Which update runs is decided per call from the current betas (docs/numerics.md),
    so a beta schedule that starts at 0 (momentum warm-up) turns SGD into Adam mid-run;
    the moments start at zeros when first needed, as in Thinc (t counts every update)."""
    opt = Optimizer(0.05, beta1=list(b1s), beta2=list(b2s), grad_clip=0.0)
    ref = ReferenceOptimizer(0.05, grad_clip=0.0)
    rng = numpy.random.default_rng(2)
    w = rng.standard_normal((6, 7)).astype(dtype)
    for i, (b1, b2) in enumerate(zip(b1s, b2s)):
        ref.beta1, ref.beta2 = b1, b2
        g = rng.standard_normal((6, 7)).astype(dtype)
        expected = ref.step("k", w, g)
        opt("k", w, g)
        assert_close(w, expected, dtype, f"update {i + 1} (beta1={b1}, beta2={b2})")
        assert_close(opt.averages["k"], ref.averages["k"], dtype, f"averages {i + 1}")
        opt.step_schedules()


@settings(max_examples=60, deadline=None)
@given(n=st.one_of(st.integers(0, 70), st.integers(4000, 4200),
                   st.sampled_from([32 * 4096, 32 * 4096 + 1, 33 * 4096 - 1, 100_003])),
       dtype=st.sampled_from([numpy.float32, numpy.float64]),
       l2=st.one_of(st.just(0.0), st.floats(0.0, 2.0)), scale=st.sampled_from([1e-20, 1.0, 1e15]),
       seed=st.integers(0, 2**32 - 1))
def test_clip_norm_order_is_the_documented_one(n, dtype, l2, scale, seed):
    """The kernels' sum of squares equals, bit for bit, the NumPy spelling of the fixed
    order in docs/numerics.md (chunks of 4096, 32 lanes, pairwise lane tree)."""
    from reference import clip_sum_squares

    rng = numpy.random.default_rng(seed)
    g = (rng.standard_normal(n) * scale).astype(dtype)
    w = rng.standard_normal(n).astype(dtype)
    got = _kernels.clip_sum_squares(g, w, l2)
    assert got == clip_sum_squares(g, w, l2)
    naive = float(numpy.sum((g + dtype(l2) * w).astype(numpy.float64) ** 2))
    assert math.isclose(got, naive, rel_tol=1e-12, abs_tol=0.0) or got == naive
