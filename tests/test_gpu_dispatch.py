"""The Optimizer's GPU path, end to end, with the GPU replaced by the CPU harness.

`HarnessBackend` (tests/cuda_harness.py) is injected as the GPU backend: its arrays are
`FakeDeviceArray`s and its updates run optim._kernels_cuda's kernel strings compiled
with g++. So everything CuPy would do is exercised except the launch itself: choosing
the kernel and its arguments, allocating state on the device, the clip reduction,
`to_gpu()` / `to_cpu()`, and the errors for mixed host/device inputs.

Tolerances: without clipping the device path evaluates the same expressions in the same
order and type as the Cython kernels, so results are bitwise equal. With clipping the
sum of squares is summed in a different order (sequentially here, 8 lanes in Cython),
so the clip factor may differ in its last bit; over a few steps that stays within 1e-5
(float32) / 1e-12 (float64) of the array's magnitude.
"""
import sys
from typing import Any, Dict, List, Tuple

import numpy
import pytest

import cuda_harness as ch
import optim
from optim import _kernels_cuda as kc
from optim import backends

pytestmark = pytest.mark.skipif(
    not ch.shutil.which("g++"), reason="g++ is not on PATH: cannot run the CUDA kernel "
    "strings on the host"
)


@pytest.fixture
def device():
    backend = ch.HarnessBackend()
    previous = backends.set_gpu_backend(backend)
    try:
        yield backend
    finally:
        backends.set_gpu_backend(previous)


CONFIGS: Dict[str, Dict[str, Any]] = {
    "sgd": dict(factory="SGD", learn_rate=0.1, grad_clip=0.0),
    "sgd_avg_la_clip": dict(factory="SGD", learn_rate=0.1, use_averages=True, lookahead_k=2,
                            grad_clip=1.0, L2=0.01),
    "adam": dict(factory="Adam", learn_rate=0.01, grad_clip=0.0, use_averages=False),
    "adam_defaults": dict(factory="Adam", learn_rate=0.01),  # clip 1.0, averages on
    "adam_decoupled_la": dict(factory="Adam", learn_rate=0.01, L2=0.01, L2_is_weight_decay=True,
                              lookahead_k=3, grad_clip=0.0),
    "radam": dict(factory="RAdam", learn_rate=0.01, beta2=0.9, weight_decay=0.01,
                  grad_clip=0.0),
    "radam_avg_la_clip": dict(factory="RAdam", learn_rate=0.01, beta2=0.9, use_averages=True,
                              lookahead_k=2, grad_clip=0.5, L2=0.001),
}
SHAPES = [(3, 4), (7,), (2, 3, 5)]
STEPS = 8  # RAdam with beta2=0.9 is un-rectified for t < 6, rectified from t = 6


def make(config: str):
    kwargs = dict(CONFIGS[config])
    return getattr(optim, kwargs.pop("factory"))(**kwargs)


def gradients(shape: Tuple[int, ...], dtype, steps: int, seed: int) -> List[numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 0.5).astype(dtype) for _ in range(steps)]


def assert_same(got: Any, want: numpy.ndarray, exact: bool, what: str) -> None:
    got = numpy.asarray(got).view(numpy.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if exact:
        numpy.testing.assert_array_equal(got, want, err_msg=what)
    else:
        tol = 1e-5 if want.dtype == numpy.float32 else 1e-12
        scale = max(float(numpy.abs(want).max()), 1e-30)
        numpy.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=what)


def state_of(opt, key) -> Dict[str, Any]:
    out = {"mom1": opt.mom1.get(key), "mom2": opt.mom2.get(key),
           "slow": opt.lookahead.get(key)}
    if opt.averages is not None:
        out["average"] = opt.averages.get(key)
    return {k: v for k, v in out.items() if v is not None}


def expected_launches(config: str, opt, steps: int) -> List[str]:
    """The kernels the device path must launch, one per update, plus one reduction
    per update when clipping is on."""
    c = CONFIGS[config]
    kind = c["factory"].lower()
    clip = c.get("grad_clip", 1.0) > 0
    avg = opt.averages is not None
    k = c.get("lookahead_k", 0)
    out = []
    for t in range(1, steps + 1):
        if clip:
            out.append(kc.REDUCTION.name)
        rect = kind == "radam" and t >= 6  # beta2 = 0.9
        out.append(kc.kernel_name(kind, rect, avg, k > 0 and t % k == 0))
    return out


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_device_path_matches_cpu_optimizer(device, config, dtype):
    cpu, dev = make(config), make(config)
    exact = CONFIGS[config].get("grad_clip", 1.0) == 0
    rng = numpy.random.default_rng(0)
    keys = [(i, "W") for i in range(len(SHAPES))]
    w_cpu = {k: rng.standard_normal(s).astype(dtype) for k, s in zip(keys, SHAPES)}
    w_dev = {k: ch.to_fake_device(w) for k, w in w_cpu.items()}
    grads = {k: gradients(s, dtype, STEPS, i) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    for step in range(STEPS):
        for key in keys:
            g_cpu = grads[key][step].copy()
            g_dev = ch.to_fake_device(grads[key][step])
            cpu(key, w_cpu[key], g_cpu)
            out_w, out_g = dev(key, w_dev[key], g_dev)
            assert out_w is w_dev[key] and out_g is g_dev, "updates in place"
            assert type(w_dev[key]) is ch.FakeDeviceArray
            assert not g_dev.any(), "the kernel zeroes the gradient"
            assert_same(w_dev[key], w_cpu[key], exact, f"{config} step {step} weights")
            cpu_state, dev_state = state_of(cpu, key), state_of(dev, key)
            assert sorted(cpu_state) == sorted(dev_state)
            for name, array in dev_state.items():
                assert type(array) is ch.FakeDeviceArray, f"{name} lives on the device"
                assert_same(array, cpu_state[name], exact, f"{config} step {step} {name}")
    per_key = expected_launches(config, dev, STEPS)
    launches = device.launches
    assert len(launches) == len(per_key) * len(keys)
    # calls interleave keys; each key's sequence is the expected one
    n = len(per_key) // STEPS
    for i in range(len(keys)):
        mine = [launches[(s * len(keys) + i) * n + j] for s in range(STEPS) for j in range(n)]
        assert mine == per_key


@pytest.mark.parametrize("config", ["adam_defaults", "radam_avg_la_clip", "sgd_avg_la_clip"])
def test_to_gpu_and_back(device, config):
    """State made on the host moves to the device and back; numbers keep matching a
    host-only optimizer."""
    dtype = numpy.float32
    ref, opt = make(config), make(config)
    shape = (4, 6)
    w_ref = numpy.random.default_rng(1).standard_normal(shape).astype(dtype)
    w = w_ref.copy()
    grads = gradients(shape, dtype, 9, 7)
    for step in range(9):
        if step == 3:
            assert opt.to_gpu() is opt
            for name, array in state_of(opt, "k").items():
                assert type(array) is ch.FakeDeviceArray, name
            w = ch.to_fake_device(w)
        if step == 6:
            assert opt.to_cpu() is opt
            for name, array in state_of(opt, "k").items():
                assert type(array) is numpy.ndarray, name
            w = numpy.array(w.view(numpy.ndarray))
        ref("k", w_ref, grads[step].copy())
        g = grads[step].copy()
        opt("k", w, g if type(w) is numpy.ndarray else ch.to_fake_device(g))
        assert_same(w, w_ref, False, f"step {step}")
        for name, array in state_of(ref, "k").items():
            assert_same(state_of(opt, "k")[name], array, False, f"step {step} {name}")
    assert device.moved_to_device == len(state_of(opt, "k"))
    assert device.moved_to_host == len(state_of(opt, "k"))
    assert len(device.launches) >= 3, "steps 3-5 ran on the device"


def test_mixed_inputs_are_errors(device):
    opt = optim.Adam(0.01)
    w = ch.to_fake_device(numpy.ones((2, 3), numpy.float32))
    g_host = numpy.full((2, 3), 0.5, numpy.float32)
    with pytest.raises(TypeError, match="same device"):
        opt("k", w, g_host)
    with pytest.raises(TypeError, match="same device"):
        opt("k", numpy.ones((2, 3), numpy.float32), ch.to_fake_device(g_host))
    assert (g_host == 0.5).all() and (w == 1).all(), "nothing was touched"
    assert device.launches == [] and not opt.mom1


def test_state_and_weights_on_different_devices(device):
    """State on the device but weights on the host (or the reverse): an error naming
    the fix, and nothing updated."""
    opt = optim.Adam(0.01)
    g = numpy.full((2, 3), 0.5, numpy.float32)
    opt("k", ch.to_fake_device(numpy.ones((2, 3), numpy.float32)), ch.to_fake_device(g))
    mom1 = opt.mom1["k"].copy()
    w_host = numpy.ones((2, 3), numpy.float32)
    with pytest.raises(TypeError, match=r"to_cpu\(\)"):
        opt("k", w_host, g.copy())
    assert (w_host == 1).all() and (opt.mom1["k"] == mom1).all() and opt.nr_update["k"] == 1
    opt.to_cpu()
    with pytest.raises(TypeError, match=r"to_gpu\(\)"):
        opt("k", ch.to_fake_device(w_host), ch.to_fake_device(g))


def test_device_arrays_are_validated(device):
    opt = optim.SGD(0.1)
    w = ch.to_fake_device(numpy.ones((4, 4), numpy.float32))
    with pytest.raises(TypeError, match="float16"):
        opt("a", w.astype(numpy.float16), w.astype(numpy.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        opt("b", w[:, ::2], w[:, ::2].copy())
    with pytest.raises(TypeError):
        opt("c", w, ch.to_fake_device(numpy.ones((4, 4), numpy.float64)))
    with pytest.raises(ValueError):
        opt("d", w, ch.to_fake_device(numpy.ones((2, 8), numpy.float32)))
    with pytest.raises(ValueError, match=r"key 'e': lr_scale"):
        opt("e", w, ch.to_fake_device(numpy.ones((4, 4), numpy.float32)), lr_scale=-1.0)
    assert device.launches == []
    assert not opt.nr_update


def test_step_many_on_device(device):
    cpu, dev = make("adam_defaults"), make("adam_defaults")
    keys = ["a", "b"]
    w_cpu = [numpy.linspace(-1, 1, 12, dtype=numpy.float64).reshape(3, 4), numpy.ones(5)]
    w_dev = [ch.to_fake_device(w) for w in w_cpu]
    for step in range(3):
        grads = [numpy.full(w.shape, 0.1 * (step + 1)) for w in w_cpu]
        cpu.step_many(keys, w_cpu, [g.copy() for g in grads])
        dev.step_many(keys, w_dev, [ch.to_fake_device(g) for g in grads])
        for a, b in zip(w_dev, w_cpu):
            assert_same(a, b, False, f"step {step}")
    assert device.launches.count("optim_adam_avg") == 6


def test_without_cupy_the_gpu_path_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(kc, "_cupy", None)
    previous = backends.set_gpu_backend(None)  # the default: CuPy
    try:
        opt = optim.Adam(0.01)
        w = numpy.ones(3, numpy.float32)
        opt("k", w, numpy.ones(3, numpy.float32))  # host updates never need CuPy
        with pytest.raises(ImportError, match=r'pip install "optim\[cuda12x\]"'):
            opt.to_gpu()
    finally:
        backends.set_gpu_backend(previous)


def test_check_gpu_script_dry_run():
    """bin/check_gpu.py (for users with a GPU) runs end to end on the CPU harness."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bin" / "check_gpu.py"
    res = subprocess.run([sys.executable, str(script), "--fake", "--size", "2000",
                          "--repeat", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in list(kc.KERNELS) + [kc.REDUCTION.name]:
        assert res.stdout.count(name + " ") == 2, name  # float32 and float64 rows
    assert "OK: worst error 0.00" in res.stdout  # bitwise equal to the Cython kernels
