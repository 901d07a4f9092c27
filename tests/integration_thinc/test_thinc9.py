"""Thinc 9 (issue 17): what Thinc 9 code sees, plateau, and exact save/resume.

Thinc 9's schedules are `Schedule` objects read as `schedule(step, key=..., last_score=...)`;
its Optimizer exposes the hyperparameters as schedules. The oracles are Thinc 9's own
Optimizer and schedules. Version-independent checks are in test_thinc_integration.py
and test_schedules.py; this file needs Thinc 9.
"""
import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy
import pytest

pytest.importorskip("thinc", minversion="9.0")
thinc_api = pytest.importorskip("thinc.api")

import optim  # noqa: E402
import optim.thinc  # noqa: E402
from optim.schedules import from_thinc  # noqa: E402

HYPERPARAMETERS = ("learn_rate", "grad_clip", "b1", "b2", "eps", "L2")


# ------------------------------------------------------- what Thinc 9 code reads and sets

def test_registry_optimizer_reads_like_thinc_9s():
    """Through the registry (what spaCy and Thinc configs get), every hyperparameter Thinc
    9 exposes is a schedule with Thinc 9's values, at any step."""
    config = thinc_api.Config().from_str("""
        [ours]
        @optimizers = "optim.Adam.v1"
        L2 = 0.01
        grad_clip = 2.0

        [ours.learn_rate]
        @schedules = "warmup_linear.v1"
        initial_rate = 0.01
        warmup_steps = 4
        total_steps = 20

        [theirs]
        @optimizers = "Adam.v1"
        L2 = 0.01
        grad_clip = 2.0

        [theirs.learn_rate]
        @schedules = "warmup_linear.v1"
        initial_rate = 0.01
        warmup_steps = 4
        total_steps = 20
        """)
    resolved = thinc_api.registry.resolve(config)
    ours, theirs = resolved["ours"], resolved["theirs"]
    assert isinstance(ours, optim.thinc.ThincOptimizer) and isinstance(ours, thinc_api.Optimizer)
    assert ours.learn_rate(step=0) == 0.0
    for name in HYPERPARAMETERS:
        for step in (0, 1, 3, 4, 7, 19, 25):
            assert getattr(ours, name)(step=step) == getattr(theirs, name)(step=step), (name, step)
            assert getattr(ours, name)(step) == getattr(theirs, name)(step, key=(1, "W"))
    for _ in range(6):
        ours.step_schedules()
        theirs.step_schedules()
    assert ours.step == theirs.step == 6
    assert ours.learn_rate(ours.step) == theirs.learn_rate(theirs.step) == 0.01 * 14 / 16
    # optim's own extras read the same way
    assert ours.beta1(0) == ours.b1(0) == 0.9 and ours.weight_decay(3) == 0.0


@pytest.mark.parametrize("value", [
    0.05,
    [0.1, 0.2, 0.3],
    "generator",
    "decaying",
    "callable",
], ids=["number", "list", "generator", "schedule", "callable"])
def test_assigning_a_hyperparameter_mid_run_reads_it_at_the_step_like_thinc_9(value):
    """Thinc 9 code sets `optimizer.learn_rate = <number, list, generator, schedule or
    callable>`; Thinc 9 reads it at the optimizer's step (a generator: item `step`).
    Oracle: Thinc 9's Optimizer given the same value at the same step (generators and
    lists through its constructor, which wraps them; it has no setter that wraps)."""
    def make():
        if value == "generator":
            return (0.01 * i for i in range(1, 12))
        if value == "decaying":
            return thinc_api.decaying(0.1, 0.5)
        if value == "callable":
            return thinc_api.Schedule("mine", lambda s, step, **kw: 0.001 * (step + 1))
        return copy.copy(value)

    ours = optim.thinc.Adam(0.001)
    for _ in range(4):
        ours.step_schedules()
    ours.learn_rate = make()
    theirs = thinc_api.Adam(make())
    for _ in range(4):
        theirs.step_schedules()
    got, want = [], []
    for _ in range(6):
        got.append(ours.learn_rate(ours.step))
        want.append(theirs.learn_rate(theirs.step))
        ours.step_schedules()
        theirs.step_schedules()
    assert got == want
    assert ours.optimizer.learn_rate == ours.learn_rate(ours.step)  # the update uses it


def test_assigned_schedule_drives_the_update_like_thinc_9():
    """`optimizer.learn_rate = schedule` then updates: bitwise what a fresh optimizer
    with that schedule from the start does (both read it at the optimizer's step)."""
    rng = numpy.random.default_rng(0)
    grads = [rng.standard_normal(30).astype("f") for _ in range(8)]
    w1 = rng.standard_normal(30).astype("f")
    w2 = w1.copy()
    a = optim.thinc.SGD(0.5, use_averages=False)
    a.learn_rate = thinc_api.decaying(0.1, 0.5)
    b = optim.SGD(thinc_api.decaying(0.1, 0.5), use_averages=False)
    for g in grads:
        a("k", w1, g.copy())
        b("k", w2, g.copy())
        a.step_schedules()
        b.step_schedules()
    numpy.testing.assert_array_equal(w1, w2)
    assert not numpy.array_equal(w1, w2 * 0)


def test_reading_a_schedule_back_is_the_same_object():
    sched = thinc_api.warmup_linear(0.01, 2, 10)
    opt = optim.thinc.Adam(sched)
    assert opt.learn_rate is sched
    opt.learn_rate = opt.learn_rate  # Thinc 9 code may write back what it read
    assert opt.learn_rate is sched
    view = opt.b1
    opt.b1 = view  # a view of our own value: a no-op
    assert opt.b1(0) == 0.9 and opt.optimizer.schedules == {"learn_rate": sched}


def test_thinc_9_schedules_in_the_schedules_argument_are_read_at_the_step():
    opt = optim.Adam(0.01, schedules={"L2": thinc_api.decaying(0.1, 1.0),
                                      "beta1": thinc_api.constant(0.5)})
    assert (opt.L2, opt.beta1) == (0.1, 0.5)
    opt.step_schedules()
    assert opt.L2 == 0.05 and opt.hyperparameter("L2", 3) == 0.025
    keyed = thinc_api.Schedule("mine", lambda s, step, *, key=None, **kw: 0.1 if key else 0.2)
    opt = optim.Adam(keyed)
    assert "per-key" in repr(opt) and opt.learn_rate == 0.2
    assert opt.hyperparameter("learn_rate", key=(1, "W")) == 0.1


def test_bad_values_are_value_errors():
    opt = optim.thinc.Adam()
    with pytest.raises(ValueError, match="learn_rate"):
        opt.learn_rate = "fast"
    with pytest.raises(ValueError, match="(?i)step"):
        opt.learn_rate(step=-1)
    opt.learn_rate = (x for x in [0.1, 0.2])
    with pytest.raises(ValueError, match="iterator"):
        opt.learn_rate(step=3)  # a generator is only known at the current step
    bad = thinc_api.Schedule("bad", lambda s, step, **kw: -1.0)
    opt = optim.Adam(bad)
    with pytest.raises(ValueError, match="learn_rate must be"):
        opt("k", numpy.ones(3, "f"), numpy.ones(3, "f"))


# ----------------------------------------------------------------- optim schedules in Thinc 9

def test_optim_schedules_are_thinc_9_schedules_without_importing_thinc():
    sched = optim.slanted_triangular(0.1, 100)
    assert isinstance(sched, thinc_api.Schedule) and isinstance(sched, optim.Schedule)
    assert type(sched) is optim.Schedule
    assert pickle.loads(pickle.dumps(sched))(7) == sched(7)
    assert copy.deepcopy(sched)(7) == sched(7)
    values = sched.to_generator(3, 2)  # Thinc 9's Schedule.to_generator
    assert [next(values) for _ in range(3)] == [sched(3), sched(5), sched(7)]
    code = ("import sys, numpy, optim\n"
            "s = optim.decaying(0.1, 0.5)\n"
            "opt = optim.Adam(s)\n"
            "opt('k', numpy.ones(3, 'f'), numpy.ones(3, 'f'))\n"
            "opt.step_schedules()\n"
            "print(type(s).__name__, s.__class__.__name__, 'thinc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["Schedule", "Schedule", "False"]


# ----------------------------------------------------------------------- plateau

def _plateau():
    return thinc_api.plateau(2, 0.5, thinc_api.warmup_linear(0.02, 3, 40))


SCORES = [0.5, 0.4, 0.4, 0.6, 0.3, 0.3, 0.3, 0.7]


def test_thinc_9_plateau_in_optim_follows_thinc_9():
    """Scores assigned between updates, as a training loop does: optim's learn rates
    (and the plateau's state) are Thinc 9's Optimizer's at every step."""
    ours, theirs = optim.SGD(_plateau()), thinc_api.SGD(_plateau())
    w1, w2 = numpy.ones(5, "f"), numpy.ones(5, "f")
    got, want = [], []
    for step in range(32):
        if step % 4 == 3:
            ours.last_score = theirs.last_score = SCORES[step // 4]
        ours("k", w1, numpy.full(5, 0.1, "f"))
        theirs("k", w2, numpy.full(5, 0.1, "f"))
        got.append(ours.learn_rate)
        want.append(theirs.learn_rate(theirs.step, last_score=theirs.last_score))
        ours.step_schedules()
        theirs.step_schedules()
    assert got == want
    # 0.5 best; 0.4, 0.4: a plateau; 0.6 best; 0.3, 0.3: a plateau; 0.3; 0.7 best
    assert ours.schedules["learn_rate"].attrs["state"].n_plateaus == 2
    assert theirs.learn_rate.attrs["state"].n_plateaus == 2


def test_unmappable_schedule_is_a_clear_error_at_to_bytes():
    def discriminative(schedule, step, *, key=None, **kwargs):
        return 0.001 if key and "layers." in key[1] else 0.01

    mine = thinc_api.Schedule("transformer_discriminative", discriminative)
    for sched in (mine, thinc_api.plateau(2, 0.5, mine)):
        opt = optim.thinc.Adam(sched)
        with pytest.raises(ValueError, match=r"'learn_rate'.*'transformer_discriminative'"
                                             r".*discriminative.*no optim equivalent"):
            opt.to_bytes()
    with pytest.raises(ValueError, match="no optim equivalent"):
        from_thinc(thinc_api.Optimizer(learn_rate=[0.1]).learn_rate)  # a wrapped generator


# ------------------------------------------------- save, load in a fresh process, resume

RESUME = textwrap.dedent('''
    import json, sys
    import numpy
    from thinc.api import Config, Relu, Softmax, chain, fix_random_seed, registry
    import optim

    mode, where = sys.argv[1], sys.argv[2]
    CONFIG = """
    [optimizer]
    @optimizers = "optim.Adam.v1"
    L2 = 0.001

    [optimizer.learn_rate]
    @schedules = "plateau.v1"
    max_patience = 2
    scale = 0.5

    [optimizer.learn_rate.schedule]
    @schedules = "slanted_triangular.v1"
    max_rate = 0.05
    num_steps = 60
    cut_frac = 0.25

    [optimizer.beta1]
    @schedules = "constant_then.v1"
    rate = 0.8
    steps = 5

    [optimizer.beta1.schedule]
    @schedules = "compounding.v1"
    start = 0.85
    stop = 0.95
    compound = 1.001
    """
    SCORES = [0.5, 0.4, 0.4, 0.6, 0.3, 0.3]

    fix_random_seed(0)
    model = chain(Relu(12), Softmax(4))
    rng = numpy.random.RandomState(0)
    X = rng.uniform(-1, 1, (60, 16, 6)).astype("f")
    Y = numpy.eye(4, dtype="f")[(X[..., 0] > 0) + 2 * (X[..., 1] > 0)]
    model.initialize(X=X[0], Y=Y[0])
    keys = [(n.id, p) for n in model.walk() for p in n.param_names if n.has_param(p)]
    if mode == "resume":
        model.from_disk(where + "/model")
        opt = optim.load(where + "/optimizer")
        saved = [tuple(k) for k in json.load(open(where + "/keys.json"))]
        opt.remap_keys(dict(zip(saved, keys)))
        start, stop = 30, 60
    else:
        opt = registry.resolve(Config().from_str(CONFIG))["optimizer"]
        start, stop = 0, (30 if mode == "first" else 60)
    rates = []
    for step in range(start, stop):
        if step % 10 == 9:
            opt.last_score = SCORES[step // 10]
        Yh, backprop = model.begin_update(X[step])
        backprop((Yh - Y[step]) / len(Yh))
        model.finish_update(opt)
        opt.step_schedules()
        rates.append(opt.optimizer.learn_rate if hasattr(opt, "optimizer") else opt.learn_rate)
    if mode == "first":
        model.to_disk(where + "/model")
        opt.to_disk(where + "/optimizer")
        json.dump(keys, open(where + "/keys.json", "w"))
    out = {"rates": rates, "step": opt.step,
           "schedule": type(opt.schedules["learn_rate"]).__module__}
    arrays = [n.get_param(p) for n in model.walk() for p in n.param_names if n.has_param(p)]
    arrays += [opt.averages[k] for k in keys] + [opt.mom2[k] for k in keys]
    numpy.savez(where + f"/{mode}.npz", *arrays)
    print(json.dumps(out))
''')


def _script(tmp_path, mode):
    proc = subprocess.run([sys.executable, "-c", RESUME, mode, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_thinc_9_schedules_save_load_in_fresh_process_and_resume_bit_for_bit(tmp_path):
    """Thinc 9's plateau(slanted_triangular) and constant_then(compounding) from a config,
    through the registry: 30 steps, save, load in a fresh process (as optim's
    equivalents, plateau's state included), 30 more steps == 60 uninterrupted steps,
    bitwise (weights, averages, second moments, learn rates)."""
    full = _script(tmp_path, "full")
    first = _script(tmp_path, "first")
    resumed = _script(tmp_path, "resume")
    assert full["schedule"] == "thinc.schedules" and resumed["schedule"] == "optim.schedules"
    assert first["step"] == 30 and resumed["step"] == full["step"] == 60
    assert first["rates"] + resumed["rates"] == full["rates"]
    assert len(set(full["rates"])) > 30  # the rate moved; plateaus halved it twice
    a, b = numpy.load(tmp_path / "full.npz"), numpy.load(tmp_path / "resume.npz")
    assert len(a.files) == len(b.files) == 12
    for name in a.files:
        numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
    saved = optim.load(tmp_path / "optimizer")
    assert saved.schedules["learn_rate"].state["n_plateaus"] == 1
    assert saved.schedules["beta1"].attrs["restart"] is False
    assert saved.schedules["learn_rate"].attrs["schedule"].attrs["cut"] == 15


# ----------------------------------------------------------------- per-key schedules

def _discriminative(schedule, step, *, key=None, **kwargs):
    """As spacy-curated-transformers' transformer_discriminative: 10x slower for the
    keys of `slow` (a pretrained encoder), the default rate for the rest."""
    rate = schedule.attrs["schedule"](step, **kwargs)
    return rate / 10 if key is not None and key[0] in schedule.attrs["slow"] else rate


def _train_keyed(make_opt, keyed=True, steps=30):
    thinc_api.fix_random_seed(0)
    model = thinc_api.chain(thinc_api.Relu(12), thinc_api.Relu(12), thinc_api.Softmax(4))
    rng = numpy.random.RandomState(0)
    X = rng.uniform(-1, 1, (steps, 16, 6)).astype("f")
    Y = numpy.eye(4, dtype="f")[(X[..., 0] > 0) + 2 * (X[..., 1] > 0)]
    model.initialize(X=X[0], Y=Y[0])
    inner = thinc_api.warmup_linear(0.02, 5, steps)
    slow = {model.layers[0].id, model.layers[1].id} if keyed else set()
    opt = make_opt(thinc_api.Schedule("transformer_discriminative", _discriminative,
                                      attrs={"schedule": inner, "slow": slow}))
    for step in range(steps):
        Yh, backprop = model.begin_update(X[step])
        backprop((Yh - Y[step]) / len(Yh))
        model.finish_update(opt)
        opt.step_schedules()
    return [n.get_param(p).copy() for n in model.walk() for p in n.param_names
            if n.has_param(p)]


@pytest.mark.parametrize("make", [optim.Adam, optim.thinc.Adam], ids=["optim", "wrapper"])
def test_key_dependent_thinc_9_schedule_follows_thinc_9s_adam(make):
    """A Thinc 9 Schedule that reads the key gives each parameter its rate, as in Thinc
    9's Adam: the weights agree within float32 rounding (measured 1.8e-6 at |w| <= 0.57;
    the bound is test_thinc_warmup_linear_run_matches_thinc_adam's), while ignoring the
    key moves them by 0.25."""
    ours, theirs = _train_keyed(make), _train_keyed(thinc_api.Adam)
    unkeyed = _train_keyed(thinc_api.Adam, keyed=False)
    for a, b in zip(ours, theirs):
        numpy.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    assert max(float(numpy.abs(a - b).max()) for a, b in zip(theirs, unkeyed)) > 0.1


def test_distributed_wrapper_reads_like_thinc_9s_too():
    """`optim.distributed.*.v1` wrap a DistributedOptimizer: the same Thinc 9 face, read
    from and written to the local optimizer (no process group is joined for this)."""
    import optim.distributed.thinc

    sched = thinc_api.warmup_linear(0.01, 2, 10)
    opt = optim.distributed.thinc.Adam(sched)
    assert opt.learn_rate is sched and opt.learn_rate(step=1) == 0.005
    opt.L2 = [0.1, 0.2]
    assert opt.L2(0) == 0.1 and opt.optimizer.optimizer.L2 == 0.1


def test_key_dependent_thinc_9_schedule_inside_a_group():
    """A key-aware Thinc 9 Schedule given to a group (matching every parameter) drives
    the update bitwise as the same schedule given to the optimizer itself."""
    top = _train_keyed(optim.Adam)
    grouped = _train_keyed(lambda schedule: optim.Adam(
        0.5, groups=[{"match": "*", "learn_rate": schedule}]))
    assert len(top) == len(grouped) > 0
    for a, b in zip(top, grouped):
        assert a.tobytes() == b.tobytes()
