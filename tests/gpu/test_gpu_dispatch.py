"""The Optimizer's GPU path, end to end, with the GPU replaced by the CPU harness.

`HarnessBackend` (tests/fake_cupy.py) is injected as the GPU backend: it is optim's
real `CupyBackend` on a fake CuPy whose arrays are `FakeDeviceArray`s and whose
RawModule runs the CUDA source on the host with CUDA's execution model emulated. So
everything is exercised but the silicon: choosing kernels and arguments, allocating
state on the device, the clip norm on the device, step_many's tables, streams,
`to_gpu()` / `to_cpu()`, and the errors for mixed host/device inputs.

No tolerances: the device path evaluates the same expressions in the same order and
type as the Cython kernels, and the clip norm sums in the same fixed order on both
(docs/numerics.md), so results are bitwise equal, clipping included. Every update is
checked to read nothing back from the device and to launch 1 kernel (2 when clipping;
step_many: 1 per group, +1 when clipping).
"""
import shutil
import sys
from typing import Any, Dict, List, Tuple

import numpy
import pytest

import fake_cupy as fc
import optim
from optim import _kernels_cuda as kc
from optim.cuda import cupy as cupy_backend
from optim import backends

NORM, NORM_MANY = "optim_clip_norm", "optim_clip_norm_many"

pytestmark = pytest.mark.skipif(
    not shutil.which("g++"), reason="g++ is not on PATH: cannot run the CUDA kernel "
    "strings on the host"
)


@pytest.fixture(params=[32, 64], ids=["block32", "block64"])
def device(request):
    backend = fc.HarnessBackend(block=request.param)
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


def assert_same(got: Any, want: numpy.ndarray, what: str) -> None:
    got = numpy.asarray(got).view(numpy.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    numpy.testing.assert_array_equal(got, want, err_msg=what)


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
            out.append(NORM)
        rect = kind == "radam" and t >= 6  # beta2 = 0.9
        out.append(kc.kernel_name(kind, rect, avg, k > 0 and t % k == 0))
    return out


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_device_path_matches_cpu_optimizer(device, config, dtype):
    cpu, dev = make(config), make(config)
    rng = numpy.random.default_rng(0)
    keys = [(i, "W") for i in range(len(SHAPES))]
    w_cpu = {k: rng.standard_normal(s).astype(dtype) for k, s in zip(keys, SHAPES)}
    w_dev = {k: fc.to_fake_device(w) for k, w in w_cpu.items()}
    grads = {k: gradients(s, dtype, STEPS, i) for i, (k, s) in enumerate(zip(keys, SHAPES))}
    for step in range(STEPS):
        for key in keys:
            g_cpu = grads[key][step].copy()
            g_dev = fc.to_fake_device(grads[key][step])
            cpu(key, w_cpu[key], g_cpu)
            out_w, out_g = dev(key, w_dev[key], g_dev)
            assert out_w is w_dev[key] and out_g is g_dev, "updates in place"
            assert type(w_dev[key]) is fc.FakeDeviceArray
            assert not g_dev.any(), "the kernel zeroes the gradient"
            assert_same(w_dev[key], w_cpu[key], f"{config} step {step} weights")
            cpu_state, dev_state = state_of(cpu, key), state_of(dev, key)
            assert sorted(cpu_state) == sorted(dev_state)
            for name, array in dev_state.items():
                assert type(array) is fc.FakeDeviceArray, f"{name} lives on the device"
                assert_same(array, cpu_state[name], f"{config} step {step} {name}")
    per_key = expected_launches(config, dev, STEPS)
    launches = device.launches
    assert len(launches) == len(per_key) * len(keys)
    # calls interleave keys; each key's sequence is the expected one
    n = len(per_key) // STEPS
    for i in range(len(keys)):
        mine = [launches[(s * len(keys) + i) * n + j] for s in range(STEPS) for j in range(n)]
        assert mine == per_key
    assert device.moved_to_host == 0 and device.moved_to_device == 0, "no host transfer"


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
                assert type(array) is fc.FakeDeviceArray, name
            w = fc.to_fake_device(w)
        if step == 6:
            assert opt.to_cpu() is opt
            for name, array in state_of(opt, "k").items():
                assert type(array) is numpy.ndarray, name
            w = numpy.array(w.view(numpy.ndarray))
        ref("k", w_ref, grads[step].copy())
        g = grads[step].copy()
        opt("k", w, g if type(w) is numpy.ndarray else fc.to_fake_device(g))
        assert_same(w, w_ref, f"step {step}")
        for name, array in state_of(ref, "k").items():
            assert_same(state_of(opt, "k")[name], array, f"step {step} {name}")
    assert device.moved_to_device == len(state_of(opt, "k"))
    assert device.moved_to_host == len(state_of(opt, "k"))
    assert len(device.launches) >= 3, "steps 3-5 ran on the device"


def test_mixed_inputs_are_errors(device):
    opt = optim.Adam(0.01)
    w = fc.to_fake_device(numpy.ones((2, 3), numpy.float32))
    g_host = numpy.full((2, 3), 0.5, numpy.float32)
    with pytest.raises(TypeError, match="same device"):
        opt("k", w, g_host)
    with pytest.raises(TypeError, match="same device"):
        opt("k", numpy.ones((2, 3), numpy.float32), fc.to_fake_device(g_host))
    assert (g_host == 0.5).all() and (w == 1).all(), "nothing was touched"
    assert device.launches == [] and not opt.mom1


def test_state_and_weights_on_different_devices(device):
    """State on the device but weights on the host (or the reverse): an error naming
    the fix, and nothing updated."""
    opt = optim.Adam(0.01)
    g = numpy.full((2, 3), 0.5, numpy.float32)
    opt("k", fc.to_fake_device(numpy.ones((2, 3), numpy.float32)), fc.to_fake_device(g))
    mom1 = opt.mom1["k"].copy()
    w_host = numpy.ones((2, 3), numpy.float32)
    with pytest.raises(TypeError, match=r"to_cpu\(\)"):
        opt("k", w_host, g.copy())
    assert (w_host == 1).all() and (opt.mom1["k"] == mom1).all() and opt.nr_update["k"] == 1
    opt.to_cpu()
    with pytest.raises(TypeError, match=r"to_gpu\(\)"):
        opt("k", fc.to_fake_device(w_host), fc.to_fake_device(g))


def test_device_arrays_are_validated(device):
    opt = optim.SGD(0.1)
    w = fc.to_fake_device(numpy.ones((4, 4), numpy.float32))
    with pytest.raises(TypeError, match="float16"):
        opt("a", w.astype(numpy.float16), w.astype(numpy.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        opt("b", w[:, ::2], w[:, ::2].copy())
    with pytest.raises(TypeError):
        opt("c", w, fc.to_fake_device(numpy.ones((4, 4), numpy.float64)))
    with pytest.raises(ValueError):
        opt("d", w, fc.to_fake_device(numpy.ones((2, 8), numpy.float32)))
    with pytest.raises(ValueError, match=r"key 'e': lr_scale"):
        opt("e", w, fc.to_fake_device(numpy.ones((4, 4), numpy.float32)), lr_scale=-1.0)
    assert device.launches == []
    assert not opt.nr_update


def test_without_cupy_the_gpu_path_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(cupy_backend, "_cupy", None)
    previous = backends.set_gpu_backend(None)  # the default: CuPy
    try:
        opt = optim.Adam(0.01)
        w = numpy.ones(3, numpy.float32)
        opt("k", w, numpy.ones(3, numpy.float32))  # host updates never need CuPy
        with pytest.raises(ImportError, match=r'pip install "thinc-optim\[cuda12x\]"'):
            opt.to_gpu()
    finally:
        backends.set_gpu_backend(previous)


# ---------------------------------------------------------------- step_many on the device

MANY_SHAPES = [(3, 4), (7,), (4097,), (2, 4096), (3 * 4096 + 1,), (1,)]


def run_many(config: str, dtype, steps: int, device, late_key: bool = False):
    """The same steps through a CPU optimizer (one call per key) and a device
    optimizer (step_many, with new views of the same memory at every step, as Thinc's
    PyTorch shim hands them over). Returns the per-step launches and transfers."""
    cpu, dev = make(config), make(config)
    rng = numpy.random.default_rng(3)
    keys = [(i, "W") for i in range(len(MANY_SHAPES))]
    w_cpu = [rng.standard_normal(s).astype(dtype) for s in MANY_SHAPES]
    w_dev = [fc.to_fake_device(w) for w in w_cpu]
    g_dev = [fc.to_fake_device(numpy.zeros(s, dtype)) for s in MANY_SHAPES]
    per_step = []
    for step in range(steps):
        grads = [(rng.standard_normal(s) * 0.7).astype(dtype) for s in MANY_SHAPES]
        active = list(range(len(keys)))
        if late_key and step < 2:  # the last key joins late: counts differ per key
            active = active[:-1]
        for i in active:
            cpu(keys[i], w_cpu[i], grads[i].copy())
            g_dev[i].view(numpy.ndarray)[...] = grads[i]
        before = (len(device.launches), device.moved_to_host, device.moved_to_device)
        dev.step_many([keys[i] for i in active], [w_dev[i][...] for i in active],
                      [g_dev[i][...] for i in active])
        per_step.append((device.launches[before[0]:], device.moved_to_host - before[1],
                         device.moved_to_device - before[2]))
        for i in active:
            assert not g_dev[i].any(), "gradients are zeroed"
            assert_same(w_dev[i], w_cpu[i], f"{config} step {step} key {i}")
            cpu_state, dev_state = state_of(cpu, keys[i]), state_of(dev, keys[i])
            assert sorted(cpu_state) == sorted(dev_state)
            for name, array in dev_state.items():
                assert type(array) is fc.FakeDeviceArray
                assert_same(array, cpu_state[name], f"{config} step {step} key {i} {name}")
        assert dict(dev.nr_update) == dict(cpu.nr_update)
    return per_step


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("config", ["sgd", "adam_defaults", "adam_decoupled_la",
                                    "radam_avg_la_clip"])
def test_step_many_on_device(device, config, dtype):
    """Bitwise equal to per-call CPU updates; one launch per group (+1 clip norm); no
    reads; after the first step only the coefficient rows are uploaded."""
    clip = CONFIGS[config].get("grad_clip", 1.0) > 0
    per_step = run_many(config, dtype, 7, device)
    for step, (launches, reads, writes) in enumerate(per_step):
        assert reads == 0, f"step {step} read from the device"
        updates = [n for n in launches if n.endswith("_many") and n != NORM_MANY]
        assert launches.count(NORM_MANY) == (len(updates) if clip else 0)
        assert len(updates) == 1, launches  # every key has the same count: one group
        groups = len(updates)
        # tables (tensor + chunk) built once per group; coefficient rows every step
        assert writes == groups * (3 if step == 0 else 1), (step, writes)


@pytest.mark.parametrize("config", ["radam_avg_la_clip", "adam_decoupled_la"])
def test_step_many_groups_by_kernel(device, config):
    """Keys at different counts run different kernels (RAdam rectified or not,
    lookahead sync or not): one launch per group, same bits as the CPU."""
    per_step = run_many(config, numpy.float32, 9, device, late_key=True)
    many = [[n for n in launches if n.endswith("_many") and n != NORM_MANY]
            for launches, _, _ in per_step]
    assert max(len(names) for names in many) == 2, many
    assert all(len(set(names)) == len(names) for names in many)


def test_step_many_rebuilds_tables_only_when_memory_changes(device):
    opt = make("adam_defaults")
    keys = ["a", "b"]
    w = [fc.to_fake_device(numpy.ones((5, 3), numpy.float32)) for _ in keys]
    g = [fc.to_fake_device(numpy.full((5, 3), 0.1, numpy.float32)) for _ in keys]

    def writes(grads):
        before = device.moved_to_device
        opt.step_many(keys, [x[...] for x in w], grads)
        return device.moved_to_device - before

    assert writes(g) == 3  # tensor table, chunk table, coefficient rows
    assert writes([x[...] for x in g]) == 1  # new views, same memory: rows only
    other = [fc.to_fake_device(numpy.full((5, 3), 0.1, numpy.float32)) for _ in keys]
    assert writes(other) == 3  # other gradient memory: rebuilt
    assert writes([other[1], other[0]]) == 3  # another order: rebuilt
    assert device.moved_to_host == 0


def test_step_many_mixed_dtypes_and_empty_gradients(device):
    """A float32 and a float64 group launch separately; empty gradients are skipped
    without state, count or launch."""
    opt = make("adam_defaults")
    cpu = make("adam_defaults")
    arrays = {"a": numpy.ones((2, 3), numpy.float32), "b": numpy.ones(4, numpy.float64),
              "empty": numpy.ones((0, 3), numpy.float32), "c": numpy.full(3, 2, numpy.float32)}
    w_dev = {k: fc.to_fake_device(v) for k, v in arrays.items()}
    for step in range(3):
        grads = {k: numpy.full(v.shape, 0.5 + step, v.dtype) for k, v in arrays.items()}
        before = len(device.launches)
        opt.step_many(list(arrays), list(w_dev.values()),
                      [fc.to_fake_device(x) for x in grads.values()])
        for k in arrays:
            cpu(k, arrays[k], grads[k].copy())
            assert_same(w_dev[k], arrays[k], f"{k} step {step}")
        assert sorted(device.launches[before:]) == sorted(
            [NORM_MANY, NORM_MANY, "optim_adam_avg_many", "optim_adam_avg_many"])
    assert "empty" not in opt.nr_update and "empty" not in opt.mom1
    assert "empty" not in opt.averages and device.moved_to_host == 0


def test_empty_gradient_is_a_no_op(device):
    opt = make("adam_defaults")
    w = fc.to_fake_device(numpy.ones((0, 4), numpy.float32))
    g = fc.to_fake_device(numpy.ones((0, 4), numpy.float32))
    assert opt("k", w, g) == (w, g)
    opt.step_many(["j"], [w], [g])
    assert not opt.nr_update and not opt.mom1 and not opt.averages and not device.launches


# ---------------------------------------------------------------- the lean per-call path


def test_per_call_path_reuses_its_plan(device):
    """After a key's first update, calls reuse one prepared launch (new array views are
    fine); replacing a state array makes a new plan, never a stale pointer."""
    opt, ref = make("adam_defaults"), make("adam_defaults")
    w_host = numpy.linspace(-1, 1, 12, dtype=numpy.float32).reshape(3, 4)
    w = fc.to_fake_device(w_host)
    for step in range(4):
        g = numpy.full((3, 4), 0.3 * (step + 1), numpy.float32)
        opt("k", w[...], fc.to_fake_device(g))
        ref("k", w_host, g.copy())
        if step == 0:
            plan = opt._dev.plans["k"]
        assert opt._dev.plans["k"] is plan
    assert_same(w, w_host, "after 4 steps")
    opt.mom1["k"] = fc.to_fake_device(ref.mom1["k"])  # a user replaces the state
    opt("k", w, fc.to_fake_device(numpy.ones((3, 4), numpy.float32)))
    ref("k", w_host, numpy.ones((3, 4), numpy.float32))
    assert opt._dev.plans["k"] is not plan and opt._dev.plans["k"].m is opt.mom1["k"]
    assert_same(w, w_host, "after the replaced state")
    assert device.launches.count(NORM) == 5 and device.moved_to_host == 0


def test_known_key_with_bad_arrays_is_an_error(device):
    opt = make("adam_defaults")
    w = fc.to_fake_device(numpy.ones((4, 4), numpy.float32))
    opt("k", w, fc.to_fake_device(numpy.ones((4, 4), numpy.float32)))
    launches, count, w_before = len(device.launches), opt.nr_update["k"], w.copy()
    with pytest.raises(TypeError, match="float64"):
        opt("k", w.astype(numpy.float64), fc.to_fake_device(numpy.ones((4, 4))))
    with pytest.raises(ValueError, match="shape"):
        opt("k", w.reshape(2, 8), fc.to_fake_device(numpy.ones((2, 8), numpy.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        opt("k", w.T, fc.to_fake_device(numpy.ones((4, 4), numpy.float32)).T)
    with pytest.raises(ValueError, match="lr_scale"):
        opt("k", w, fc.to_fake_device(numpy.ones((4, 4), numpy.float32)), lr_scale=-1.0)
    with pytest.raises(TypeError, match="float64"):
        opt.step_many(["k"], [w.astype(numpy.float64)],
                      [fc.to_fake_device(numpy.ones((4, 4)))])
    assert len(device.launches) == launches and opt.nr_update["k"] == count
    assert (w == w_before).all()


# ---------------------------------------------------------------- streams


def test_launches_follow_the_current_stream(device):
    """Kernels launch on CuPy's current stream (as PyTorch's stream is made current
    with cupy.cuda.ExternalStream); the clip norm's scratch memory is the key's own,
    whatever the stream; step_many's tables are rebuilt for another stream."""
    cuda = device.cupy.cuda
    opt = make("adam_defaults")
    w = fc.to_fake_device(numpy.ones(5000, numpy.float32))

    def grad():
        return fc.to_fake_device(numpy.full(5000, 0.5, numpy.float32))

    opt("k", w, grad())
    torch_stream = cuda.ExternalStream(0xABC0)  # torch.cuda.current_stream().cuda_stream
    with torch_stream:
        opt("k", w, grad())
        opt.step_many(["k"], [w], [grad()])
    with cuda.Stream() as other:
        opt("k", w, grad())
    streams = [s for _, s in device.cupy.launches]
    assert streams == [cuda.null] * 2 + [torch_stream] * 4 + [other] * 2
    plan = opt._dev.plans["k"]
    norm_args = [args for name, args in device.cupy.launch_args if name == NORM]
    assert len(norm_args) == 3 and all(a[5] == plan.workspace.partials.data.ptr
                                             for a in norm_args)
    with torch_stream:
        opt.step_many(["k"], [w], [grad()])
    before = device.moved_to_device
    opt.step_many(["k"], [w], [grad()])  # another stream: its own tables
    assert device.moved_to_device - before == 3
    assert device.moved_to_host == 0


def test_check_gpu_script_dry_run():
    """bin/check_gpu.py (for users with a GPU) runs end to end on the CPU harness."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "bin" / "check_gpu.py"
    # the optim of this checkout (an editable install may be another's)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, str(script), "--fake", "--size", "4500",
                          "--repeat", "1"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in list(kc.KERNELS) + ["optim_clip_norm", "step_many (48 tensors)"]:
        assert res.stdout.count(name + " ") == 2, name  # float32 and float64 rows
    assert res.stdout.count("bitwise") == 2
    assert res.stdout.count("ok (0 host reads)") == 2
    assert res.stdout.count("ok (fake stream)") == 2
    for line in ("graph                       float64    ok\n",
                 "threads: per-thread streams float32    ok (2 threads, the CPU's bits)",
                 "graph, then a bigger key    float64    ok (replayed after a bigger key",
                 "disturbed ticket            float32    ok (3 disturbances, 9 updates",
                 "groups                      float64    ok (8 tensors, 3 kinds, 2 frozen",
                 "skip (and raise)            float32    ok (per call and step_many: the "
                 "run without the bad calls; raise wrote nothing)"):
        assert line in res.stdout, line
    assert res.stdout.count(" ok (") == 2 * 7  # every check but "graph" says why
    assert "OK: worst error 0.00" in res.stdout  # bitwise equal to the Cython kernels


def test_deepcopy_of_a_device_optimizer(device):
    """A copy gets its own state and rebuilds its launches; both continue alike."""
    import copy

    opt = make("adam_defaults")
    w = fc.to_fake_device(numpy.linspace(-1, 1, 10, dtype=numpy.float32))
    opt("k", w, fc.to_fake_device(numpy.ones(10, numpy.float32)))
    opt.step_many(["k"], [w], [fc.to_fake_device(numpy.ones(10, numpy.float32))])
    twin = copy.deepcopy(opt)
    assert twin._dev is None and opt._dev.plans and opt._dev.tables
    assert twin.mom1["k"] is not opt.mom1["k"]
    w_twin = w.copy()
    for step in range(3):
        g = numpy.full(10, 0.2 * step, numpy.float32)
        opt("k", w, fc.to_fake_device(g))
        twin("k", w_twin, fc.to_fake_device(g))
    assert_same(w_twin, w.view(numpy.ndarray), "copy")
    assert twin._dev.plans["k"].m is twin.mom1["k"]


def test_device_host_loops():
    """optim.cuda._tables: the per-tensor checks of step_many's hot path."""
    from optim.cuda import _tables as _device

    a = fc.to_fake_device(numpy.ones((2, 3), numpy.float32))
    b = fc.to_fake_device(numpy.ones(4, numpy.float64))
    dtypes, shapes = [a.dtype, b.dtype], [(2, 3), (4,)]
    assert _device.array_pointers([a, b], dtypes, shapes, 0) == [a.data.ptr, b.data.ptr]
    assert _device.array_pointers([a[...], b], dtypes, shapes, 0) == [a.data.ptr, b.data.ptr]
    assert _device.array_pointers([b, a], dtypes, shapes, 0) is None  # dtype
    assert _device.array_pointers([a.reshape(3, 2), b], dtypes, shapes, 0) is None  # shape
    assert _device.array_pointers([a.T.copy().T, b], dtypes, shapes, 0) is None  # layout
    assert _device.array_pointers([a, b], dtypes, shapes, 1) is None  # device
    with pytest.raises(ValueError):
        _device.array_pointers([a], dtypes, shapes, 0)
    store = {"x": a, "y": b}
    assert _device.same_state(store, ["x", "y", "z"], [a, b, None])
    assert not _device.same_state(store, ["x", "y"], [a, a])
    assert not _device.same_state(store, ["z"], [a])
    assert not _device.same_state(store, ["x"], [a.copy()])  # equal values, other array
    assert not _device.same_state(store, ["x", "y"], [a])
