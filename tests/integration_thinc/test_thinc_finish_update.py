"""optim.thinc.finish_update: Thinc's Model.finish_update through one step_many.

Two copies of the same Thinc model (Thinc layers and a PyTorch layer through Thinc's
PyTorch shim) train on the same batches, one with `model.finish_update(optimizer)`
(Thinc's loop: one optimizer call per tensor), one with
`optim.thinc.finish_update(model, optimizer)`: every parameter, the optimizer state and
the update counts must be bitwise equal after every step, and the helper must make
exactly one step_many call per step (no per-tensor calls).
"""
import numpy
import pytest

thinc_api = pytest.importorskip("thinc.api")
torch = pytest.importorskip("torch")

import optim  # noqa: E402
import optim.thinc  # noqa: E402
from thinc.api import (  # noqa: E402
    PyTorchWrapper,
    Relu,
    Softmax,
    chain,
    fix_random_seed,
)


def make_model(seed: int = 0):
    fix_random_seed(seed)
    torch.manual_seed(seed)
    model = chain(Relu(12), PyTorchWrapper(torch.nn.Linear(12, 10)), Relu(9), Softmax(4))
    model.initialize(X=numpy.zeros((2, 6), numpy.float32),
                     Y=numpy.zeros((2, 4), numpy.float32))
    return model


def all_params(model):
    """Every parameter: Thinc's by (node.id, name) order of walk, then torch's."""
    out = []
    for node in model.walk():
        for name in node.param_names:
            if node.has_param(name):
                out.append(numpy.array(node.get_param(name), copy=True))
        for shim in node.shims:
            for _, p in shim._model.named_parameters():
                out.append(p.detach().numpy().copy())
    return out


def keys_in_order(model):
    """The optimizer keys of a model, in walk order (ids differ between two copies)."""
    out = []
    for node in model.walk():
        for shim in node.shims:
            out += [(shim.id, name) for name, _ in shim._model.named_parameters()]
        out += [(node.id, name) for name in node.param_names]
    return out


def same_state(ref_model, ref_opt, model, opt, what):
    """Counts and optimizer state, key by key in walk order."""
    for ref_key, key in zip(keys_in_order(ref_model), keys_in_order(model)):
        assert ref_opt.nr_update.get(ref_key) == opt.nr_update.get(key), (what, key)
        for store in ("mom1", "mom2", "averages"):
            ref_store, mine = getattr(ref_opt, store) or {}, getattr(opt, store) or {}
            assert (ref_key in ref_store) == (key in mine), (what, store, key)
            if key in mine:
                numpy.testing.assert_array_equal(ref_store[ref_key], mine[key],
                                                 err_msg=f"{what} {store} {key}")


class Spy:
    """Counts how the model reaches the optimizer."""

    def __init__(self, optimizer):
        self.optimizer, self.calls, self.step_many_calls = optimizer, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.optimizer(*args, **kwargs)

    def step_many(self, keys, weights, gradients, **kwargs):
        self.step_many_calls.append(list(keys))
        return self.optimizer.step_many(keys, weights, gradients, **kwargs)


@pytest.mark.parametrize("factory", [optim.thinc.Adam, optim.thinc.RAdam, optim.thinc.SGD])
def test_finish_update_matches_thinc_loop(factory):
    kwargs = {"learn_rate": 0.01} if factory is not optim.thinc.SGD else {"learn_rate": 0.05}
    ref_model, model = make_model(), make_model()
    for a, b in zip(all_params(ref_model), all_params(model)):
        numpy.testing.assert_array_equal(a, b)  # same start
    ref_opt, opt = factory(**kwargs), factory(**kwargs)  # Thinc's defaults: clip, averages
    spy = Spy(opt)
    rng = numpy.random.default_rng(0)
    for step in range(5):
        X = rng.standard_normal((7, 6)).astype(numpy.float32)
        Y = numpy.eye(4, dtype=numpy.float32)[rng.integers(0, 4, 7)]
        for m in (ref_model, model):
            guess, backprop = m.begin_update(X)
            backprop((guess - Y) * 3.0)
        ref_model.finish_update(ref_opt)
        optim.thinc.finish_update(model, spy)
        for i, (a, b) in enumerate(zip(all_params(ref_model), all_params(model))):
            numpy.testing.assert_array_equal(a, b, err_msg=f"step {step} param {i}")
        same_state(ref_model, ref_opt, model, opt, f"step {step}")
        for shim_model in (ref_model, model):
            for node in shim_model.walk():
                for shim in node.shims:
                    assert all(not p.grad.any() for p in shim._model.parameters())
    assert spy.calls == 0 and len(spy.step_many_calls) == 5
    keys = spy.step_many_calls[0]
    assert len(keys) == len(set(keys)) == len(ref_opt.nr_update) == 8  # 3 Relu/Softmax x2 + 2 torch
    assert sum(1 for k in keys if isinstance(k[1], str) and k[1] in ("weight", "bias")) == 2


def test_shared_shim_updates_twice_like_thinc():
    """A shim reachable from two nodes is updated twice per step in Thinc's loop (the
    second time with its zeroed gradient); the helper does the same in two calls."""
    def build():
        fix_random_seed(1)
        torch.manual_seed(1)
        layer = PyTorchWrapper(torch.nn.Linear(5, 5))
        model = chain(layer, Relu(5))
        model.initialize(X=numpy.zeros((2, 5), numpy.float32),
                         Y=numpy.zeros((2, 5), numpy.float32))
        model.layers[1].shims.append(layer.shims[0])  # the same shim in a second node
        return model

    ref_model, model = build(), build()
    ref_opt, opt = optim.thinc.Adam(0.01), optim.thinc.Adam(0.01)
    spy = Spy(opt)
    X = numpy.ones((3, 5), numpy.float32)
    for m in (ref_model, model):
        guess, backprop = m.begin_update(X)
        backprop(guess - 0.5)
    ref_model.finish_update(ref_opt)
    optim.thinc.finish_update(model, spy)
    for a, b in zip(all_params(ref_model), all_params(model)):
        numpy.testing.assert_array_equal(a, b)
    same_state(ref_model, ref_opt, model, opt, "shared shim")
    assert max(opt.nr_update.values()) == 2 and len(spy.step_many_calls) == 2
