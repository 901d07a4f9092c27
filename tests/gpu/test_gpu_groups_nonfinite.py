"""Per-parameter groups and the non-finite skip on the device (issues 21 and 22), on the
emulated device of tests/fake_cupy.py.

Kernel level: step_many's launch with one Hyper per tensor (a coefficient row each:
learning rate, betas, eps, L2, grad_clip, decay, lookahead alpha, kind, frozen, the
nonfinite mode) against optim._kernels.step with each tensor's Hyper, bitwise; the
skip status the clip norm kernel decides (NaN, inf, an overflow that is not a skip).

Optimizer level (`Optimizer._hyper_for` replaced per optimizer, as groups do it): groups
share launches; frozen keys cost no launch and get no state; a skipped update is the
run without that call, bitwise, per call and in step_many, with no host read and no
extra launch when clipping (the update counts live on the device until `sync()`), with
windows of counts when the host runs ahead of the device; raise mode writes nothing.
"""
import shutil
import weakref
from typing import Any, Dict, List

import numpy
import pytest

import fake_cupy as fc
import optim
from optim import _kernels
from optim import _kernels_cuda as kc
from optim.cuda import updates as device_updates

NORM_MANY = "optim_clip_norm_many"
DTYPES = [numpy.float32, numpy.float64]

pytestmark = pytest.mark.skipif(
    not shutil.which("g++"), reason="g++ is not on PATH: cannot run the CUDA kernel "
    "strings on the host"
)

# ---------------------------------------------------------------- helpers

GROUPS: "weakref.WeakKeyDictionary[Any, Dict[Any, Any]]" = weakref.WeakKeyDictionary()


@pytest.fixture
def groups(monkeypatch):
    """groups(opt, {key: Hyper}): `opt._hyper_for(key)` gives the key's Hyper (others:
    the optimizer's), as the optimizer's groups do."""
    def hyper_for(self: Any, key: Any) -> Any:
        table = GROUPS.get(self)
        return self._hyper if table is None else table.get(key, self._hyper)

    monkeypatch.setattr(optim.Optimizer, "_hyper_for", hyper_for)

    def install(opt: Any, table: Dict[Any, Any]) -> Any:
        GROUPS[opt] = table
        opt._cpu.forget()
        return opt

    return install


def host(x: Any) -> numpy.ndarray:
    return numpy.asarray(x).view(numpy.ndarray)


def assert_bits(got: Any, want: numpy.ndarray, what: str) -> None:
    got = host(got)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bits = numpy.dtype(f"u{want.dtype.itemsize}")
    assert numpy.array_equal(got.view(bits), want.view(bits)), what


def with_values(hyper: Any, **values: Any) -> Any:
    other = hyper.copy()
    for name, value in values.items():
        setattr(other, name, value)
    return other


def state_of(opt: Any, key: Any) -> Dict[str, Any]:
    out = {"mom1": opt.mom1.get(key), "mom2": opt.mom2.get(key),
           "slow": opt.lookahead.get(key)}
    if opt.averages is not None:
        out["average"] = opt.averages.get(key)
    return {k: v for k, v in out.items() if v is not None}


def assert_same_run(dev: Any, cpu: Any, w_dev: List[Any], w_cpu: List[numpy.ndarray],
                    keys: List[Any], what: str) -> None:
    for k, key in enumerate(keys):
        assert_bits(w_dev[k], w_cpu[k], f"{what}: key {key} weights")
        got, want = state_of(dev, key), state_of(cpu, key)
        assert sorted(got) == sorted(want), (what, key)
        for name, array in want.items():
            assert_bits(got[name], array, f"{what}: key {key} {name}")


def hyper(kind: str = "adam", **values: Any) -> Any:
    h = _kernels.Hyper()
    h.learn_rate, h.eps, h.grad_clip = 0.01, 1e-8, 0.0
    h.beta1, h.beta2 = (0.0, 0.0) if kind == "sgd" else (0.9, 0.999)
    h.use_radam = kind == "radam"
    for name, value in values.items():
        setattr(h, name, value)
    return h


ARRAYS = ("w", "g", "m", "v", "avg", "slow")


def arrays_for(n: int, dtype: Any, rng: Any, lookahead: bool) -> Dict[str, numpy.ndarray]:
    out = {a: rng.standard_normal(n).astype(dtype) for a in ("w", "g", "m", "v", "avg")}
    out["v"] = out["v"] ** 2
    if lookahead:
        out["slow"] = rng.standard_normal(n).astype(dtype)
    return out


def launch_many(backend: Any, hypers: List[Any], host_arrays: List[Dict[str, Any]],
                counts: List[int], averages: bool = True, batches: Any = None):
    """backend.launch_many on device copies of `host_arrays` with one Hyper per tensor;
    returns (device arrays, batches, launches)."""
    dev = [{a: fc.to_fake_device(x) for a, x in arrays.items()} for arrays in host_arrays]
    plans = [backend.plan(i, h.kind, averages, d["w"],
                          None if h.frozen else d.get("m"), None if h.frozen else d.get("v"),
                          None if h.frozen else d.get("avg"),
                          None if h.frozen else d.get("slow"), frozen=h.frozen)
             for i, (h, d) in enumerate(zip(hypers, dev))]
    batches = {} if batches is None else batches
    before = len(backend.launches)
    backend.launch_many(batches, hypers, list(range(len(dev))), [d["w"] for d in dev],
                        [d["g"] for d in dev], plans, counts, 0.8)
    return dev, batches, backend.launches[before:]


def cpu_step(h: Any, arrays: Dict[str, numpy.ndarray], t: int, averages: bool = True) -> int:
    return _kernels.step(h, "k", arrays["w"], arrays["g"], arrays.get("m"), arrays.get("v"),
                         arrays.get("avg") if averages else None, arrays.get("slow"), t, 0.8)


BACKEND = fc.HarnessBackend(block=64, max_grid=2)


# ---------------------------------------------------------------- kernel level


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_rows_with_their_own_hyperparameters_share_one_launch(dtype):
    """Tensors whose Hypers differ in every value (grad_clip included, some clipped and
    some not) but not in kind: one clip norm and one update launch, each tensor
    bitwise the CPU kernel's with its own Hyper."""
    base = hyper("adam")
    hypers = [
        with_values(base, learn_rate=0.01, grad_clip=1.0),
        with_values(base, learn_rate=0.003, beta1=0.8, beta2=0.99, eps=1e-6, grad_clip=0.5),
        with_values(base, L2=0.01, grad_clip=0.0),
        with_values(base, L2=0.02, L2_is_weight_decay=True, grad_clip=50.0),
        with_values(base, learn_rate=0.2, eps=1e-3, grad_clip=0.1, L2=1e-3),
    ]
    rng = numpy.random.default_rng(1)
    sizes = [300, 4097, 17, 2 * 4096 + 5, 1]
    cpu = [arrays_for(n, dtype, rng, False) for n in sizes]
    dev, _, launched = launch_many(BACKEND, hypers, cpu, [3, 1, 7, 2, 5])
    assert launched == [NORM_MANY, "optim_adam_avg_many"]
    for i, (h, c, t) in enumerate(zip(hypers, cpu, [3, 1, 7, 2, 5])):
        cpu_step(h, c, t)
        for a in c:
            assert_bits(dev[i][a], c[a], f"tensor {i} {a}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_rows_of_other_kinds_and_frozen_rows(dtype):
    """SGD, Adam and RAdam rows in one call: a launch group per kernel, each bitwise the
    CPU's; frozen rows join a group: only their gradient is zeroed, no launch more."""
    base = hyper("adam", grad_clip=1.0)
    hypers = [base, with_values(base, beta1=0.0, beta2=0.0, learn_rate=0.1),
              with_values(base, use_radam=True, beta2=0.9, weight_decay=0.01),
              with_values(base, frozen=True), with_values(base, beta1=0.0, beta2=0.0,
                                                          frozen=True)]
    rng = numpy.random.default_rng(2)
    sizes = [500, 4100, 300, 4097, 33]
    cpu = [arrays_for(n, dtype, rng, False) for n in sizes]
    before = [{a: x.copy() for a, x in c.items()} for c in cpu]
    counts = [4, 4, 8, 4, 4]
    dev, _, launched = launch_many(BACKEND, hypers, cpu, counts)
    assert sorted(launched) == sorted([NORM_MANY] * 3 + [
        "optim_adam_avg_many", "optim_sgd_avg_many", "optim_radam_rect_avg_many"])
    for i, (h, c, t) in enumerate(zip(hypers, cpu, counts)):
        if h.frozen:
            assert not host(dev[i]["g"]).any(), "a frozen gradient is zeroed"
            for a in ("w", "m", "v", "avg"):
                assert_bits(dev[i][a], before[i][a], f"frozen tensor {i} {a}")
            continue
        cpu_step(h, c, t)
        for a in (("w", "g", "avg") if h.kind == "sgd" else ("w", "g", "m", "v", "avg")):
            assert_bits(dev[i][a], c[a], f"tensor {i} {a}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("kind", ["sgd", "adam", "radam"])
def test_the_skip_status_is_the_cpus(dtype, kind):
    """Skip mode, kernel level: a NaN in one tensor, an inf in another (coupled L2: an
    inf weight makes an inf term), NaN and inf together, a float64 sum of squares that
    overflows on finite terms (not a skip), clean tensors, clipped and not. Statuses
    are the CPU's outcomes; skipped tensors keep every array but their zeroed gradient;
    the others are the CPU's update, bitwise."""
    rng = numpy.random.default_rng(3)
    base = hyper(kind, nonfinite=1, grad_clip=1.0, beta2=0.99 if kind == "radam" else 0.999)
    sizes = [4097, 300, 2 * 4096 + 7, 9000, 50, 4096]
    cpu = [arrays_for(n, dtype, rng, False) for n in sizes]
    cpu[0]["g"][4096] = numpy.nan
    cpu[1]["w"][3] = numpy.inf  # with coupled L2 below: the term is inf
    cpu[2]["g"][5] = numpy.inf
    cpu[2]["g"][4096 + 9] = numpy.nan
    big = 1e200 if dtype is numpy.float64 else 1e30
    cpu[3]["g"][:] = big  # float64: the squares overflow; no term is inf
    hypers = [base, with_values(base, L2=0.01), with_values(base, grad_clip=0.0), base,
              with_values(base, grad_clip=0.0), base]
    before = [{a: x.copy() for a, x in c.items()} for c in cpu]
    counts = [9] * len(sizes)
    dev, batches, launched = launch_many(BACKEND, hypers, cpu, counts)
    assert launched[0] == NORM_MANY and len(launched) == 2
    statuses = host(batches[numpy.dtype(dtype).name].statuses)
    outcomes = [cpu_step(h, c, 9) for h, c in zip(hypers, cpu)]
    assert outcomes == [1, 2, 1, 0, 0, 0]
    want = {0: kc.GO, 1: kc.NAN, 2: kc.INF}
    assert [want[o] for o in outcomes] == list(statuses)
    for i, (c, o) in enumerate(zip(cpu, outcomes)):
        for a in c:
            assert_bits(dev[i][a], c[a], f"tensor {i} {a}")
        if o:
            assert not host(dev[i]["g"]).any()
            for a in ("w", "m", "v", "avg"):
                assert_bits(dev[i][a], before[i][a], f"skipped tensor {i} {a}")
    if dtype is numpy.float64:
        assert not numpy.isfinite(_kernels.clip_sum_squares(before[3]["g"], before[3]["w"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_raise_mode_reads_back_and_writes_nothing(dtype):
    """Raise mode at kernel level: the statuses are read back (one host read) before
    any update; a refused tensor stops the whole call with nothing written."""
    rng = numpy.random.default_rng(4)
    base = hyper("adam", nonfinite=2, grad_clip=1.0)
    cpu = [arrays_for(n, dtype, rng, False) for n in (300, 5000)]
    cpu[1]["g"][4500] = numpy.inf
    dev = [{a: fc.to_fake_device(x) for a, x in c.items()} for c in cpu]
    plans = [BACKEND.plan(i, "adam", True, d["w"], d["m"], d["v"], d["avg"], None)
             for i, d in enumerate(dev)]
    refused = []
    reads, launches = BACKEND.moved_to_host, len(BACKEND.launches)
    with pytest.raises(FloatingPointError, match="key 1: the gradient holds an infinity"):
        BACKEND.launch_many({}, [base, base], [0, 1], [d["w"] for d in dev],
                            [d["g"] for d in dev], plans, [2, 2], 1.0,
                            on_refused=lambda i, outcome: refused.append((i, outcome)))
    assert refused == [(1, 2)]
    assert BACKEND.moved_to_host - reads == 1
    assert BACKEND.launches[launches:] == [NORM_MANY]
    for c, d in zip(cpu, dev):
        for a in c:
            assert_bits(d[a], c[a], f"{a} untouched")


# ---------------------------------------------------------------- the optimizer: groups


def gradient_steps(shapes, dtype, steps, seed):
    rng = numpy.random.default_rng(seed)
    return [[(rng.standard_normal(s) * 0.8).astype(dtype) for s in shapes]
            for _ in range(steps)]


SHAPES = [(3, 4), (4097,), (7,), (2, 4096), (300,), (1,)]


@pytest.mark.parametrize("factory", ["SGD", "Adam"])
def test_groups_share_the_launch_of_one_group(use, groups, factory):
    """Two groups (another learning rate, another grad_clip, one unclipped) in one
    step_many: bitwise the separate optimizers of each group's settings, and the
    launches and transfers of a single group (one clip norm, one update per step)."""
    dev = use(fc.HarnessBackend())
    dtype = numpy.float32
    kwargs = dict(learn_rate=0.05, grad_clip=1.0, use_averages=True)
    make = getattr(optim, factory)
    opt = make(**kwargs)
    a, b = opt._hyper.copy(), opt._hyper.copy()
    b.learn_rate, b.grad_clip, b.L2 = 0.01, 0.5, 1e-3
    c = with_values(opt._hyper, grad_clip=0.0)
    keys = list(range(len(SHAPES)))
    table = {0: a, 1: a, 2: b, 3: b, 4: c, 5: c}
    groups(opt, table)
    refs = {id(a): make(**kwargs), id(b): make(**{**kwargs, "learn_rate": 0.01,
                                                 "grad_clip": 0.5, "L2": 1e-3}),
            id(c): make(**{**kwargs, "grad_clip": 0.0})}
    single = make(**kwargs)  # one group: the launches to match
    rng = numpy.random.default_rng(5)
    w_cpu = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    w_dev = [fc.to_fake_device(w) for w in w_cpu]
    w_single = [fc.to_fake_device(w) for w in w_cpu]
    g_dev = [fc.to_fake_device(numpy.zeros(s, dtype)) for s in SHAPES]
    for step, grads in enumerate(gradient_steps(SHAPES, dtype, 4, 6)):
        for k, g in enumerate(grads):
            refs[id(table[k])](k, w_cpu[k], g.copy())
            g_dev[k].view(numpy.ndarray)[...] = g
        before = (len(dev.launches), dev.moved_to_host, dev.moved_to_device)
        opt.step_many(keys, w_dev, g_dev)
        mine = (dev.launches[before[0]:], dev.moved_to_host - before[1],
                dev.moved_to_device - before[2])
        before = (len(dev.launches), dev.moved_to_host, dev.moved_to_device)
        single.step_many(keys, w_single, [fc.to_fake_device(g) for g in grads])
        theirs = (dev.launches[before[0]:], dev.moved_to_host - before[1],
                  dev.moved_to_device - before[2])
        assert mine[0] == theirs[0] == [NORM_MANY, f"optim_{factory.lower()}_avg_many"]
        assert mine[1] == 0 and (step == 0 or mine[2] == 1), mine
        for k in keys:
            ref = refs[id(table[k])]
            assert_same_run(opt, ref, [w_dev[k]], [w_cpu[k]], [k], f"step {step}")
            assert not host(g_dev[k]).any()
    assert dict(opt.nr_update) == {k: 4 for k in keys}


def test_a_group_of_another_kind_is_another_launch_group(use, groups):
    """An SGD-kind group (beta1 = beta2 = 0) in an Adam optimizer: its tensors run the
    SGD kernel in a launch group of their own (a kernel is chosen per group of the
    same dtype and kernel), with the bits of an SGD optimizer."""
    dev = use(fc.HarnessBackend())
    dtype = numpy.float64
    opt = optim.Adam(0.01)
    sgd = with_values(opt._hyper, beta1=0.0, beta2=0.0, learn_rate=0.1)
    groups(opt, {2: sgd, 3: sgd})
    cpu_adam, cpu_sgd = optim.Adam(0.01), optim.SGD(0.1, use_averages=True, grad_clip=1.0)
    keys = list(range(len(SHAPES)))
    rng = numpy.random.default_rng(7)
    w_cpu = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    w_dev = [fc.to_fake_device(w) for w in w_cpu]
    for step, grads in enumerate(gradient_steps(SHAPES, dtype, 3, 8)):
        for k, g in enumerate(grads):
            (cpu_sgd if k in (2, 3) else cpu_adam)(k, w_cpu[k], g.copy())
        before = len(dev.launches)
        opt.step_many(keys, w_dev, [fc.to_fake_device(g) for g in grads])
        assert sorted(dev.launches[before:]) == sorted(
            [NORM_MANY, NORM_MANY, "optim_adam_avg_many", "optim_sgd_avg_many"])
        for k in keys:
            assert_bits(w_dev[k], w_cpu[k], f"step {step} key {k}")
            ref = cpu_sgd if k in (2, 3) else cpu_adam
            assert_bits(opt.averages[k], ref.averages[k], f"step {step} key {k} average")


def test_frozen_keys_cost_no_launch_and_get_no_state(use, groups):
    """Frozen keys in step_many: weights untouched, gradient zeroed, no state, no count,
    no launch more than the call without them; per call: one fill, no launch."""
    dev = use(fc.HarnessBackend())
    dtype = numpy.float32
    opt, ref = optim.Adam(0.01), optim.Adam(0.01)
    frozen = with_values(opt._hyper, frozen=True)
    groups(opt, {1: frozen, 4: frozen})
    keys = list(range(len(SHAPES)))
    live = [k for k in keys if k not in (1, 4)]
    rng = numpy.random.default_rng(9)
    w0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    w_cpu = [w.copy() for w in w0]
    w_dev = [fc.to_fake_device(w) for w in w0]
    for step, grads in enumerate(gradient_steps(SHAPES, dtype, 3, 10)):
        g_dev = [fc.to_fake_device(g) for g in grads]
        for k in live:
            ref(k, w_cpu[k], grads[k].copy())
        before = len(dev.launches)
        opt.step_many(keys, w_dev, g_dev)
        assert dev.launches[before:] == [NORM_MANY, "optim_adam_avg_many"]  # as without
        for k in keys:
            assert not host(g_dev[k]).any(), "every gradient is zeroed"
            want = w0[k] if k in (1, 4) else w_cpu[k]
            assert_bits(w_dev[k], want, f"step {step} key {k}")
    for k in (1, 4):
        assert k not in opt.mom1 and k not in opt.averages and k not in opt.nr_update
    assert dict(opt.nr_update) == {k: 3 for k in live}
    # a call of only frozen keys: one launch zeroes them all
    g = [fc.to_fake_device(numpy.ones(SHAPES[k], dtype)) for k in (1, 4)]
    before = len(dev.launches)
    opt.step_many([1, 4], [w_dev[1], w_dev[4]], g)
    assert dev.launches[before:] == ["optim_sgd_many"]
    assert not host(g[0]).any() and not host(g[1]).any()
    # per call: the gradient zeroed (a fill), no launch, no state
    g1 = fc.to_fake_device(numpy.ones(SHAPES[1], dtype))
    before = len(dev.launches)
    opt(1, w_dev[1], g1)
    assert dev.launches[before:] == [] and not host(g1).any()
    assert_bits(w_dev[1], w0[1], "per call")
    assert 1 not in opt.mom1 and 1 not in opt.nr_update


# ---------------------------------------------------------------- the optimizer: skip

SKIP_SHAPES = [(4097,), (300,), (2, 4096), (33,)]
STEPS = 7
BAD = {(2, 1): numpy.nan, (5, 2): numpy.inf}  # (step, key): the value put in one element


def skip_run(dev: Any, make: Any, how: str, dtype: Any, run_at_end: bool = False):
    """The same steps through a CPU optimizer in apply mode that omits the bad calls
    and a device optimizer in skip mode that makes them. Returns (device optimizer, its
    weights, the CPU optimizer, its weights, per-step (launches, reads, writes))."""
    cpu, opt = make(), make()
    opt.nonfinite = "skip"
    keys = list(range(len(SKIP_SHAPES)))
    rng = numpy.random.default_rng(11)
    w_cpu = [rng.standard_normal(s).astype(dtype) for s in SKIP_SHAPES]
    w_dev = [fc.to_fake_device(w) for w in w_cpu]
    g_dev = [fc.to_fake_device(numpy.zeros(s, dtype)) for s in SKIP_SHAPES]
    per_step, kept = [], []
    for step, grads in enumerate(gradient_steps(SKIP_SHAPES, dtype, STEPS, 12)):
        for k, g in enumerate(grads):
            bad = BAD.get((step, k))
            if bad is None:
                cpu(k, w_cpu[k], g.copy())
            else:
                g = g.copy()
                g.reshape(-1)[g.size // 2] = bad
            if run_at_end:  # the host must not write memory queued work still reads,
                g_dev[k] = fc.to_fake_device(g)  # nor free it (the tables' pointers)
                kept.append(g_dev[k])
            else:
                g_dev[k].view(numpy.ndarray)[...] = g
        before = (len(dev.launches), dev.moved_to_host, dev.moved_to_device)
        if how == "call":
            for k in keys:
                opt(k, w_dev[k], g_dev[k])
        else:
            opt.step_many(keys, w_dev, g_dev)
        per_step.append((dev.launches[before[0]:], dev.moved_to_host - before[1],
                         dev.moved_to_device - before[2]))
        if not run_at_end:
            assert all(not host(g).any() for g in g_dev), "gradients are zeroed"
    if run_at_end:
        dev.cupy.run()
    return opt, w_dev, cpu, w_cpu, per_step


MAKERS = {
    "adam_clip_avg": lambda: optim.Adam(0.01),  # Thinc's defaults: clipping, averages
    "adam_clip_avg_la": lambda: optim.Adam(0.01, lookahead_k=2, L2=1e-3),
    "sgd": lambda: optim.SGD(0.1, grad_clip=0.0, use_averages=True),
    "radam": lambda: optim.RAdam(0.01, beta2=0.9, grad_clip=0.5, use_averages=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("how", ["call", "step_many"])
@pytest.mark.parametrize("config", sorted(MAKERS))
def test_a_skipped_update_is_the_run_without_that_call(use, config, how, dtype):
    """A NaN in one element of one gradient at one step, an inf in another key's later:
    every array bitwise that of a run that omitted exactly those two calls; no host
    read; a clipped update launches what it launches in apply mode (an unclipped one
    adds the norm); after sync() the counts and skip counts are right."""
    dev = use(fc.HarnessBackend())
    opt, w_dev, cpu, w_cpu, per_step = skip_run(dev, MAKERS[config], how, dtype)
    keys = list(range(len(SKIP_SHAPES)))
    assert_same_run(opt, cpu, w_dev, w_cpu, keys, f"{config} {how}")
    for step, (launches, reads, writes) in enumerate(per_step):
        assert reads == 0, f"step {step} read from the device"
        norms = launches.count(NORM_MANY)
        updates = len(launches) - norms
        # per call: one norm (it decides the skip) and one update per key; step_many:
        # one of each per launch group (keys whose counts run another kernel - a
        # lookahead sync step, RAdam's rectification - are another group, as in apply
        # mode). The host reads each launch's verdicts at the next: windows of one row.
        groups = len(keys) if how == "call" else len(set(launches) - {NORM_MANY})
        assert norms == updates == groups, (step, launches)

    assert opt.skipped == {1: 1, 2: 1}
    assert dict(opt.nr_update) == dict(cpu.nr_update) == {0: STEPS, 1: STEPS - 1,
                                                          2: STEPS - 1, 3: STEPS}
    assert opt.skipped_total == 2 and dev.moved_to_host == 0
    assert_same_run(opt, cpu, w_dev, w_cpu, keys, "after sync")


@pytest.mark.parametrize("how", ["call", "step_many"])
def test_the_host_running_ahead_uploads_windows(use, how, monkeypatch):
    """The device runs nothing until the end (deferred): no verdict is known at any
    call, so each update uploads the rows of every count its key may be at, and the
    device picks its own (lookahead sync steps run another kernel: a second update
    launch when the window spans both). A window of MAX_WINDOW rows waits for the
    oldest launch (the one sync). Bitwise the run without the bad calls."""
    monkeypatch.setattr(device_updates, "MAX_WINDOW", 4)
    dev = use(fc.HarnessBackend(deferred=True))
    make = MAKERS["adam_clip_avg_la"]
    opt, w_dev, cpu, w_cpu, per_step = skip_run(dev, make, how, numpy.float32,
                                                run_at_end=True)
    assert_same_run(opt, cpu, w_dev, w_cpu, list(range(len(SKIP_SHAPES))), how)
    calls = len(SKIP_SHAPES) if how == "call" else 1
    kernels = [len(launches) - launches.count(NORM_MANY) for launches, _, _ in per_step]
    assert kernels[0] == calls and max(kernels) == 2 * calls, kernels
    assert dev.cupy.syncs > 0, "windows of 4 rows waited"
    assert all(reads == 0 for _, reads, _ in per_step)
    assert opt.skipped == {1: 1, 2: 1}
    assert dict(opt.nr_update) == dict(cpu.nr_update)


def test_skip_mode_costs_are_counted(use):
    """Per call and step_many, clipped and not, after the first update: launches, host
    reads, host writes, queued copies of the verdicts into pinned memory."""
    dev = use(fc.HarnessBackend())
    dtype = numpy.float32
    costs = {}
    for mode in ("apply", "skip"):
        for clip in (1.0, 0.0):
            opt = optim.Adam(0.01, grad_clip=clip, nonfinite=mode)
            w = [fc.to_fake_device(numpy.ones(5000, dtype)) for _ in range(2)]
            g = [fc.to_fake_device(numpy.full(5000, 0.5, dtype)) for _ in range(2)]
            for how in ("call", "step_many"):
                for _ in range(2):  # first updates: state, tables
                    opt(0, w[0], g[0]) if how == "call" else opt.step_many([0, 1], w, g)
                before = (len(dev.launches), dev.moved_to_host, dev.moved_to_device,
                          dev.async_to_host)
                opt(0, w[0], g[0]) if how == "call" else opt.step_many([0, 1], w, g)
                after = (len(dev.launches), dev.moved_to_host, dev.moved_to_device,
                         dev.async_to_host)
                costs[mode, clip > 0, how] = tuple(a - b for a, b in zip(after, before))
    # (launches, host reads, host writes, queued verdict copies)
    assert costs == {
        ("apply", True, "call"): (2, 0, 0, 0), ("apply", False, "call"): (1, 0, 0, 0),
        ("apply", True, "step_many"): (2, 0, 1, 0), ("apply", False, "step_many"): (1, 0, 1, 0),
        ("skip", True, "call"): (2, 0, 1, 1), ("skip", False, "call"): (2, 0, 1, 1),
        ("skip", True, "step_many"): (2, 0, 1, 1), ("skip", False, "step_many"): (2, 0, 1, 1),
    }, costs


# ---------------------------------------------------------------- the optimizer: raise


@pytest.mark.parametrize("how", ["call", "step_many"])
def test_raise_mode_raises_before_anything_is_written(use, how):
    dev = use(fc.HarnessBackend())
    dtype = numpy.float32
    opt = optim.Adam(0.01, nonfinite="raise")
    keys = [0, 1, 2]
    rng = numpy.random.default_rng(13)
    w = [fc.to_fake_device(rng.standard_normal(n).astype(dtype)) for n in (300, 5000, 7)]
    g = [fc.to_fake_device(numpy.full(x.shape, 0.5, dtype)) for x in w]
    opt.step_many(keys, w, g)  # state, tables
    snapshot = {k: {**{n: host(a).copy() for n, a in state_of(opt, k).items()},
                    "w": host(w[k]).copy()} for k in keys}
    grads = [rng.standard_normal(x.shape).astype(dtype) for x in w]
    grads[1][4321] = numpy.nan
    g = [fc.to_fake_device(x) for x in grads]
    reads = dev.moved_to_host
    with pytest.raises(optim.NonFiniteError, match="key 1.*a NaN.*nothing was"):
        if how == "call":
            opt(0, w[0], g[0])
            snapshot[0] = None
            opt(1, w[1], g[1])
        else:
            opt.step_many(keys, w, g)
    assert dev.moved_to_host > reads, "raise mode reads the verdict back"
    for k in keys:
        if snapshot[k] is None:
            continue
        assert_bits(w[k], snapshot[k]["w"], f"key {k} weights")
        assert_bits(g[k], grads[k], f"key {k} gradient")
        for name, array in state_of(opt, k).items():
            assert_bits(array, snapshot[k][name], f"key {k} {name}")
    assert opt.nr_update[1] == 1


def test_raise_and_skip_groups_in_one_step_many(use, groups):
    """A skip-mode group and a raise-mode group in one step_many: a NaN in the raise
    group refuses the whole call before anything is written (the raise group's check
    runs first, without moving the skip group's device counts); a NaN in the skip
    group skips that key only. Bitwise the CPU run of the calls that were kept."""
    dev = use(fc.HarnessBackend())
    dtype = numpy.float32
    opt, cpu = optim.Adam(0.01), optim.Adam(0.01)
    skip, refuse = with_values(opt._hyper, nonfinite=1), with_values(opt._hyper, nonfinite=2)
    groups(opt, {0: skip, 1: skip, 2: refuse})
    keys = [0, 1, 2]
    rng = numpy.random.default_rng(14)
    w_cpu = [rng.standard_normal(n).astype(dtype) for n in (300, 5000, 4097)]
    w_dev = [fc.to_fake_device(w) for w in w_cpu]
    for step in range(6):
        grads = [rng.standard_normal(w.shape).astype(dtype) for w in w_cpu]
        g_dev = [fc.to_fake_device(g) for g in grads]
        if step == 2:  # the raise group refuses: nothing of the call happens
            g_dev[2].view(numpy.ndarray)[7] = numpy.nan
            launched, reads = len(dev.launches), dev.moved_to_host
            with pytest.raises(optim.NonFiniteError, match="key 2"):
                opt.step_many(keys, w_dev, g_dev)
            assert host(g_dev[0]).any(), "not even a gradient is zeroed"
            assert set(dev.launches[launched:]) == {NORM_MANY}, "only the check ran"
            assert dev.moved_to_host == reads + 1, "its verdict was read back"
            continue
        if step == 4:  # the skip group skips key 1 only
            g_dev[1].view(numpy.ndarray)[7] = numpy.inf
        for k in keys:
            if not (step == 4 and k == 1):
                cpu(k, w_cpu[k], grads[k].copy())
        opt.step_many(keys, w_dev, g_dev)
        assert_same_run(opt, cpu, w_dev, w_cpu, keys, f"step {step}")
    assert opt.skipped == {1: 1}
    assert dict(opt.nr_update) == dict(cpu.nr_update) == {0: 5, 1: 4, 2: 5}


@pytest.mark.parametrize("how", ["call", "step_many"])
@pytest.mark.parametrize("mode", ["apply", "skip"])
def test_the_optimizers_groups_on_the_device_are_the_cpus(use, how, mode):
    """The optimizer's own groups (`groups=`, `bind`): a group with other settings and
    no clipping, an SGD-kind group, a frozen group; nonfinite apply or skip, with a NaN
    and an inf put in gradients: the device optimizer and the CPU optimizer with the
    same settings give the same bits, counts and skip counts."""
    dev = use(fc.HarnessBackend())
    assert dev.launches == []
    dtype = numpy.float32
    spec = [{"match": "fast/*", "learn_rate": 0.05, "grad_clip": 0.0, "L2": 1e-3},
            {"match": "plain/*", "beta1": 0.0, "beta2": 0.0, "learn_rate": 0.1},
            {"match": "frozen/*", "frozen": True}]
    keys = [(0, "W"), (1, "W"), (2, "W"), (3, "W"), (4, "W")]
    paths = dict(zip(keys, ["fast/a", "fast/b", "plain/c", "frozen/d", "other/e"]))
    make = lambda: optim.Adam(0.01, groups=spec, nonfinite=mode,  # noqa: E731
                              lookahead_k=2).bind(paths)
    cpu, gpu = make(), make()
    rng = numpy.random.default_rng(15)
    sizes = [300, 4097, 50, 700, 5000]
    w_cpu = [rng.standard_normal(n).astype(dtype) for n in sizes]
    w_dev = [fc.to_fake_device(w) for w in w_cpu]
    bad = {(2, 0): numpy.nan, (3, 4): numpy.inf, (4, 2): numpy.nan, (5, 3): numpy.nan}
    for step in range(7):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        for (s, k), value in bad.items():
            if s == step and mode == "skip":
                grads[k][n_mid(grads[k])] = value
        g_dev = [fc.to_fake_device(g) for g in grads]
        before = (len(dev.launches), dev.moved_to_host)
        if how == "call":
            for k, key in enumerate(keys):
                cpu(key, w_cpu[k], grads[k].copy())
                gpu(key, w_dev[k], g_dev[k])
        else:
            cpu.step_many(keys, w_cpu, [g.copy() for g in grads])
            gpu.step_many(keys, w_dev, g_dev)
            launches = dev.launches[before[0]:]
            # Adam keys (+ lookahead sync steps) and the SGD group: two launch groups
            # at most per kernel set, each with its norm; the frozen key costs nothing
            assert len(launches) <= 4 + 2 * (mode == "skip"), launches
        assert dev.moved_to_host == before[1]
        assert all(not host(g).any() for g in g_dev)
        for o in (cpu, gpu):
            o.step_schedules()
    assert_same_run(gpu, cpu, w_dev, w_cpu, keys, f"{mode} {how}")
    assert gpu.skipped == cpu.skipped
    assert dict(gpu.nr_update) == dict(cpu.nr_update)
    assert (3, "W") not in gpu.mom1 and (3, "W") not in gpu.nr_update
    if mode == "skip":
        assert gpu.skipped == {(0, "W"): 1, (4, "W"): 1, (2, "W"): 1}


def n_mid(x: numpy.ndarray) -> int:
    return x.size // 2
