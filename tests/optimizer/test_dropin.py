"""A drop-in wherever Thinc's optimizer goes (issue 26): copies and pickles that continue
bitwise, Thinc's attributes with Thinc's effect, and hyperparameters that read as
numbers (Thinc 8.3 code) and as schedules (Thinc 9 code) on the plain Optimizer."""
import copy
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import optim

KEYS = [(1, "W"), (1, "b"), (2, "W")]
SHAPES = [(6, 5), (5,), (3, 4, 2)]


def _data(dtype="float32", steps=6, seed=0):
    rng = numpy.random.default_rng(seed)
    weights = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return weights, grads


def _train(opt, weights, grads, many=False):
    for step_grads in grads:
        gs = [g.copy() for g in step_grads]
        if many:
            opt.step_many(KEYS, weights, gs)
        else:
            for key, w, g in zip(KEYS, weights, gs):
                opt(key, w, g)
        opt.step_schedules()


def _state_bytes(opt):
    """Every array of the optimizer's saved state, as bytes (weights aside)."""
    core = getattr(opt, "optimizer", opt)
    return [(k.key, k.nr_update, {n: None if a is None else a.tobytes()
                                  for n, a in k.arrays.items()}) for k in core.state().keys]


MAKERS = {
    "adam-thinc": lambda: optim.Adam(0.01),
    "adam-schedule-lookahead": lambda: optim.Adam(optim.warmup_linear(0.01, 2, 10),
                                                  lookahead_k=2, L2=0.01,
                                                  L2_is_weight_decay=False),
    "radam": lambda: optim.RAdam(0.01, weight_decay=0.01),
    "sgd-groups-skip": lambda: optim.SGD(0.1, nonfinite="skip", groups=[
        {"match": "b", "frozen": True}, {"match": "W", "learn_rate_scale": 0.5}]),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
@pytest.mark.parametrize("many", [False, True], ids=["per-call", "step_many"])
def test_a_copy_continues_bitwise_as_the_original(name, how, many):
    weights, grads = _data(steps=8)
    opt = MAKERS[name]()
    _train(opt, weights, grads[:4], many)
    other = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "copy": copy.copy,
             "deepcopy": copy.deepcopy}[how](opt)
    assert type(other) is type(opt) and other is not opt
    assert _state_bytes(other) == _state_bytes(opt)
    w_other = [w.copy() for w in weights]
    _train(other, w_other, grads[4:], many)  # the copy first: the original must not move
    before = _state_bytes(opt)
    _train(opt, weights, grads[4:], many)
    assert before != _state_bytes(opt)
    for a, b in zip(weights, w_other):
        assert a.tobytes() == b.tobytes()
    assert _state_bytes(other) == _state_bytes(opt)
    assert other.step == opt.step == 8
    assert other.to_bytes() == opt.to_bytes()


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_a_thinc_wrapper_copies_and_pickles(how):
    thinc_optim = pytest.importorskip("optim.thinc")
    weights, grads = _data(steps=6)
    opt = thinc_optim.Adam(0.01, use_averages=True)
    _train(opt, weights, grads[:3])
    other = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "copy": copy.copy,
             "deepcopy": copy.deepcopy}[how](opt)
    assert isinstance(other, thinc_optim.ThincOptimizer) and other.optimizer is not opt.optimizer
    w_other = [w.copy() for w in weights]
    _train(other, w_other, grads[3:])
    _train(opt, weights, grads[3:])
    assert [w.tobytes() for w in weights] == [w.tobytes() for w in w_other]
    assert other.to_bytes() == opt.to_bytes()


def test_an_optimizer_following_a_generator_cannot_be_copied_and_says_why():
    opt = optim.Adam(iter([0.1, 0.2, 0.3]))
    for how in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"learn_rate follows a .*optim.warmup_linear"):
            how(opt)


def _fresh_state_as(opt, **flags):
    """A new optimizer holding `opt`'s whole state, with some flags changed."""
    state = copy.deepcopy(opt.state())  # (state() holds the optimizer's own arrays)
    state.flags.update(flags)
    if state.flags["use_radam"]:
        state.kind = "radam"
    return optim.Optimizer.from_state(state)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_use_radam_set_mid_run_makes_the_next_updates_radam(dtype):
    weights, grads = _data(dtype, steps=12)
    opt = optim.Adam(0.01, use_averages=False)
    _train(opt, weights, grads[:6])
    radam = _fresh_state_as(opt, use_radam=True)
    assert radam.kind == "radam"
    opt.use_radam = True  # Thinc allows it, and its next update follows
    assert opt.kind == "radam" and opt.use_radam is True
    w_radam = [w.copy() for w in weights]
    _train(opt, weights, grads[6:])
    _train(radam, w_radam, grads[6:])
    assert [w.tobytes() for w in weights] == [w.tobytes() for w in w_radam]
    adam = optim.Adam(0.01, use_averages=False)
    w_adam, _ = _data(dtype, steps=12)
    _train(adam, w_adam, grads)
    assert [w.tobytes() for w in weights] != [w.tobytes() for w in w_adam]


def test_L2_is_weight_decay_set_before_training_is_the_constructor_argument():
    weights, grads = _data(steps=5)
    w2 = [w.copy() for w in weights]
    a = optim.Adam(0.01, L2=0.1)
    a.L2_is_weight_decay = False
    b = optim.Adam(0.01, L2=0.1, L2_is_weight_decay=False)
    _train(a, weights, grads)
    _train(b, w2, grads)
    assert [w.tobytes() for w in weights] == [w.tobytes() for w in w2]
    assert a.to_bytes() == b.to_bytes()


@pytest.mark.parametrize("name", ["use_radam", "L2_is_weight_decay", "use_averages"])
@pytest.mark.parametrize("bad", ["yes", 2, None, 0.5])
def test_a_flag_takes_only_true_or_false(name, bad):
    opt = optim.Adam(0.01)
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        setattr(opt, name, bad)
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        optim.Optimizer(0.01, **{name: bad})


def test_use_averages_can_be_turned_off_and_on():
    weights, grads = _data(steps=4)
    opt = optim.Adam(0.01)
    _train(opt, weights, grads[:2])
    assert set(opt.averages) == set(KEYS)
    opt.use_averages = False
    assert opt.averages is None
    _train(opt, weights, grads[2:3])
    opt.use_averages = True
    _train(opt, weights, grads[3:])
    assert set(opt.averages) == set(KEYS)


def test_thincs_attributes_are_all_there_and_settable():
    thinc_api = pytest.importorskip("thinc.api")
    theirs = thinc_api.Optimizer(0.01)
    slots = [s for s in type(theirs).__slots__ if not s.startswith("_")]
    for opt in [optim.Adam(0.01)] + ([pytest.importorskip("optim.thinc").Adam(0.01)]):
        for name in slots:
            value = getattr(theirs, name, None)  # (Thinc 9 leaves `schedules` unset)
            assert hasattr(opt, name), name
            if isinstance(value, (float, int, bool)):
                setattr(opt, name, value)
                assert getattr(opt, name) == value, name
        assert dict(opt.last_seen) == {} and opt.last_seen[(0, "x")] == 0


def test_hyperparameters_read_as_numbers_and_as_schedules():
    opt = optim.Adam(optim.warmup_linear(0.01, 4, 20), beta1=0.8)
    lr = opt.learn_rate
    assert lr == 0.0 and isinstance(lr, float)
    assert opt.learn_rate(step=2, key=(0, "W")) == 0.005 == opt.learn_rate(2)
    assert opt.learn_rate(step=opt.step, key=(0, "W")) == 0.0
    assert opt.beta1 * 2 == 1.6 and type(opt.beta1 * 2) is float and opt.b1(step=7) == 0.8
    for _ in range(3):
        opt.step_schedules()
    assert opt.learn_rate == 0.0075 and opt.learn_rate() == 0.0075
    assert opt.learn_rate(step=4) == 0.01
    opt.learn_rate = opt.learn_rate  # what it read: the schedule stays
    assert opt.schedules["learn_rate"] is not None and opt.learn_rate(step=5) != 0.0075
    assert pickle.loads(pickle.dumps(opt.learn_rate)) == 0.0075
    assert type(pickle.loads(pickle.dumps(opt.learn_rate))) is float
    assert type(copy.copy(opt.learn_rate)) is float
    other = optim.Adam(0.5)
    other.learn_rate = opt.learn_rate  # another optimizer's value: the number
    assert other.learn_rate == 0.0075 and "learn_rate" not in other.schedules
    opt.learn_rate = opt.learn_rate * 2
    assert opt.learn_rate == 0.015 and "learn_rate" not in opt.schedules
    opt.learn_rate = lambda *, step, key=None, last_score=None: 1.0  # Thinc 9 code
    assert opt.learn_rate(step=opt.step, key=(0, "W")) == 1.0


def test_thinc_9_style_reads_through_optims_registry():
    for name in ("RAdam.v1", "Adam.v1", "SGD.v1"):
        cfg = {"@optimizers": name, "learn_rate": 0.123}
        opt = optim.registry.resolve({"config": cfg})["config"]
        assert opt.learn_rate(step=opt._step, key=(0, "")) == 0.123
        assert opt.learn_rate * 1 == 0.123


def _pytest_counts(path, cwd):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(path)], capture_output=True, text=True, timeout=300, cwd=cwd)
    counts = dict((word, int(n)) for n, word in re.findall(
        r"(\d+) (passed|failed|errors?|skipped)", done.stdout.splitlines()[-1]))
    return counts, done.stdout[-3000:] + done.stderr[-2000:]


def test_thincs_own_optimizer_tests_pass_with_optims_optimizer(tmp_path):
    """Thinc's shipped tests/test_optimizers.py, run as shipped and with only its import
    line changed to `from optim import Optimizer, registry`: the same tests pass (Thinc
    8.3.14's 20; Thinc 9.1's 21, under CI's Thinc 9 environment)."""
    thinc_tests = pytest.importorskip("thinc.tests")
    original = Path(thinc_tests.__file__).parent / "test_optimizers.py"
    text = original.read_text()
    line = "from thinc.api import Optimizer, registry\n"
    assert text.count(line) == 1, "Thinc's test file changed: re-check the swap"
    swapped = tmp_path / "test_thinc_optimizers_with_optim.py"
    swapped.write_text(text.replace(line, "from optim import Optimizer, registry\n"))
    theirs, out = _pytest_counts(original, tmp_path)
    assert theirs.get("passed", 0) >= 20 and set(theirs) == {"passed"}, out
    ours, out = _pytest_counts(swapped, tmp_path)
    assert ours == theirs, out


def test_a_distributed_optimizer_refuses_to_be_copied_and_says_what_to_do():
    from optim.distributed import DistributedOptimizer

    opt = DistributedOptimizer(optim.Adam(0.01))
    for how in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*to_bytes\(\)"):
            how(opt)
