"""The non-finite skip (issue 22): nonfinite = "apply" | "skip" | "raise".

The contract of "skip": an update whose gradient holds a NaN or an inf changes nothing
but the gradient (zeroed): every weight and state array is bitwise that of a run in
which the call was never made, per call and through step_many, at every SIMD level and
thread count. "raise" writes nothing and names the key, the step and NaN or inf.
"""
import warnings

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optim import Adam, Optimizer, RAdam, SGD, _kernels
from optim import cpu
from optim import NonFiniteError

KEYS = [("a", "W"), ("b", "W"), ("c", "b"), ("d", "W")]
SIZES = {("a", "W"): 70000, ("b", "W"): 300, ("c", "b"): 7, ("d", "W"): 5000}
POISON = {(4, ("b", "W")): numpy.nan, (9, ("d", "W")): numpy.inf,
          (11, ("a", "W")): -numpy.inf}
FACTORIES = {
    "adam": lambda **kw: Adam(0.01, **kw),  # Thinc's defaults: clipping and averages
    "adam_noclip_la": lambda **kw: Adam(0.01, grad_clip=0.0, lookahead_k=3, L2=0.01,
                                        L2_is_weight_decay=False, **kw),
    "sgd": lambda **kw: SGD(0.05, **kw),
    "sgd_noclip": lambda **kw: SGD(0.05, grad_clip=0.0, **kw),  # the check without a norm
    "radam": lambda **kw: RAdam(0.01, weight_decay=0.01, **kw),
}


def run(factory, mode, via, steps=14, poison=True, omit=False, dtype=numpy.float32):
    """Drive an optimizer over KEYS; at the POISON calls put a NaN/inf into one element
    of the gradient (poison), or leave the call out altogether (omit)."""
    opt = factory(nonfinite=mode)
    rng = numpy.random.RandomState(0)
    w = {k: rng.randn(SIZES[k]).astype(dtype) for k in KEYS}
    for step in range(steps):
        grads = {k: rng.randn(SIZES[k]).astype(dtype) for k in KEYS}
        keys = list(KEYS)
        for (at, key), value in POISON.items():
            if at == step:
                if omit:
                    keys.remove(key)
                elif poison:
                    grads[key][SIZES[key] // 2] = value
        if via == "step_many":
            opt.step_many(keys, [w[k] for k in keys], [grads[k] for k in keys])
        else:
            for k in keys:
                opt(k, w[k], grads[k])
        for k in keys:
            assert not grads[k].any(), "the gradient is zeroed, skipped or not"
        opt.step_schedules()
    return opt, w


def assert_same(opt_a, w_a, opt_b, w_b):
    for k in KEYS:
        assert w_a[k].tobytes() == w_b[k].tobytes(), k
    for name in ("mom1", "mom2", "averages", "lookahead"):
        a, b = getattr(opt_a, name), getattr(opt_b, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys(), name
            for k in a:
                assert a[k].tobytes() == b[k].tobytes(), (name, k)
    assert dict(opt_a.nr_update) == dict(opt_b.nr_update)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("via", ["per_call", "step_many"])
def test_skip_is_bitwise_the_run_without_those_calls(kind, via):
    skipped, w_skip = run(FACTORIES[kind], "skip", via)
    omitted, w_omit = run(FACTORIES[kind], "apply", via, omit=True)
    assert_same(skipped, w_skip, omitted, w_omit)
    assert skipped.skipped == {("b", "W"): 1, ("d", "W"): 1, ("a", "W"): 1}
    assert skipped.skipped_total == 3
    for k in KEYS:
        assert numpy.isfinite(w_skip[k]).all()


@pytest.mark.parametrize("isa", cpu.available_isas())
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_skip_at_every_simd_level_and_thread_count(isa, threads):
    """Clipped (the norm decides), unclipped (the scan decides), with coupled L2: the run
    without the skipped calls, and the same bits as the default level on one thread."""
    reference = {(kind, via): run(FACTORIES[kind], "skip", via, steps=12)
                 for kind in ("adam", "sgd_noclip", "adam_noclip_la")
                 for via in ("per_call", "step_many")}
    before = cpu.config()
    try:
        cpu._set_isa(isa)
        cpu.set_num_threads(threads)
        for (kind, via), (ref_opt, ref_w) in reference.items():
            skipped, w_skip = run(FACTORIES[kind], "skip", via, steps=12)
            omitted, w_omit = run(FACTORIES[kind], "apply", via, steps=12, omit=True)
            assert_same(skipped, w_skip, omitted, w_omit)
            assert_same(skipped, w_skip, ref_opt, ref_w)
    finally:
        cpu._set_isa(before["isa"])
        cpu.set_num_threads(before["threads"])


@pytest.mark.parametrize("via", ["per_call", "step_many"])
def test_apply_mode_keeps_thincs_numbers(via):
    """The default writes the NaN into the weights, as Thinc does (and as before)."""
    opt, w = run(FACTORIES["sgd"], "apply", via, steps=6)
    assert numpy.isnan(w[("b", "W")]).any()
    assert opt.skipped == {} and Optimizer(0.1).nonfinite == "apply"


@pytest.mark.parametrize("via", ["per_call", "step_many"])
@pytest.mark.parametrize("value,word", [(numpy.nan, "a NaN"), (numpy.inf, "an infinity")])
def test_raise_writes_nothing_and_names_key_step_and_kind(via, value, word):
    opt = Adam(0.01, nonfinite="raise")
    opt.bind({("m", "W"): "tagger/softmax/W", ("m", "b"): "tagger/softmax/b"})
    w = {k: numpy.ones(100, "f") for k in [("m", "W"), ("m", "b")]}
    for _ in range(2):
        opt.step_many(list(w), list(w.values()), [numpy.ones(100, "f") for _ in w])
        opt.step_schedules()
    before = {k: v.copy() for k, v in w.items()}
    state = opt.to_bytes()
    grads = [numpy.ones(100, "f"), numpy.ones(100, "f")]
    grads[1][17] = value
    match = (rf"key \('m', 'b'\) \(tagger/softmax/b\): the gradient holds {word} at step 2 "
             r"\(update 3 of this key\); nothing was written")
    with pytest.raises(FloatingPointError, match=match):
        if via == "step_many":
            opt.step_many(list(w), list(w.values()), grads)
        else:
            for k, g in zip(w, grads):
                opt(k, w[k], g)
    if via == "step_many":  # nothing of the call, not even the finite key's update
        assert all(w[k].tobytes() == before[k].tobytes() for k in w)
        assert opt.to_bytes() == state
        assert grads[0].all() and numpy.isnan(grads[1][17]) or numpy.isinf(grads[1][17])
    else:
        assert w[("m", "b")].tobytes() == before[("m", "b")].tobytes()
        assert opt.nr_update[("m", "b")] == 2


def test_an_overflowing_sum_of_finite_squares_is_not_skipped():
    """float64 values near 1e200: the sum of squares overflows, the gradient is finite.
    Skip mode confirms by a scan and updates as apply mode does."""
    a, b = Adam(0.01, nonfinite="skip"), Adam(0.01)
    wa = numpy.linspace(-1, 1, 50)
    wb = wa.copy()
    g = numpy.full(50, 1e200)
    a("k", wa, g.copy())
    b("k", wb, g.copy())
    assert wa.tobytes() == wb.tobytes() and a.skipped == {} and a.nr_update["k"] == 1


def test_coupled_l2_counts_the_weights_in_the_term():
    """With coupled L2 the checked term is g + L2*w, as the clip norm's."""
    opt = SGD(0.1, L2=0.1, L2_is_weight_decay=False, nonfinite="skip")
    w = numpy.full(8, 3e38, "f")
    g = numpy.full(8, 3.3e38, "f")  # both finite; g + 0.1*w overflows float32: inf
    opt("k", w, g)
    assert opt.skipped == {"k": 1} and (w == numpy.float32(3e38)).all() and not g.any()
    plain = SGD(0.1, L2=0.1, L2_is_weight_decay=False, nonfinite="skip")
    plain("k", w, numpy.full(8, 3.3e38, "f") / 2)  # finite terms: updated
    assert plain.skipped == {} and plain.nr_update["k"] == 1


def test_first_update_skipped_leaves_no_state_and_counts_survive_a_save():
    opt = Adam(0.01, nonfinite="skip")
    w, g = numpy.ones(4, "f"), numpy.array([1, numpy.nan, 1, 1], "f")
    opt("new", w, g)
    assert "new" not in opt.nr_update and "new" not in opt.mom1 and opt.skipped == {"new": 1}
    loaded = Optimizer.load_bytes(opt.to_bytes())
    assert loaded.skipped == {"new": 1} and loaded.nonfinite == "skip"


def test_non_finite_weights_are_named_not_blamed_on_the_gradient():
    opt = SGD(0.1, L2=0.1, L2_is_weight_decay=False, nonfinite="skip")
    w = numpy.array([1, numpy.nan, 1], "f")
    with pytest.warns(RuntimeWarning, match=r"key .k.: skipped .* Its weights are already "
                                            r"non-finite"):
        opt("k", w, numpy.ones(3, "f"))
    with warnings.catch_warnings():  # once per key, not once per step
        warnings.simplefilter("error")
        opt("k", w, numpy.ones(3, "f"))
    assert opt.skipped == {"k": 2}
    strict = SGD(0.1, L2=0.1, L2_is_weight_decay=False, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="Its weights are already non-finite"):
        strict("k", w, numpy.ones(3, "f"))


def test_consecutive_skip_limit_stops_a_dead_run():
    opt = Adam(0.01, nonfinite="skip", max_consecutive_skips=3)
    opt.bind({"k": "tok2vec/embed/E"})
    w = numpy.ones(4, "f")
    bad = lambda: numpy.array([1, numpy.inf, 1, 1], "f")  # noqa: E731
    for _ in range(2):
        opt("k", w, bad())
        opt.step_schedules()
    opt("k", w, numpy.ones(4, "f"))  # a clean step resets the run
    opt.step_schedules()
    for _ in range(2):
        opt("k", w, bad())
        opt.step_schedules()
    opt("k", w, bad())
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps skipped .*"
                                             r"max_consecutive_skips=3.*tok2vec/embed/E"):
        opt.step_schedules()


@pytest.mark.parametrize("kwargs,message", [
    ({"nonfinite": "ignore"}, "nonfinite must be one of 'apply', 'skip', 'raise', got 'ignore'"),
    ({"nonfinite": None}, "nonfinite must be one of"),
    ({"max_consecutive_skips": 0}, "max_consecutive_skips must be None .* or an integer >= 1"),
    ({"max_consecutive_skips": 2.5}, "max_consecutive_skips must be"),
])
def test_bad_settings_fail_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adam(**kwargs)


def test_groups_and_skip_compose():
    """A frozen group is never checked (its gradient is only zeroed); another group's
    settings apply to the keys it skips as to those it updates."""
    opt = Adam(0.01, nonfinite="skip", groups=[{"match": "f", "frozen": True},
                                               {"match": "s", "learn_rate_scale": 0.5}])
    wf, ws = numpy.ones(3, "f"), numpy.ones(3, "f")
    opt.step_many(["f", "s"], [wf, ws], [numpy.full(3, numpy.nan, "f"),
                                         numpy.full(3, numpy.nan, "f")])
    assert opt.skipped == {"s": 1} and (wf == 1).all() and (ws == 1).all()
    assert _kernels.NONFINITE_MODES == ("apply", "skip", "raise")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 150000), st.sampled_from([numpy.float32, numpy.float64]),
       st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 0.5]), st.integers(1, 4),
       st.data())
def test_the_check_is_exactly_a_non_finite_term(n, dtype, grad_clip, l2, threads, data):
    """Skipped exactly when some term (g + l2*w in the dtype, or g) is NaN or infinite,
    with or without clipping (the norm's confirmation, or the unclipped scan), at any
    size and thread count; NaN and inf told apart."""
    rng = numpy.random.RandomState(n)
    w = rng.randn(n).astype(dtype)
    g = rng.randn(n).astype(dtype)
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, n - 1))
        g[i] = data.draw(st.sampled_from([numpy.nan, numpy.inf, -numpy.inf, 1e30]))
    if data.draw(st.booleans()):  # a finite weight whose term overflows
        big = numpy.finfo(dtype).max
        w[data.draw(st.integers(0, n - 1))] = big / 2
        g[data.draw(st.integers(0, n - 1))] = big * 0.9
    with numpy.errstate(all="ignore"):
        terms = (g + dtype(l2) * w) if l2 else g
    has_nan, finite = numpy.isnan(terms).any(), numpy.isfinite(terms).all()
    before = cpu.get_num_threads()
    cpu.set_num_threads(threads)
    try:
        opt = SGD(0.1, grad_clip=grad_clip, L2=l2, L2_is_weight_decay=False,
                  nonfinite="raise")
        if finite:
            opt("k", w, g)
            assert opt.nr_update["k"] == 1
        else:
            with pytest.raises(FloatingPointError, match="a NaN" if has_nan else "an infinity"):
                opt("k", w, g)
    finally:
        cpu.set_num_threads(before)
