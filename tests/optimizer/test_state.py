"""Optimizer state on disk: exact resume in a fresh process, atomic writes, corrupt files."""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy
import pytest
import srsly
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optim
from optim import Adam, RAdam, SGD
from optim.serialize import StateError

SHAPES = {(0, "W"): (7, 5), (0, "b"): (5,), (3, "E"): (11, 2, 3)}

# name -> factory source, evaluated in both processes
CASES = {
    "sgd": "SGD(0.05, L2=1e-3, L2_is_weight_decay=False)",
    "sgd_lookahead": "SGD(optim.decaying(0.05, 1e-2), lookahead_k=3, lookahead_alpha=0.4)",
    "adam_thinc_defaults": "Adam()",
    "adam_coupled_l2_float64": "Adam(0.01, L2=1e-2, L2_is_weight_decay=False)",
    "adam_decoupled_schedules": (
        "Adam(optim.warmup_linear(0.01, 3, 20), L2=1e-3, lookahead_k=4,"
        " schedules={'beta1': optim.sequence([0.8, 0.85, 0.9])})"
    ),
    "radam_all": (
        "RAdam(optim.slanted_triangular(0.01, 20), beta2=0.9, weight_decay=1e-3, L2=1e-3,"
        " lookahead_k=2, grad_clip=0.5)"
    ),
    "adam_plateau": "Adam(optim.plateau(2, 0.5, optim.constant(0.01)))",
}
N, M = 6, 7


def gradient(key, shape, step, dtype):
    seed = zlib.crc32(f"{key}/{step}".encode())
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype) * 2.0


def dtype_of(case):
    return "float64" if "float64" in case else "float32"


def run_steps(opt, weights, start, stop, dtype):
    for step in range(start, stop):
        for key, w in weights.items():
            opt(key, w, gradient(str(key), w.shape, step, dtype), lr_scale=0.5 + 0.1 * (step % 3))
        if step % 3 == 2:
            opt.last_score = float(step % 2)  # drives the plateau schedule
        opt.step_schedules()


def initial_weights(dtype):
    rng = numpy.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def state_arrays(opt):
    out = {}
    for name in ("mom1", "mom2", "averages", "lookahead"):
        store = getattr(opt, name) or {}
        for key, array in store.items():
            out[f"{name}{key}"] = array
    return out


CHILD = r"""
import sys, numpy, optim
sys.path.insert(0, sys.argv[2])
import test_state as T
tmp = sys.argv[1]
for case in T.CASES:
    opt = optim.load(f"{tmp}/{case}.optim")
    data = numpy.load(f"{tmp}/{case}.npz")
    weights = {k: data[str(k)].copy() for k in T.SHAPES}
    T.run_steps(opt, weights, T.N, T.N + T.M, T.dtype_of(case))
    out = {f"w{k}": w for k, w in weights.items()}
    out.update(T.state_arrays(opt))
    numpy.savez(f"{tmp}/{case}.resumed.npz", **out)
    optim.load(f"{tmp}/{case}.optim")  # loading twice gives the same state
"""


def test_exact_resume_in_a_fresh_process(tmp_path):
    expected = {}
    for case, source in CASES.items():
        dtype = dtype_of(case)
        factory = lambda: eval(source, {"optim": optim, "SGD": SGD, "Adam": Adam, "RAdam": RAdam})
        straight, stopped = factory(), factory()
        w_straight, w_stopped = initial_weights(dtype), initial_weights(dtype)
        run_steps(straight, w_straight, 0, N + M, dtype)
        run_steps(stopped, w_stopped, 0, N, dtype)
        stopped.to_disk(tmp_path / f"{case}.optim")
        numpy.savez(tmp_path / f"{case}.npz", **{str(k): w for k, w in w_stopped.items()})
        expected[case] = {f"w{k}": w for k, w in w_straight.items()}
        expected[case].update(state_arrays(straight))
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(Path(__file__).parent)],
                   check=True)
    for case, arrays in expected.items():
        resumed = numpy.load(tmp_path / f"{case}.resumed.npz")
        assert sorted(resumed.files) == sorted(arrays), case
        for name, array in arrays.items():
            assert resumed[name].dtype == array.dtype
            assert numpy.array_equal(resumed[name], array), (case, name)


def test_round_trip_keeps_keys_hyperparameters_and_schedules():
    opt = RAdam(optim.decaying(0.01, 1e-2), weight_decay=1e-3, lookahead_k=3, eps=1e-7)
    weights = initial_weights("float32")
    run_steps(opt, weights, 0, 4, "float32")
    opt.last_score = 0.5
    loaded = RAdam().from_bytes(opt.to_bytes())
    assert set(loaded.nr_update) == set(opt.nr_update) == set(SHAPES)
    assert all(isinstance(k, tuple) and isinstance(k[0], int) for k in loaded.nr_update)
    for name in ("learn_rate", "beta1", "beta2", "eps", "weight_decay", "lookahead_alpha",
                 "lookahead_k", "use_radam", "use_averages", "step", "last_score"):
        assert getattr(loaded, name) == getattr(opt, name), name
    assert loaded.schedules["learn_rate"].attrs == opt.schedules["learn_rate"].attrs


def test_from_bytes_returns_self_and_rejects_another_kind():
    sgd = SGD(0.1)
    w, g = numpy.ones(3, "f"), numpy.ones(3, "f")
    sgd("k", w, g)
    other = SGD(0.5)
    assert other.from_bytes(sgd.to_bytes()) is other
    assert other.learn_rate == 0.1 and other.nr_update["k"] == 1
    adam = Adam()
    with pytest.raises(ValueError, match="sgd"):
        adam.from_bytes(sgd.to_bytes())
    assert adam.learn_rate == 0.001 and not adam.nr_update


def test_generator_schedule_cannot_be_saved():
    opt = Adam(learn_rate=(0.001 * i for i in range(1, 100)))
    with pytest.raises(ValueError, match=r"learn_rate.*registered schedule"):
        opt.to_bytes()


def test_loaded_state_rejects_a_new_shape_for_a_known_key(tmp_path):
    opt = Adam()
    opt((1, "W"), numpy.ones((4, 3), "f"), numpy.ones((4, 3), "f"))
    opt.to_disk(tmp_path / "opt")
    loaded = optim.load(tmp_path / "opt")
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        loaded((1, "W"), numpy.ones((3, 4), "f"), numpy.ones((3, 4), "f"))


def test_to_disk_is_atomic_under_a_failing_write(tmp_path, monkeypatch):
    path = tmp_path / "optimizer.bin"
    old = Adam(0.01)
    old("k", numpy.ones(5, "f"), numpy.ones(5, "f"))
    old.to_disk(path)
    before = path.read_bytes()
    new = Adam(0.02)
    new("k", numpy.ones(100_000, "f"), numpy.ones(100_000, "f"))

    real_fsync = os.fsync

    def failing_fsync(fd):  # the data is half on disk when the "crash" comes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        new.to_disk(path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.bin"]
    assert optim.load(path).learn_rate == 0.01
    new.to_disk(path)
    assert optim.load(path).learn_rate == 0.02


def valid_state() -> bytes:
    opt = RAdam(optim.decaying(0.01, 1e-3), lookahead_k=2)
    run_steps(opt, initial_weights("float32"), 0, 3, "float32")
    return opt.to_bytes()


def test_corrupt_states_raise_clear_value_errors():
    data = valid_state()
    msg = srsly.msgpack_loads(data)
    cases = {
        "newer version": dict(msg, version=99),
        "not an optimizer": {"format": "spacy.Language", "version": 1},
        "wrong shape": dict(msg, keys="nope"),
        "missing field": {k: v for k, v in msg.items() if k != "hyperparameters"},
        "nan hyperparameter": dict(msg, hyperparameters=dict(msg["hyperparameters"], eps=float("nan"))),
    }
    bad_array = dict(msg["keys"][0], mom1=numpy.zeros(3, "f"))
    cases["array size disagrees"] = dict(msg, keys=[bad_array] + msg["keys"][1:])
    int_array = dict(msg["keys"][0], mom2=numpy.zeros(msg["keys"][0]["shape"], "int64"))
    cases["int array"] = dict(msg, keys=[int_array] + msg["keys"][1:])
    patterns = {"newer version": "version", "not an optimizer": "format", "wrong shape": "keys",
                "missing field": "hyperparameters", "nan hyperparameter": "eps",
                "array size disagrees": "mom1", "int array": "mom2"}
    target = Adam()
    for name, payload in cases.items():
        with pytest.raises(ValueError, match=patterns[name]):
            target.from_bytes(srsly.msgpack_dumps(payload))
    for raw in (data[: len(data) // 2], b"", os.urandom(64), b"\x00" * 10):
        with pytest.raises(ValueError):
            target.from_bytes(raw)
    assert target.learn_rate == 0.001 and not target.nr_update


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_states_give_only_clean_errors(data):
    state = FUZZ_SEED
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "truncate":
        mutated = state[: data.draw(st.integers(0, len(state) - 1))]
    elif kind == "flip":
        pos = data.draw(st.lists(st.integers(0, len(state) - 1), min_size=1, max_size=8))
        buf = bytearray(state)
        for p in pos:
            buf[p] = data.draw(st.integers(0, 255))
        mutated = bytes(buf)
    else:
        start = data.draw(st.integers(0, len(state)))
        mutated = state[:start] + data.draw(st.binary(max_size=32)) + state[start:]
    target = Adam()
    try:
        loaded = target.from_bytes(mutated)
    except ValueError:
        assert target.learn_rate == 0.001 and not target.nr_update
    else:
        # A mutation that still parses must give a usable optimizer.
        for key, shape in loaded._states.shapes.items():
            dtype = next(iter(s[key].dtype for s in (loaded.mom1, loaded.lookahead) if key in s),
                         numpy.float32)
            loaded(key, numpy.ones(shape, dtype), numpy.ones(shape, dtype))


FUZZ_SEED = valid_state()
