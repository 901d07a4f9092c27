"""Same bits at every SIMD level and thread count (docs/cpu.md), and the CPU settings.

Each configuration replays the same updates from the same seed (single calls and
step_many, every optimizer option the reference tests draw); every array after every
call must be bit-for-bit the one the baseline level on one thread gives.
"""
import contextlib
import os

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import clip_sum_squares
from children import needs_mprotect, run_python, run_unreadable
from test_reference import hyperparams, shapes

import optim
from optim import Optimizer, _kernels, cpu
from optim.cpu import _batch
from optim.bench._roofline import Plan

LEVELS = cpu.available_isas()
BLOCK = _kernels.THREAD_PIECE_MIN  # a tensor of >= 2 * BLOCK elements is split
CHUNK = _kernels.NORM_ORDER["chunk"]
THREAD_COUNTS = (2, 3)


@contextlib.contextmanager
def cpu_settings(isa: str, threads: int):
    saved = (_kernels.isa(), optim.get_num_threads())
    cpu._set_isa(isa)
    optim.set_num_threads(threads)
    try:
        yield
    finally:
        cpu._set_isa(saved[0])
        optim.set_num_threads(saved[1])


def trace(hp, specs, n_rounds, seed, gscale, isa, threads):
    """Run the updates under (isa, threads); every array's bytes after every round."""
    rng = numpy.random.default_rng(seed)
    keys = [key for key, _, _ in specs]
    weights = {key: (rng.standard_normal(shape) * rng.choice([1e-2, 1.0, 3.0])).astype(dtype)
               for key, shape, dtype in specs}
    rounds = []
    with cpu_settings(isa, threads):
        opt = Optimizer(**hp)
        for _ in range(n_rounds):
            grads = {key: (rng.standard_normal(shape) * gscale).astype(dtype)
                     for key, shape, dtype in specs}
            s = float(rng.choice([1.0, 0.5, 2.0]))
            if rng.random() < 0.5:
                opt.step_many(keys, [weights[k] for k in keys], [grads[k] for k in keys],
                              lr_scale=s)
            else:
                for key in keys:
                    opt(key, weights[key], grads[key], lr_scale=s)
            state = [weights[k].tobytes() + grads[k].tobytes() for k in keys]
            for store in (opt.mom1, opt.mom2, opt.averages or {}, opt.lookahead):
                state += [store[k].tobytes() for k in keys if k in store]
            rounds.append(state)
    return rounds


def assert_same_bits(got, expected, what):
    assert len(got) == len(expected)
    for r, (a, b) in enumerate(zip(got, expected)):
        assert len(a) == len(b), f"{what}: round {r} holds different arrays"
        for i, (x, y) in enumerate(zip(a, b)):
            assert x == y, f"{what}: round {r}, array {i} differs"


def multi_chunk_shapes():
    """The reference tests' shapes, plus tensors of several norm chunks."""
    return shapes() | st.integers(CHUNK - 3, 6 * CHUNK + 5).map(lambda n: (n,))


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs only the baseline level")
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    hp=hyperparams(),
    shapes_=st.lists(multi_chunk_shapes(), min_size=1, max_size=3),
    dtypes=st.lists(st.sampled_from(["float32", "float64"]), min_size=3, max_size=3),
    n_rounds=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    gscale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
)
def test_every_simd_level_gives_the_baseline_bits(hp, shapes_, dtypes, n_rounds, seed, gscale):
    specs = [((i, "W"), sh, dtypes[i]) for i, sh in enumerate(shapes_)]
    expected = trace(hp, specs, n_rounds, seed, gscale, "baseline", 1)
    for level in LEVELS[1:]:
        assert_same_bits(trace(hp, specs, n_rounds, seed, gscale, level, 1), expected, level)


@st.composite
def threaded_specs(draw):
    """A tensor that threads split (near the block and chunk boundaries), and some
    whose step_many batch is dealt to threads."""
    dtype = draw(st.sampled_from(["float32", "float64"]))
    big = draw(st.sampled_from([2 * BLOCK - 1, 2 * BLOCK, 3 * BLOCK + 7, 5 * BLOCK - CHUNK + 1]))
    small = draw(st.lists(st.integers(1, 3 * CHUNK), min_size=0, max_size=60))
    if sum(small) < 2 * BLOCK and small:  # make the small ones worth dealing out
        small += [2 * BLOCK // len(small) + 1] * len(small)
    return [((0, "big"), (big,), dtype)] + [
        ((i + 1, "W"), (n,), dtype) for i, n in enumerate(small)]


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hp=hyperparams(), specs=threaded_specs(), n_rounds=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1), gscale=st.sampled_from([1e-3, 1.0, 10.0]))
def test_any_thread_count_gives_the_one_thread_bits(hp, specs, n_rounds, seed, gscale):
    level = LEVELS[-1]
    expected = trace(hp, specs, n_rounds, seed, gscale, level, 1)
    for threads in THREAD_COUNTS:
        got = trace(hp, specs, n_rounds, seed, gscale, level, threads)
        assert_same_bits(got, expected, f"{threads} threads")


@pytest.mark.parametrize("n", [2 * BLOCK + 5, 1024 * CHUNK + 3 * CHUNK + 17])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_clip_norm_is_the_documented_order_at_every_level_and_thread_count(n, dtype):
    """Chunk sums computed by several threads (and, past 1024 chunks, in several rounds)
    are still combined once in the fixed order."""
    rng = numpy.random.default_rng(n)
    g = rng.standard_normal(n).astype(dtype)
    w = rng.standard_normal(n).astype(dtype)
    expected = clip_sum_squares(g, w, 0.01)
    for level in LEVELS:
        for threads in (1,) + THREAD_COUNTS:
            with cpu_settings(level, threads):
                assert _kernels.clip_sum_squares(g, w, 0.01) == expected, (level, threads)


def poisoned(w, value):
    """A copy of w with `value` (inf or nan) at one element; returns (copy, index)."""
    bad = w.copy()
    k = int(numpy.random.default_rng(w.size).integers(w.size))
    bad[k] = value
    return bad, k


@pytest.mark.parametrize("n", [2 * BLOCK + 5, 3 * CHUNK + 17])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_clip_norm_reads_the_weights_only_when_l2_is_coupled(n, dtype):
    """l2 == 0: the terms are g alone (Thinc's rule), so an inf or NaN weight leaves the
    sum unchanged; l2 != 0: it makes the sum inf or NaN. At every level and thread count,
    the same as the NumPy spelling."""
    rng = numpy.random.default_rng(n)
    g = rng.standard_normal(n).astype(dtype)
    w = rng.standard_normal(n).astype(dtype)
    clean = clip_sum_squares(g, w, 0.0)
    assert clean == clip_sum_squares(g, numpy.zeros_like(w), 0.0) > 0.0
    for value in (numpy.inf, -numpy.inf, numpy.nan):
        bad, _ = poisoned(w, value)
        for level in LEVELS:
            for threads in (1,) + THREAD_COUNTS:
                with cpu_settings(level, threads):
                    assert _kernels.clip_sum_squares(g, bad, 0.0) == clean, (level, threads)
                    coupled = _kernels.clip_sum_squares(g, bad, 0.01)
                if numpy.isnan(value):
                    assert numpy.isnan(coupled) and numpy.isnan(clip_sum_squares(g, bad, 0.01))
                else:
                    assert coupled == clip_sum_squares(g, bad, 0.01) == numpy.inf


@needs_mprotect
def test_clip_norm_does_not_read_the_weights_when_l2_is_0():
    """The weights live on pages that fault on any access: every level and thread count
    still gives the norm of g (the update itself reads them, so only the norm runs)."""
    done = run_unreadable(f"""
        import optim
        from optim import _kernels, cpu
        for dtype in ("float32", "float64"):
            n = {2 * BLOCK + 5}
            g = numpy.random.default_rng(0).standard_normal(n).astype(dtype)
            want = _kernels.clip_sum_squares(g, numpy.zeros_like(g), 0.0)
            w = unreadable(n, dtype)
            for level in cpu.available_isas():
                cpu._set_isa(level)
                for threads in (1, 2, 3):
                    optim.set_num_threads(threads)
                    assert _kernels.clip_sum_squares(g, w, 0.0) == want, (level, threads)
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("L2,coupled", [(0.0, False), (1e-3, False), (1e-3, True)])
def test_an_inf_or_nan_weight_spoils_only_its_element_unless_l2_is_coupled(dtype, L2, coupled):
    """A clipped Adam update of weights holding one inf or NaN: with L2 off or decoupled
    every other element gets the bits it gets with a finite weight there (the clip factor
    is the gradient's alone); with coupled L2 the clip factor changes (inf: 0, NaN: the
    norm compares false, 1), so the other elements change too. Every level and thread
    count, single calls and step_many."""
    rng = numpy.random.default_rng(7)
    n = 2 * BLOCK + 5
    w0 = rng.standard_normal(n).astype(dtype)
    g0 = rng.standard_normal(n).astype(dtype)  # norm ~ 360: clipped to 1.0
    hp = dict(learn_rate=0.01, L2=L2, L2_is_weight_decay=not coupled, grad_clip=1.0,
              use_averages=True)

    def update(w, many):
        opt = Optimizer(**hp)
        w = w.copy()
        if many:
            opt.step_many(["k"], [w], [g0.copy()])
        else:
            opt("k", w, g0.copy())
        return [w, opt.mom1["k"], opt.mom2["k"], opt.averages["k"]]

    for value in (numpy.inf, numpy.nan):
        bad, k = poisoned(w0, value)
        keep = numpy.arange(n) != k
        for level in LEVELS:
            for threads in (1,) + THREAD_COUNTS:
                with cpu_settings(level, threads):
                    many = threads == 2
                    clean, got = update(w0, many), update(bad, many)
                same = [a[keep].tobytes() == b[keep].tobytes() for a, b in zip(clean, got)]
                assert all(same) != coupled, (value, level, threads, same)
                assert not numpy.isfinite(got[0][k])


@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_roofline_threads_move_the_same_values(threads):
    rng = numpy.random.default_rng(threads)
    sizes = [3 * BLOCK + 11] + [int(n) for n in rng.integers(1, 5000, size=80)]
    one = [[rng.standard_normal(n).astype("float32") for _ in range(3)] for n in sizes]
    many = [[a.copy() for a in arrays] for arrays in one]
    Plan(one, read_index=1).run(3, threads=1)
    Plan(many, read_index=1).run(3, threads=threads)
    for a, b in zip(one, many):
        for x, y in zip(a, b):
            numpy.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- the settings

def test_default_level_is_the_best_available():
    assert cpu.available_isas()[0] == "baseline"
    assert set(cpu.available_isas()) <= set(_kernels.isa_built())
    assert set(cpu.available_isas()) <= set(_kernels.isa_supported())
    if not os.environ.get(cpu.ISA_ENV):
        assert _kernels.isa() == cpu.available_isas()[-1]


def test_set_isa_rejects_unknown_and_unsupported_levels(monkeypatch):
    with pytest.raises(ValueError, match="'sse9' is unknown; choose from baseline"):
        cpu._set_isa("sse9")
    monkeypatch.setattr(_kernels, "isa_supported", lambda: ("baseline",))
    monkeypatch.setattr(_kernels, "isa_built", lambda: ("baseline", "avx2"))
    with pytest.raises(ValueError, match="'avx2': this CPU does not support it"):
        cpu._set_isa("avx2")
    with pytest.raises(ValueError, match="'avx512': this build of optim has no avx512 loops"):
        cpu._set_isa("avx512")
    assert _kernels.isa() in LEVELS  # unchanged


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", 10**6])
def test_set_num_threads_rejects_bad_counts(bad):
    before = optim.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        optim.set_num_threads(bad)
    assert optim.get_num_threads() == before


def test_set_num_threads_round_trips():
    before = optim.get_num_threads()
    try:
        optim.set_num_threads(3)
        assert optim.get_num_threads() == (3 if _kernels.has_pool() else 1)
    finally:
        optim.set_num_threads(before)


def test_default_threads_are_the_usable_cores_capped():
    n = cpu.default_num_threads()
    assert 1 <= n <= cpu.DEFAULT_MAX_THREADS
    if hasattr(os, "sched_getaffinity"):
        assert n == min(len(os.sched_getaffinity(0)), cpu.DEFAULT_MAX_THREADS)


def test_show_config(capsys):
    optim.show_config()
    out = capsys.readouterr().out
    c = cpu.config()
    assert f"SIMD level:      {c['isa']}" in out and "thread pool:" in out
    assert c["threads"] == optim.get_num_threads()
    assert c["isa"] in c["isa_available"]
    assert cpu.describe().startswith(f"SIMD {c['isa']}")


def test_environment_variables_choose_level_and_threads():
    done = run_python("import optim; from optim import cpu; c = cpu.config(); "
                      "print(c['isa'], c['threads'])", OPTIM_ISA="baseline",
                      OPTIM_NUM_THREADS="3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["baseline", "3" if _kernels.has_pool() else "1"]


@pytest.mark.parametrize("env,message", [
    ({"OPTIM_ISA": "avx9000"}, "OPTIM_ISA 'avx9000' is unknown; choose from baseline, avx2, avx512"),
    ({"OPTIM_NUM_THREADS": "many"}, "OPTIM_NUM_THREADS='many': expected a whole number >= 1"),
])
def test_bad_environment_variables_fail_clearly(env, message):
    done = run_python("import optim", **env)
    assert done.returncode != 0
    assert message in done.stderr


@pytest.mark.skipif(not _kernels.has_pool() or not hasattr(os, "fork"),
                    reason="needs the thread pool and fork")
def test_forked_child_uses_threads_too():
    """The pool's workers do not survive fork(); the child starts a pool of its own
    (GNU OpenMP would hang here) and gives the same bits."""
    done = run_python(f"""
        import os, numpy, optim
        optim.set_num_threads(2)
        opt = optim.Adam(0.001)
        w = numpy.linspace(-1, 1, {4 * BLOCK}, dtype="float32")
        g = numpy.ones_like(w)
        opt("k", w, g)
        g[:] = 0.5
        pid = os.fork()
        if pid == 0:
            opt("k", w, g)
            os._exit(0 if optim.get_num_threads() == 2 and not g.any() else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "child 0"


def test_python_threads_updating_at_once_get_their_own_bits():
    """Several Python threads updating large tensors at once share one pool: a call that
    finds it busy runs on its own thread. Each gets the bits it gets alone."""
    import threading

    def run(seed, out, threads):
        rng = numpy.random.default_rng(seed)
        opt = Optimizer(learn_rate=0.01, grad_clip=1.0, use_averages=True)
        w = rng.standard_normal(3 * BLOCK + 123).astype("float32")
        for _ in range(6):
            g = rng.standard_normal(w.size).astype("float32")
            opt("w", w, g)
        out[seed] = (w.tobytes(), opt.mom2["w"].tobytes(), opt.averages["w"].tobytes())

    alone = {}
    with cpu_settings(LEVELS[-1], 1):
        for seed in range(4):
            run(seed, alone, 1)
    together = {}
    with cpu_settings(LEVELS[-1], 2):
        workers = [threading.Thread(target=run, args=(seed, together, 2)) for seed in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    assert together == alone


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_on_signed_zeros_and_infinities_is_the_documented_formula(dtype):
    """docs/numerics.md's per-element formula, literally, on special weights, at every
    level: the step, then w_new - post_decay * w_new (which makes -0.0 +0.0, inf nan)."""
    w0 = numpy.array([-0.0, 0.0, numpy.inf, -numpy.inf, numpy.nan, 1.5, -2.0], dtype=dtype)
    t = w0.dtype.type
    for level in LEVELS:
        with cpu_settings(level, 1):
            opt = Optimizer(learn_rate=0.01, grad_clip=0.0, use_averages=False)
            w, g = w0.copy(), numpy.zeros_like(w0)
            opt("k", w, g)
        c = _kernels.coefs(opt._hyper, 1)
        m = t(c["beta1"]) * t(0) + t(1 - c["beta1"]) * g
        v = t(c["beta2"]) * t(0) + t(1 - c["beta2"]) * g * g
        with numpy.errstate(invalid="ignore"):
            expected = w0 - t(c["lr"]) * (m / (numpy.sqrt(v) + t(c["eps"])))
            expected = expected - t(c["post_decay"]) * expected
        assert w.tobytes() == expected.tobytes(), (level, w, expected)


def test_known_shapes_accepts_only_ndarrays_of_the_recorded_shapes():
    w, g = numpy.zeros((3, 4), "float32"), numpy.ones((3, 4), "float32")
    assert _batch.known_shapes([(3, 4)], [w], [g])
    assert _batch.known_shapes([], [], [])
    for recorded, ws, gs in [([(4, 3)], [w], [g]), ([(12,)], [w], [g]), ([None], [w], [g]),
                             ([(3, 4)], [w.view(numpy.matrix)], [g]),
                             ([(3, 4)], [w], [[1.0]]), ([(0,)], [w[:0, 0]], [g[:0, 0]]),
                             ([(3, 4)], [w, w], [g])]:
        assert not _batch.known_shapes(recorded, ws, gs)
