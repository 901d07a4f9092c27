"""Schedules: Thinc 8.3's value sequences, step-indexing, and how the Optimizer uses them.

Exactness. Thinc 8.3's generators and Thinc 9's step-indexed schedules evaluate the
same closed-form expression of the step for constant, constant_then, decaying,
warmup_linear, slanted_triangular and cyclic_triangular (the generator's counter is an
exact integer-valued number), so optim must give the very same floats: compared with
==. compounding is the exception: the generator multiplies `curr *= compound` step by
step, a step-indexed form computes `start * compound**step`; the two roundings differ
by at most ~1 ulp per multiplication, i.e. <= 200 * 1.1e-16 = 2.2e-14 relative over
200 values, so it is compared at rel 1e-12 (a wrong formula is off by >= 1e-3).

The oracle is the installed Thinc: 8.3's generators, or 9's step-indexed `Schedule`s
(read at steps 0, 1, 2, ...; there compounding is exact too, and `constant_then` reads
its inner schedule at the same step, which optim's `constant_then(restart=False)` does).
"""
import functools
import types
from itertools import islice

import numpy
import pytest

import optim
from optim import (
    SGD,
    Adam,
    Optimizer,
    compounding,
    constant,
    constant_then,
    cyclic_triangular,
    decaying,
    plateau,
    slanted_triangular,
    warmup_linear,
)

from reference import ReferenceOptimizer



def _thinc():
    return pytest.importorskip("thinc.api")


def _thinc_9() -> bool:
    return hasattr(_thinc(), "Schedule")  # Thinc 9's schedules are objects, 8.3's generators


def _thinc_values(schedule, n):
    """The installed Thinc's first n values of one of its schedules."""
    if _thinc_9():
        return [schedule(step) for step in range(n)]
    return list(islice(schedule, n))


def _optim_like_thinc():
    """`optim`, or under Thinc 9 `optim` with Thinc 9's constant_then."""
    if not _thinc_9():
        return optim
    ns = types.SimpleNamespace(**{name: getattr(optim, name) for name in optim.__all__})
    ns.constant_then = functools.partial(optim.constant_then, restart=False)
    return ns

N = 200

# (name, builder(ns) -> schedule, exact?) where ns is `optim` or `thinc.api`.
CASES = [
    ("constant-0.5", lambda ns: ns.constant(0.5), True),
    ("constant-1e-3", lambda ns: ns.constant(1e-3), True),
    ("constant_then-decaying", lambda ns: ns.constant_then(0.005, 10, ns.decaying(0.005, 1e-2)), True),
    ("constant_then-0-steps", lambda ns: ns.constant_then(0.1, 0, ns.constant(0.2)), True),
    ("constant_then-250", lambda ns: ns.constant_then(1.0, 250, ns.decaying(1.0, 0.1)), True),
    ("constant_then-warmup", lambda ns: ns.constant_then(0.3, 7, ns.warmup_linear(0.1, 20, 100)), True),
    ("decaying-spec", lambda ns: ns.decaying(0.001, 1e-4), True),
    ("decaying-fast", lambda ns: ns.decaying(0.1, 0.5), True),
    ("decaying-t", lambda ns: ns.decaying(0.01, 1e-3, t=5), True),
    ("compounding-slow", lambda ns: ns.compounding(1.0, 1000.0, 1.001), False),
    ("compounding-hits-stop", lambda ns: ns.compounding(1.0, 10.0, 1.5), False),
    ("compounding-decreasing", lambda ns: ns.compounding(10.0, 1.0, 0.98), False),
    ("compounding-batch", lambda ns: ns.compounding(4.0, 32.0, 1.02), False),
    ("warmup_linear", lambda ns: ns.warmup_linear(0.01, 50, 150), True),
    ("warmup_linear-no-warmup", lambda ns: ns.warmup_linear(1.0, 0, 100), True),
    ("warmup_linear-total<warmup", lambda ns: ns.warmup_linear(0.5, 20, 10), True),
    ("warmup_linear-1-1", lambda ns: ns.warmup_linear(0.1, 1, 1), True),
    ("slanted_triangular", lambda ns: ns.slanted_triangular(0.01, 100), True),
    ("slanted_triangular-kw", lambda ns: ns.slanted_triangular(0.1, 1000, cut_frac=0.2, ratio=16), True),
    ("slanted_triangular-t", lambda ns: ns.slanted_triangular(1.0, 50, t=3.0), True),
    ("cyclic_triangular", lambda ns: ns.cyclic_triangular(0.001, 0.01, 10), True),
    ("cyclic_triangular-period-1", lambda ns: ns.cyclic_triangular(0.0, 1.0, 1), True),
    ("cyclic_triangular-37", lambda ns: ns.cyclic_triangular(0.1, 0.5, 37), True),
]


def _check_values(got, want, exact, what):
    assert len(got) == len(want) == N
    for i, (a, b) in enumerate(zip(got, want)):
        assert isinstance(a, (float, int)) and not isinstance(a, bool), f"{what}[{i}]: {a!r}"
        if exact:
            assert a == b, f"{what}[{i}]: {a!r} != thinc {b!r}"
        else:
            assert a == pytest.approx(b, rel=1e-12, abs=0.0), f"{what}[{i}]: {a!r} vs thinc {b!r}"


@pytest.mark.parametrize("name,build,exact", CASES, ids=[c[0] for c in CASES])
def test_values_match_installed_thinc(name, build, exact):
    thinc_api = _thinc()
    ours = list(islice(build(_optim_like_thinc()), N))
    theirs = _thinc_values(build(thinc_api), N)
    _check_values(ours, theirs, exact or _thinc_9(), name)


@pytest.mark.parametrize("name,build,exact", CASES, ids=[c[0] for c in CASES])
def test_from_thinc_gives_thinc_9_values(name, build, exact):
    """Thinc 9's schedules map onto optim's with the very same floats (how a Thinc 9
    schedule is saved); under 8.3 (generators) there is nothing to map."""
    thinc_api = _thinc()
    if not _thinc_9():
        with pytest.raises(ValueError, match="no optim equivalent"):
            optim.schedules.from_thinc(build(thinc_api))
        return
    theirs = build(thinc_api)
    mapped = optim.schedules.from_thinc(theirs)
    assert isinstance(mapped, optim.Schedule) and type(mapped) is optim.Schedule
    # in a scrambled order too: both are functions of the step
    order = [int(s) for s in numpy.random.default_rng(1).permutation(N)]
    _check_values([mapped(s) for s in order], [theirs(s) for s in order], True, name)
    rebuilt = optim.Schedule.from_dict(mapped.to_dict())
    _check_values([rebuilt(s) for s in range(N)], [theirs(s) for s in range(N)], True, name)


@pytest.mark.parametrize("name,build,exact", CASES, ids=[c[0] for c in CASES])
def test_step_indexed_equals_iterator(name, build, exact):
    values = list(islice(build(optim), N))
    indexed = build(optim)
    # in order, and in a scrambled order: a schedule is a function of the step
    assert [indexed(step) for step in range(N)] == values
    order = numpy.random.default_rng(0).permutation(N)
    assert [indexed(int(step)) for step in order] == [values[int(s)] for s in order]
    # iterating does not change what schedule(step) gives
    it = build(optim)
    for _ in range(17):
        next(it)
    assert it(0) == values[0] and it(150) == values[150]
    assert next(it) == values[17]


def test_next_decaying_is_base_rate():
    assert next(decaying(0.001, 1e-4)) == 0.001
    s = decaying(0.001, 1e-4)
    next(s)
    assert next(s) == 0.000999900009999


# ---------------------------------------------------------------- Optimizer + schedules

def test_spec_step_schedules_example():
    schedules = {"learn_rate": decaying(0.001, 1e-4)}
    optimizer = Optimizer(learn_rate=0.001, schedules=schedules)
    assert optimizer.learn_rate == 0.001
    optimizer.step_schedules()
    assert optimizer.learn_rate == 0.001
    optimizer.step_schedules()
    assert optimizer.learn_rate == 0.000999900009999


LR_INPUTS = [
    ("list", lambda ns: [0.1, 0.2, 0.3]),
    ("generator", lambda ns: (x for x in [0.3, 0.2, 0.1, 0.05])),
    ("iterator", lambda ns: iter([0.5, 0.25])),
    ("single-item-list", lambda ns: [0.7]),
    ("decaying", lambda ns: ns.decaying(0.01, 0.1)),
    ("warmup_linear", lambda ns: ns.warmup_linear(0.01, 3, 8)),
    ("compounding", lambda ns: ns.compounding(0.001, 0.01, 1.5)),
    ("cyclic_triangular", lambda ns: ns.cyclic_triangular(0.001, 0.01, 2)),
]


@pytest.mark.parametrize("name,make", LR_INPUTS, ids=[c[0] for c in LR_INPUTS])
def test_learn_rate_accepts_list_generator_schedule_like_thinc(name, make):
    """Same learn_rate after construction and after each step_schedules() as Thinc 8.3's
    Optimizer; an exhausted iterator keeps its last value."""
    thinc_api = _thinc()
    ours = Optimizer(learn_rate=make(optim))
    given = make(thinc_api)
    if _thinc_9() and name == "iterator":
        given = (x for x in given)  # Thinc 9 takes generators, not other iterators
    theirs = thinc_api.Optimizer(learn_rate=given)

    def rate(opt):
        return opt.learn_rate(opt.step) if _thinc_9() else opt.learn_rate

    got, want = [ours.learn_rate], [rate(theirs)]
    for _ in range(12):
        ours.step_schedules()
        theirs.step_schedules()
        got.append(ours.learn_rate)
        want.append(rate(theirs))
    exact = name != "compounding" or _thinc_9()
    for i, (a, b) in enumerate(zip(got, want)):
        if exact:
            assert a == b, f"step {i}: {got} != thinc {want}"
        else:
            assert a == pytest.approx(b, rel=1e-12), f"step {i}: {got} vs {want}"


def test_exhausted_list_keeps_last_value():
    opt = SGD([0.1, 0.2, 0.3])
    seen = [opt.learn_rate]
    for _ in range(5):
        opt.step_schedules()
        seen.append(opt.learn_rate)
    assert seen == [0.1, 0.2, 0.3, 0.3, 0.3, 0.3]


def test_schedules_dict_like_thinc():
    """Thinc 8.3's `schedules` dict: the first value at the first step_schedules().
    Thinc 9 has no such dict (it reads schedules by step): there the oracle is its
    decaying schedule one step behind."""
    thinc_api = _thinc()
    ours = Optimizer(learn_rate=0.5, schedules={"learn_rate": decaying(0.01, 0.1)})
    if _thinc_9():
        want = [0.5] + [thinc_api.decaying(0.01, 0.1)(step) for step in range(10)]
    else:
        theirs = thinc_api.Optimizer(learn_rate=0.5)
        theirs.schedules["learn_rate"] = thinc_api.decaying(0.01, 0.1)
        want = [theirs.learn_rate]
        for _ in range(10):
            theirs.step_schedules()
            want.append(theirs.learn_rate)
    got = [ours.learn_rate]
    for _ in range(10):
        ours.step_schedules()
        got.append(ours.learn_rate)
    assert got == want and want[0] == 0.5 and want[1] == 0.01


@pytest.mark.parametrize(
    "bad",
    [[], iter([]), (x for x in []), "abc", None, ["a", "b"], object(), [None],
     float("nan"), float("inf"), -0.1],
    ids=["empty-list", "empty-iter", "empty-gen", "str", "None", "list-of-str",
         "object", "list-of-None", "nan", "inf", "negative"],
)
def test_bad_learn_rate_is_value_error_at_construction(bad):
    with pytest.raises(ValueError):
        Optimizer(learn_rate=bad)


@pytest.mark.parametrize(
    "bad",
    [[], iter([]), (x for x in []), "abc", b"xy", {"a": 1}, None, ["a"], 5j],
    ids=["empty-list", "empty-iter", "empty-gen", "str", "bytes", "dict", "None",
         "list-of-str", "complex"],
)
def test_bad_schedules_dict_value_is_value_error_at_construction(bad):
    """The same rule for the `schedules` argument's values: not an iterable of numbers,
    or empty, is a ValueError when the optimizer is built, not at a later step."""
    with pytest.raises(ValueError):
        Optimizer(learn_rate=0.1, schedules={"learn_rate": bad})


def test_learn_rate_setter_is_used_by_the_update():
    opt = SGD(0.1, grad_clip=0.0, use_averages=False)
    assert opt.learn_rate == 0.1
    opt.learn_rate = 0.01
    assert opt.learn_rate == 0.01
    w = numpy.ones(4, dtype="float64")
    opt("k", w, numpy.full(4, 2.0))
    numpy.testing.assert_array_equal(w, numpy.full(4, 1.0 - 0.01 * 2.0))


def test_step_counts_step_schedules_calls():
    opt = Adam(0.001)
    assert opt.step == 0
    w, g = numpy.zeros(3, dtype="float32"), numpy.ones(3, dtype="float32")
    opt("k", w, g)  # an update is not a schedule step
    assert opt.step == 0
    for i in range(1, 4):
        opt.step_schedules()
        assert opt.step == i


def test_every_hyperparameter_accepts_a_schedule():
    """grad_clip, L2, beta1, beta2 and eps given as lists/schedules: each update uses the
    current value (checked against the reference with the values set by hand)."""
    clips = [0.5, 0.2, 5.0, 0.1]
    l2s = [0.0, 1e-2, 1e-1, 1e-3]
    b1s = [0.9, 0.5, 0.8, 0.0]
    b2s = [0.999, 0.9, 0.99, 0.95]
    epss = [1e-8, 1e-3, 1e-6, 1e-8]
    opt = Optimizer(learn_rate=decaying(0.05, 0.5), grad_clip=list(clips), L2=list(l2s),
                    beta1=iter(b1s), beta2=(b for b in b2s), eps=list(epss),
                    L2_is_weight_decay=False)
    ref = ReferenceOptimizer(0.05, L2_is_weight_decay=False)
    lrs = list(islice(decaying(0.05, 0.5), 4))
    rng = numpy.random.default_rng(0)
    w = rng.standard_normal(30)
    for i in range(4):
        ref.learn_rate, ref.grad_clip, ref.L2 = lrs[i], clips[i], l2s[i]
        ref.beta1, ref.beta2, ref.eps = b1s[i], b2s[i], epss[i]
        g = rng.standard_normal(30)
        expected = ref.step("k", w, g)
        opt("k", w, g)
        numpy.testing.assert_allclose(w, expected, rtol=1e-10, err_msg=f"step {i}")
        opt.step_schedules()


# ---------------------------------------------------------------- plateau (Thinc 9)

def _plateau_run(opt, scores):
    out = []
    for score in scores:
        opt.last_score = score
        opt.step_schedules()
        lr = opt.learn_rate
        assert opt.learn_rate == lr  # reading again does not count the score again
        out.append(lr)
    return out


def test_plateau_scales_by_scale_pow_n_plateaus():
    opt = Optimizer(learn_rate=plateau(2, 0.5, constant(1.0)))
    assert opt.learn_rate == 1.0
    scores = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7, 0.7, 0.7, 0.9, 0.1]
    # best .5; .6 better; .6 p=1; .55 p=2 -> n=1; .7 better (n stays 1); .7 p=1;
    # .7 p=2 -> n=2; .7 p=1; .7 p=2 -> n=3; .9 better; .1 p=1
    want = [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.125]
    assert _plateau_run(opt, scores) == want


def test_plateau_wraps_a_schedule_that_keeps_stepping():
    opt = SGD(plateau(1, 0.1, decaying(0.01, 0.1)))
    inner = list(islice(decaying(0.01, 0.1), 10))
    assert opt.learn_rate == inner[0]
    got = _plateau_run(opt, [0.3, 0.2, 0.4, 0.4])
    # .3 best; .2 p=1=max -> n=1; .4 better; .4 -> n=2
    want = [inner[1], 0.1 * inner[2], 0.1 * inner[3], 0.01 * inner[4]]
    assert got == pytest.approx(want, rel=1e-12)


def test_plateau_without_scores_is_the_inner_schedule():
    opt = SGD(plateau(1, 0.5, decaying(0.01, 0.1)))
    inner = list(islice(decaying(0.01, 0.1), 6))
    got = [opt.learn_rate]
    for _ in range(5):
        opt.step_schedules()
        got.append(opt.learn_rate)
    assert got == pytest.approx(inner, rel=1e-12)


def test_thinc_9_arguments_and_their_checks():
    """constant_then's restart and slanted_triangular's cut (how Thinc 9's are saved);
    the 8.3-style ones keep the attributes older optims wrote and read."""
    assert "restart" not in constant_then(0.1, 2, constant(0.2)).attrs
    restarted = constant_then(0.1, 2, decaying(1.0, 0.5))
    same_step = constant_then(0.1, 2, decaying(1.0, 0.5), restart=False)
    assert [restarted(s) for s in range(4)] == [0.1, 0.1, 1.0, 1.0 / 1.5]
    assert [same_step(s) for s in range(4)] == [0.1, 0.1, 1.0 / 2.0, 1.0 / 2.5]
    by_cut = slanted_triangular(0.01, cut=10, cut_frac=0.1)
    by_steps = slanted_triangular(0.01, 100)
    assert "cut" not in by_steps.attrs and by_cut.attrs["cut"] == 10
    assert [by_cut(s) for s in range(120)] == [by_steps(s) for s in range(120)]
    assert slanted_triangular(0.01, 100, cut=10)(3) == by_steps(3)
    with pytest.raises(ValueError, match="cut"):
        slanted_triangular(0.01, 100, cut=11)
    with pytest.raises(TypeError, match="num_steps"):
        slanted_triangular(0.01)
    with pytest.raises(TypeError, match="restart"):
        constant_then(0.1, 2, constant(0.2), restart="no")
