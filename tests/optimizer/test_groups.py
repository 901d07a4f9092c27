"""Per-parameter groups (issue 21): other settings by path, learn_rate_scale, frozen.

The contract: a group's parameters are updated bitwise as a plain optimizer with the
group's settings would update them, per call and through step_many, after a save and
load in a fresh process; frozen weights never change and get no state; bad groups fail
when the optimizer is built or bound, naming the group.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim
from optim import Adam, Optimizer, RAdam, SGD

thinc_api = pytest.importorskip("thinc.api")
from optim.thinc import Adam as ThincAdam  # noqa: E402 (needs Thinc)
from optim.thinc import finish_update  # noqa: E402
OPTIM_PATH = str(Path(optim.__file__).resolve().parent.parent)
GROUPS = [{"match": "relu/*", "learn_rate_scale": 0.5}, {"match": "softmax/b", "frozen": True}]


def make_model(seed=0):
    thinc_api.fix_random_seed(seed)
    model = thinc_api.chain(thinc_api.Relu(12, 6), thinc_api.Softmax(4, 12))
    model.initialize()
    return model


def batches(n, seed=1):
    rng = numpy.random.RandomState(seed)
    for _ in range(n):
        X = rng.uniform(-1, 1, (8, 6)).astype("f")
        Y = numpy.eye(4, dtype="f")[rng.randint(0, 4, 8)]
        yield X, Y


def backprop(model, X, Y):
    out, backward = model.begin_update(X)
    backward((out - Y) / len(Y))


def params(model):
    return [(node, name) for node in model.walk() for name in node.param_names
            if node.has_grad(name)]


def weights(model):
    return {f"{node.name}/{name}": node.get_param(name).copy()
            for node in model.walk() for name in node.param_names}


def by_hand(model, steps, learn_rate):
    """The same loop with two plain optimizers (half the rate for relu/*) and the
    softmax bias never updated (its gradient zeroed)."""
    fast, slow = Adam(learn_rate), Adam(learn_rate * 0.5)
    for X, Y in batches(steps):
        backprop(model, X, Y)
        for node, name in params(model):
            key, path = (node.id, name), f"{node.name}/{name}"
            w, g = node.get_param(name), node.get_grad(name)
            if path == "softmax/b":
                g[...] = 0
                continue
            (slow if path.startswith("relu/") else fast)(key, w, g)
            node.set_param(name, w)
        fast.step_schedules()
        slow.step_schedules()
    return weights(model)


@pytest.mark.parametrize("via", ["per_call", "step_many"])
def test_chain_with_groups_equals_two_plain_optimizers(via):
    initial = weights(make_model())
    model = make_model()
    opt = ThincAdam(0.001, groups=GROUPS)
    opt.bind(model)
    for X, Y in batches(30):
        backprop(model, X, Y)
        if via == "per_call":
            model.finish_update(opt)
        else:
            finish_update(model, opt)
        opt.step_schedules()
    got = weights(model)
    want = by_hand(make_model(), 30, 0.001)
    for path in want:
        assert got[path].tobytes() == want[path].tobytes(), path
    assert got["softmax/b"].tobytes() == initial["softmax/b"].tobytes()
    assert got["relu/W"].tobytes() != initial["relu/W"].tobytes()
    # no state for the frozen bias: not a key of any state dict
    sm = [n for n in model.walk() if n.name == "softmax"][0]
    assert (sm.id, "b") not in opt.mom1 and (sm.id, "b") not in opt.nr_update
    assert opt.group_of((sm.id, "b")) == "groups[1]"


def test_learn_rate_scale_follows_the_optimizers_schedule():
    """learn_rate_scale multiplies the optimizer's scheduled rate at every step: equal to
    a plain optimizer whose schedule gives the scaled values."""
    rates = [0.01 * 0.9 ** i for i in range(12)]
    opt = Adam(rates, groups=[{"match": "W", "learn_rate_scale": 0.25}])
    plain = Adam([r * 0.25 for r in rates])
    rng = numpy.random.RandomState(0)
    w1 = rng.randn(50).astype("f")
    w2 = w1.copy()
    for _ in range(12):
        g = rng.randn(50).astype("f")
        opt(("n", "W"), w1, g.copy())
        plain(("n", "W"), w2, g.copy())
        opt.step_schedules()
        plain.step_schedules()
    assert w1.tobytes() == w2.tobytes()


SETTINGS = st.fixed_dictionaries({}, optional={
    "learn_rate": st.floats(1e-4, 0.1), "beta1": st.floats(0.0, 0.95),
    "beta2": st.floats(0.5, 0.999), "eps": st.floats(1e-9, 1e-3),
    "L2": st.floats(0.0, 0.1), "grad_clip": st.floats(0.0, 2.0),
    "weight_decay": st.floats(0.0, 0.1)})


@settings(max_examples=40, deadline=None)
@given(SETTINGS, st.sampled_from(["adam", "sgd", "radam"]),
       st.sampled_from([numpy.float32, numpy.float64]), st.integers(1, 3000),
       st.booleans())
def test_a_group_updates_as_an_optimizer_with_its_settings(overrides, kind, dtype, n, many):
    """Any settings in a group: bitwise the plain optimizer with those settings, mixed
    in one step_many with keys of the optimizer's own settings."""
    factory = {"adam": Adam, "sgd": SGD, "radam": RAdam}[kind]
    base = dict(learn_rate=0.01)
    if kind == "sgd":
        overrides.pop("beta1", None), overrides.pop("beta2", None), overrides.pop("eps", None)
    if kind != "radam":
        overrides.pop("weight_decay", None)
    grouped = factory(**base, groups=[{"match": "g/*", **overrides}])
    plain_group = factory(**{**base, **overrides})
    plain_rest = factory(**base)
    rng = numpy.random.RandomState(n)
    keys = [("g", "W"), ("o", "W"), ("g", "b")]
    w = {k: rng.randn(n).astype(dtype) for k in keys}
    w_ref = {k: v.copy() for k, v in w.items()}
    grouped.bind({k: f"{k[0]}/{k[1]}" for k in keys})
    for step in range(6):
        grads = {k: rng.randn(n).astype(dtype) for k in keys}
        if many:
            grouped.step_many(keys, [w[k] for k in keys], [grads[k].copy() for k in keys])
        else:
            for k in keys:
                grouped(k, w[k], grads[k].copy())
        for k in keys:
            (plain_group if k[0] == "g" else plain_rest)(k, w_ref[k], grads[k].copy())
        for o in (grouped, plain_group, plain_rest):
            o.step_schedules()
    for k in keys:
        assert w[k].tobytes() == w_ref[k].tobytes(), k
        for store in ("mom1", "mom2", "averages"):
            ref = getattr(plain_group if k[0] == "g" else plain_rest, store)
            if ref and k in ref:
                assert getattr(grouped, store)[k].tobytes() == ref[k].tobytes(), (k, store)


def test_first_match_wins_and_unbound_keys_match_by_name():
    opt = Adam(groups={"bias": {"match": "*b", "L2": 0.0},
                       "all": {"match": "*", "learn_rate_scale": 0.1}})
    assert opt.group_of((3, "b")) == "bias"  # unbound: the parameter name alone
    assert opt.group_of((3, "W")) == "all"
    assert opt.group_of("free-key") == "all"
    assert [g["name"] for g in opt.groups] == ["bias", "all"]


def _fresh_process_resume(tmp_path, code):
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(code))
    env = {"PYTHONPATH": OPTIM_PATH}
    import os

    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr


def test_groups_survive_a_save_and_load_in_a_fresh_process(tmp_path):
    """Train 12 steps, save_checkpoint; a fresh process (other model ids) loads it and
    trains 12 more: bitwise the uninterrupted run, groups and frozen bias included."""
    from optim.thinc import save_checkpoint

    model = make_model()
    opt = ThincAdam(optim.decaying(0.01, 1e-3), groups=GROUPS).bind(model)
    data = list(batches(24))
    for i, (X, Y) in enumerate(data):
        if i == 12:
            save_checkpoint(tmp_path / "ckpt", model, opt, step=12)
        backprop(model, X, Y)
        finish_update(model, opt)
        opt.step_schedules()
    straight = weights(model)
    _fresh_process_resume(tmp_path, f"""
        import sys, numpy
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import optim
        from optim.thinc import Adam, finish_update, load_checkpoint
        from test_groups import GROUPS, backprop, batches, make_model, weights
        out = Path(sys.argv[1])
        make_model(5); make_model(6)  # other ids
        model = make_model(7)  # other initial weights: the checkpoint brings them
        opt = Adam(optim.decaying(0.01, 1e-3), groups=GROUPS)
        opt, extra = load_checkpoint(out / "ckpt", model, opt)
        for X, Y in list(batches(24))[extra["step"]:]:
            backprop(model, X, Y)
            finish_update(model, opt)
            opt.step_schedules()
        numpy.savez(out / "resumed.npz", **weights(model))
    """)
    resumed = dict(numpy.load(tmp_path / "resumed.npz"))
    for path in straight:
        assert straight[path].tobytes() == resumed[path].tobytes(), path


def test_load_checkpoint_with_other_groups_names_the_group(tmp_path):
    from optim.checkpoint import CheckpointError
    from optim.thinc import load_checkpoint, save_checkpoint

    model = make_model()
    opt = ThincAdam(0.001, groups=GROUPS).bind(model)
    for X, Y in batches(3):
        backprop(model, X, Y)
        finish_update(model, opt)
    save_checkpoint(tmp_path / "ckpt", model, opt)
    other = ThincAdam(0.001, groups=[{"match": "relu/*", "learn_rate_scale": 0.1},
                                     GROUPS[1]])
    with pytest.raises(CheckpointError, match=r"group 'groups\[0\]' has other settings"):
        load_checkpoint(tmp_path / "ckpt", make_model(), other)
    fewer = ThincAdam(0.001, groups=GROUPS[:1])
    with pytest.raises(CheckpointError, match=r"group 'groups\[1\]' is in the checkpoint"):
        load_checkpoint(tmp_path / "ckpt", make_model(), fewer)
    loaded, _ = load_checkpoint(tmp_path / "ckpt", make_model(), other,
                                allow_group_change=True)
    assert loaded.groups[0]["learn_rate_scale"] == 0.1
    same, _ = load_checkpoint(tmp_path / "ckpt", make_model(), ThincAdam(0.001, groups=GROUPS))
    assert same.groups == opt.groups


def test_saved_state_round_trips_groups():
    opt = Adam(0.01, groups=[{"match": "a*", "learn_rate": optim.decaying(0.1, 0.01),
                              "L2": 0.5}, {"match": "f", "frozen": True}])
    w, g = numpy.ones(5, "f"), numpy.ones(5, "f")
    opt("ab", w, g)
    opt.step_schedules()
    loaded = Optimizer.load_bytes(opt.to_bytes())
    assert loaded.groups[1] == {"name": "groups[1]", "match": "f", "frozen": True}
    assert loaded._hyper_for("ab").learn_rate == opt._hyper_for("ab").learn_rate
    assert loaded._hyper_for("ab").L2 == 0.5
    for o in (opt, loaded):
        o.step_schedules()
    assert loaded._hyper_for("ab").learn_rate == opt._hyper_for("ab").learn_rate


@pytest.mark.parametrize("groups,message", [
    ([{"match": 3}], r"group 'groups\[0\]': match must be a non-empty string"),
    ([{"match": "a", "lr": 0.1}], r"group 'groups\[0\]': unknown setting 'lr'"),
    ([{"match": "a", "frozen": True, "learn_rate": 0.1}],
     r"group 'groups\[0\]': a frozen group takes no other settings \(got learn_rate\)"),
    ({"enc": {"match": "a", "learn_rate_scale": -0.5}},
     r"group 'enc': learn_rate_scale must be a finite number >= 0"),
    ({"enc": {"match": "a", "beta1": 1.5}}, r"group 'enc': beta1 must be finite and in"),
    ({"enc": {"match": "a", "frozen": "yes"}}, r"group 'enc': frozen must be true or false"),
    ("relu/*", "groups must be a list of dicts"),
])
def test_bad_groups_fail_when_built(groups, message):
    with pytest.raises(ValueError, match=message):
        Adam(groups=groups)


def test_a_group_matching_nothing_fails_at_bind_listing_paths():
    model = make_model()
    opt = Adam(groups={"head": {"match": "sofmax/*", "frozen": True}})
    with pytest.raises(ValueError, match=r"group 'head': match 'sofmax/\*' matches no "
                                         r"parameter .*relu/W, relu/b, softmax/W"):
        opt.bind(model)


def test_frozen_key_validates_its_arrays_and_zeroes_the_gradient():
    opt = Adam(groups=[{"match": "b", "frozen": True}])
    w, g = numpy.ones(3, "f"), numpy.full(3, 2, "f")
    opt((1, "b"), w, g)
    assert (w == 1).all() and (g == 0).all() and not opt.nr_update and not opt.mom1
    with pytest.raises(ValueError, match="shape"):
        opt((1, "b"), numpy.ones(3, "f"), numpy.ones(4, "f"))
    with pytest.raises(TypeError, match="float32 or float64"):
        opt((1, "b"), numpy.ones(3, "i"), numpy.ones(3, "i"))


@pytest.mark.parametrize("many", [False, True])
def test_a_key_aware_schedule_inside_a_group(many):
    """A Thinc 9 style callable reading the key (any callable `f(step, key=..., ...)`)
    as a group's learn_rate: each key gets its value, bitwise as plain optimizers with
    those rates; keys outside the group keep the optimizer's rate."""
    def rate(step, *, key=None, last_score=None):
        return 0.01 / (step + 1) if key == ("n", "W") else 0.02 / (step + 1)

    opt = Adam(0.05, groups=[{"match": "W", "learn_rate": rate}])
    plain = {("n", "W"): Adam([0.01 / (s + 1) for s in range(8)]),
             ("m", "W"): Adam([0.02 / (s + 1) for s in range(8)]),
             ("m", "b"): Adam(0.05)}
    rng = numpy.random.RandomState(3)
    w = {k: rng.randn(40).astype("f") for k in plain}
    w_ref = {k: v.copy() for k, v in w.items()}
    for _ in range(8):
        grads = {k: rng.randn(40).astype("f") for k in plain}
        keys = list(plain)
        if many:
            opt.step_many(keys, [w[k] for k in keys], [grads[k].copy() for k in keys])
        else:
            for k in keys:
                opt(k, w[k], grads[k].copy())
        for k, o in plain.items():
            o(k, w_ref[k], grads[k].copy())
            o.step_schedules()
        opt.step_schedules()
    for k in plain:
        assert w[k].tobytes() == w_ref[k].tobytes(), k


def test_groups_by_path_warn_when_the_optimizer_was_never_bound():
    """Plain `spacy train` cannot bind: a pattern holding '/' then matches nothing, and
    the first update says so instead of training everything at one rate."""
    opt = Adam(groups=[{"match": "tagger/*", "frozen": True}])
    with pytest.warns(UserWarning, match=r"group 'groups\[0\]' \(match 'tagger/\*'\) "
                                         r"matches parameter paths, but this optimizer "
                                         r"was not bound.*'W'"):
        opt((1, "W"), numpy.ones(3, "f"), numpy.ones(3, "f"))
    import warnings

    with warnings.catch_warnings():  # once, and never for bound or name-only groups
        warnings.simplefilter("error")
        opt((2, "W"), numpy.ones(3, "f"), numpy.ones(3, "f"))
        Adam(groups=[{"match": "b", "L2": 0.0}])((1, "b"), numpy.ones(3, "f"),
                                                  numpy.ones(3, "f"))
        bound = Adam(groups=[{"match": "tagger/*", "frozen": True}])
        bound.bind({(1, "W"): "tagger/softmax/W"})
        bound((1, "W"), numpy.ones(3, "f"), numpy.ones(3, "f"))


def test_pytorch_shim_parameters_are_named_under_their_node():
    """Parameters a shim hands to the optimizer (PyTorchWrapper, as spacy-transformers'
    weights) are named by their own names under their node: `pytorch/bias`."""
    torch = pytest.importorskip("torch")
    thinc_api.fix_random_seed(0)
    model = thinc_api.chain(thinc_api.PyTorchWrapper(torch.nn.Linear(5, 3)),
                            thinc_api.Linear(2, 3))  # random weights: gradients reach torch
    X = numpy.random.RandomState(0).uniform(-1, 1, (4, 5)).astype("f")
    model.initialize(X=X)
    opt = ThincAdam(0.01, groups=[{"match": "pytorch/bias", "frozen": True}]).bind(model)
    assert {"pytorch/weight", "pytorch/bias", "linear/W", "linear/b"} <= set(
        opt.paths.values())
    linear = model.layers[0].shims[0]._model
    bias, weight = linear.bias.detach().clone(), linear.weight.detach().clone()
    out, backward = model.begin_update(X)
    backward(out - numpy.eye(2, dtype="f")[[0, 1, 0, 1]])
    finish_update(model, opt)
    assert torch.equal(linear.bias.detach(), bias)
    assert not torch.equal(linear.weight.detach(), weight)
