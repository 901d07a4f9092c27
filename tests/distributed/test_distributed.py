"""optim.distributed (issue 12): data-parallel updates over torch.distributed.

Multi-process tests start 2 Gloo ranks on 127.0.0.1 (tests/distributed/distributed_worker.py) and
compare what they write:

* 2 ranks, each taking half of every batch of a Thinc MLP on the digits, end bitwise
  equal to each other and equal to 1 process taking whole batches to float tolerance;
* sharded state (ZeRO-1), step_many, small buckets and reduce="sum" give bitwise the
  replicated weights; per-rank optimizer state <= 0.55x the replicated;
* checkpoints move 2 ranks -> 1 process -> 2 ranks exactly (bitwise the uninterrupted run);
* a rank that dies or hangs makes the other fail with a clear error, never hang;
* bad input raises before any collective, naming the key.

In-process tests (world size 1, no torch needed) cover the deferred contract, the flat
bucket kernels against NumPy, and the registry entry points.
"""
import importlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optim
import optim.distributed as dist_opt
from optim.distributed import _flat

torch = pytest.importorskip("torch")  # the thinc-optim[distributed] extra; CI installs it

HERE = Path(__file__).resolve().parent
# The folder holding the optim this process imported (not the checkout: in an unpacked
# sdist that holds the uncompiled sources).
OPTIM_PATH = os.path.dirname(os.path.dirname(os.path.abspath(optim.__file__)))
WORKER = HERE / "distributed_worker.py"


# ---------------------------------------------------------------- launching ranks

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_interface():
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLIS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([OPTIM_PATH, os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def start(command, world=2, env=None):
    """Start `command` (a list; the worker if it names a scenario) on `world` ranks."""
    if command[0] != sys.executable:
        command = [sys.executable, str(WORKER), *map(str, command)]
    if world == 1:
        envs = [_env(**(env or {}))]
    else:
        common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME=_loopback_interface(),
                      **(env or {}))
        envs = [_env(RANK=str(r), LOCAL_RANK=str(r), **common) for r in range(world)]
    return [subprocess.Popen(command, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for e in envs]


def finish(procs, timeout=150, wait_for=None):
    """[(returncode, stdout, stderr)] per rank. wait_for: the ranks that must end by
    themselves; the others are killed once those have (a hung rank, for example)."""
    results = {}
    try:
        for rank, proc in enumerate(procs):
            if wait_for is None or rank in wait_for:
                out, err = proc.communicate(timeout=timeout)
                results[rank] = (proc.returncode, out, err)
    finally:
        for rank, proc in enumerate(procs):
            if rank not in results:
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate()
                results[rank] = (proc.returncode, out, err)
    return [results[rank] for rank in range(len(procs))]


def launch(scenario, out, world=2, timeout=150):
    return finish(start([scenario, out], world), timeout)


def _check_ok(results):
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-2000:]}\n{err[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    _check_ok(launch("train", out))
    _check_ok(launch("single", out, world=1))
    _check_ok(launch("resume", out))
    return out


def _load(out, name):
    weights = dict(numpy.load(out / f"{name}.npz"))
    averaged_path = out / f"{name}-averaged.npz"
    averaged = dict(numpy.load(averaged_path)) if averaged_path.exists() else None
    info = json.loads((out / f"{name}.json").read_text())
    return weights, averaged, info


def _assert_bitwise(a, b, what):
    assert sorted(a) == sorted(b), what
    for name in a:
        numpy.testing.assert_array_equal(a[name], b[name], err_msg=f"{what}: {name}")


MODES = ["replicated", "sharded", "replicated-step_many", "sharded-step_many", "sharded-sum",
         "bad-replicated", "resumed-replicated", "resumed-sharded"]


# ---------------------------------------------------------------- 2 ranks vs 1

@pytest.mark.parametrize("mode", MODES)
def test_ranks_hold_bitwise_equal_weights(runs, mode):
    w0, a0, _ = _load(runs, f"{mode}-rank0")
    w1, a1, _ = _load(runs, f"{mode}-rank1")
    assert len(w0) == 6
    _assert_bitwise(w0, w1, f"{mode}: weights of rank 0 vs rank 1")
    _assert_bitwise(a0, a1, f"{mode}: averages of rank 0 vs rank 1")


def test_two_ranks_with_half_batches_match_one_process(runs):
    w2, a2, info2 = _load(runs, "replicated-rank0")
    w1, a1, info1 = _load(runs, "single-whole-batches")
    start = dict(numpy.load(runs / "checkpoint-replicated-weights.npz"))
    for name in w1:
        # The mean's summation order differs (two half sums vs one), so the weights differ
        # in the last bits, and 132 Adam steps carry that along: measured 1.3e-6 at most.
        numpy.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=2e-5, err_msg=name)
        numpy.testing.assert_allclose(a2[name], a1[name], rtol=1e-4, atol=2e-5, err_msg=name)
        # and the run moved them far more than that
        assert numpy.abs(w1[name] - start[name]).max() > 1e-2, name
    assert info1["accuracy"] > 0.9
    assert abs(info2["accuracy"] - info1["accuracy"]) <= 0.005


@pytest.mark.parametrize("mode", ["sharded", "replicated-step_many", "sharded-step_many",
                                  "sharded-sum"])
def test_modes_bitwise_equal_replicated(runs, mode):
    # sharded: each rank updates its own keys and broadcasts them; step_many: the same
    # buckets without the deferral; bucket_mb=0.004: ~1000 elements a bucket, so a
    # tensor spans buckets and two buckets are in flight; sum: gradients divided by the
    # whole batch, summed (a power-of-two scale: exactly the mean's numbers).
    w_ref, a_ref, _ = _load(runs, "replicated-rank0")
    w, a, _ = _load(runs, f"{mode}-rank0")
    _assert_bitwise(w, w_ref, f"{mode} vs replicated")
    _assert_bitwise(a, a_ref, f"{mode} vs replicated (averages)")


def test_mixed_dtypes_and_lr_scales_match_the_mean_gradient_update(runs):
    # float32 and float64 keys in one step, per-key lr_scale, lookahead (whose sync steps
    # move the weights on the owner only, when sharded), buckets of ~1000 values:
    # bitwise one process's optimizer fed (rank 0's gradient + rank 1's) / 2.
    for rank in range(2):
        _, _, info = _load(runs, f"bad-replicated-rank{rank}")
        assert info["mixed"] == {"False": True, "True": True}, rank


def test_broadcast_arrays_gives_every_rank_rank_0s_weights(runs):
    w0 = dict(numpy.load(runs / "broadcast-rank0.npz"))
    w1 = dict(numpy.load(runs / "broadcast-rank1.npz"))
    # rank 1 had added 1.0 to every weight before the broadcast
    _assert_bitwise(w0, w1, "after broadcast_arrays")
    assert len(w0) == 6


def test_sharded_state_memory_and_owners(runs):
    infos = [_load(runs, f"sharded-rank{r}")[2] for r in range(2)]
    replicated = [_load(runs, f"replicated-rank{r}")[2]["state_nbytes"] for r in range(2)]
    assert replicated[0] == replicated[1] > 0
    sharded = [info["state_nbytes"] for info in infos]
    assert sum(sharded) == replicated[0]  # every key's state lives on exactly one rank
    assert max(sharded) <= 0.55 * replicated[0], (sharded, replicated)
    assert infos[0]["owners"] == infos[1]["owners"]  # the ranks agree who owns what
    assert set(infos[0]["owners"].values()) == {0, 1}


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_is_single_process_format_from_any_mode(runs):
    # The two runs built their models in one process, so Thinc's keys (model id, name)
    # differ: map the sharded run's keys onto the replicated run's by walk order.
    keys = {mode: [tuple(k) for k in json.loads((runs / f"checkpoint-{mode}-keys.json")
                                                .read_text())]
            for mode in ("replicated", "sharded")}
    replicated = (runs / "checkpoint-replicated.bin").read_bytes()
    sharded = optim.load(runs / "checkpoint-sharded.bin")
    sharded.remap_keys(dict(zip(keys["sharded"], keys["replicated"])))
    assert sharded.to_bytes() == replicated  # the gathered shards: the replicated state
    loaded = optim.load(runs / "checkpoint-sharded.bin")
    assert isinstance(loaded, optim.Optimizer)
    assert len(loaded.mom1) == len(loaded.averages) == 6
    assert json.loads((runs / "single.json").read_text())["reloaded_bytes_equal"]


def test_checkpoints_two_one_two_continue_exactly(runs):
    # 2 ranks (sharded) save at step 44; 1 process (plain optim.Optimizer) continues to
    # 88 and saves; 2 ranks (replicated and sharded) load that and finish at 132. Bitwise
    # the weights and averages of the 2-rank run that never stopped.
    w_ref, a_ref, _ = _load(runs, "sharded-rank0")
    for mode in ("replicated", "sharded"):
        for rank in range(2):
            w, a, info = _load(runs, f"resumed-{mode}-rank{rank}")
            assert info["exact_reload"], (mode, rank)  # from_bytes then to_bytes: same bytes
            _assert_bitwise(w, w_ref, f"resumed {mode} rank {rank}")
            _assert_bitwise(a, a_ref, f"resumed {mode} rank {rank} (averages)")
    resumed = [_load(runs, f"resumed-sharded-rank{r}")[2]["state_nbytes"] for r in range(2)]
    whole = _load(runs, "resumed-replicated-rank0")[2]["state_nbytes"]
    assert sum(resumed) == whole and max(resumed) < whole


# ---------------------------------------------------------------- failures

def test_bad_input_raises_naming_the_key_before_any_collective(runs):
    _, _, info = _load(runs, "bad-replicated-rank0")
    errors = info["errors"]
    assert errors["float16"].startswith("TypeError") and "('bad', 'W')" in errors["float16"]
    assert "float16" in errors["float16"]
    assert errors["shape"].startswith("ValueError") and "('bad', 'W')" in errors["shape"]
    assert errors["list"].startswith("TypeError") and "('bad', 'W')" in errors["list"]
    assert errors["lr_scale"].startswith("ValueError") and "lr_scale" in errors["lr_scale"]
    assert "twice" in errors["repeated"] and "flush()" in errors["repeated"]
    assert "step_schedules()" in errors["repeated"]
    assert errors["pending_after_errors"] == 1  # only the one good call was recorded
    assert errors["weights_unchanged"]
    assert "flush()" in errors["step_many_pending"]
    assert "('x', 2)" in errors["step_many_shape"]
    # and the run went on in step on both ranks (test_ranks_hold_bitwise_equal_weights)
    assert info["accuracy"] > 0.9


def test_dead_or_hung_rank_fails_the_others_with_a_clear_error(tmp_path):
    # Two groups at once: in one, rank 1 of a spaCy run through the launcher dies at step 3
    # (os._exit in a before_update callback); in the other, rank 1 of the MLP run stops
    # participating at step 3 (sleeps). Neither may hang the rank that is left.
    (tmp_path / "hang").mkdir()
    hung = start(["hang", tmp_path / "hang"])
    paths = _spacy_files(tmp_path, n_train=96, die=True)
    code = tmp_path / "die.py"
    code.write_text(DIE_AT_STEP_3)
    dead = start(_launcher(paths, tmp_path / "out", "--code", str(code), "--timeout", "60"))
    (code0, out0, err0), (code1, _, err1) = finish(dead, timeout=120)
    assert code1 == 3, err1[-3000:]  # rank 1 died
    assert code0 == 1, err0[-3000:]  # rank 0 stopped with an error, not a hang
    assert "optim.spacy_train: rank 0: optim.distributed: rank 0 of 2 failed in" in err0
    assert "another rank died" in err0
    assert "Traceback" not in err0  # one clear line, not a stack trace

    (code0, _, err0), _ = finish(hung, timeout=120, wait_for={0})
    assert code0 == 0, err0[-3000:]
    result = json.loads((tmp_path / "hang" / "fail-rank0.json").read_text())
    assert result["type"] == "DistributedError"
    assert "rank 0 of 2 failed in the gradient all-reduce of step 3" in result["error"]
    assert "within the 3 s timeout" in result["error"]
    assert 2.5 < result["seconds"] < 30


# ---------------------------------------------------------------- spaCy

SPACY_CONFIG = """
[paths]
train = null
dev = null

[system]
seed = 0
gpu_allocator = null

[nlp]
lang = "en"
pipeline = ["textcat"]
batch_size = 256

[components]

[components.textcat]
factory = "textcat"

[components.textcat.model]
@architectures = "spacy.TextCatBOW.v3"
exclusive_classes = true
ngram_size = 1
no_output_layer = false
length = 4096

[corpora]

[corpora.train]
@readers = "optim.sharded_corpus.v1"

[corpora.train.corpus]
@readers = "spacy.Corpus.v1"
path = ${paths.train}
gold_preproc = false

[corpora.dev]
@readers = "spacy.Corpus.v1"
path = ${paths.dev}
gold_preproc = false

[training]
seed = ${system.seed}
gpu_allocator = ${system.gpu_allocator}
dropout = 0.0
accumulate_gradient = 1
patience = 0
max_epochs = 4
max_steps = 0
eval_frequency = 10
frozen_components = []
annotating_components = []
dev_corpus = "corpora.dev"
train_corpus = "corpora.train"
before_to_disk = null
%(before_update)s

[training.logger]
@loggers = "spacy.ConsoleLogger.v1"
progress_bar = false

[training.batcher]
@batchers = "spacy.batch_by_sequence.v1"
size = 16
get_length = null

[training.optimizer]
@optimizers = "optim.distributed.Adam.v1"
learn_rate = 0.01
reduce = "sum"
sharded = %(sharded)s
use_averages = true

[training.score_weights]
cats_macro_f = 1.0

[initialize]
"""

DIE_AT_STEP_3 = """
import os
from spacy import registry

@registry.callbacks("optim_test.die_at_step_3.v1")
def die_at_step_3():
    def before_update(nlp, info):
        if os.environ.get("RANK") == "1" and info["step"] == 3:
            os._exit(3)
    return before_update
"""


def _spacy_files(tmp_path, n_train, sharded=False, die=False):
    """train.spacy, dev.spacy (tests/textcat_data.py's texts) and a config."""
    from spacy.tokens import DocBin
    from textcat_data import texts as _texts

    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    paths = {}
    for split, n, seed in (("train", n_train, 1), ("dev", 120, 2)):
        docs = DocBin()
        for text, cats in _texts(n, seed):
            doc = nlp.make_doc(text)
            doc.cats = cats
            docs.add(doc)
        paths[split] = tmp_path / f"{split}.spacy"
        docs.to_disk(paths[split])
    before_update = ('[training.before_update]\n@callbacks = "optim_test.die_at_step_3.v1"'
                     if die else "before_update = null")
    paths["config"] = tmp_path / "config.cfg"
    paths["config"].write_text(SPACY_CONFIG % {"before_update": before_update,
                                               "sharded": str(sharded).lower()})
    return paths


def _launcher(paths, output, *extra, torchrun=False):
    command = [sys.executable, "-m", "optim.spacy_train", str(paths["config"]),
               "--output", str(output), "--paths.train", str(paths["train"]),
               "--paths.dev", str(paths["dev"]), *extra]
    if torchrun:
        command[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                        "-m", "optim.spacy_train"]
    return command


def _textcat_f(model_dir, dev_path):
    import spacy
    from spacy.training import Corpus

    nlp = spacy.load(model_dir)
    return nlp.evaluate(list(Corpus(dev_path)(nlp)))["cats_macro_f"]


def test_spacy_textcat_through_the_launcher_on_two_ranks(tmp_path):
    # The same config on 1 process and, through torchrun, on 2 ranks (sharded state, each
    # rank half of the corpus, so a step sees twice the examples and an epoch has half the
    # steps). 2 ranks reach the accuracy of 1 process; only rank 0 prints and writes.
    paths = _spacy_files(tmp_path, n_train=320, sharded=True)
    one = start(_launcher(paths, tmp_path / "one"), world=1)
    two = start(_launcher(paths, tmp_path / "two", torchrun=True), world=1,
                env={"GLOO_SOCKET_IFNAME": _loopback_interface()})
    [(code1, out1, err1)] = finish(one, timeout=150)
    [(code2, out2, err2)] = finish(two, timeout=150)
    assert code1 == 0, out1[-2000:] + err1[-4000:]
    assert code2 == 0, out2[-2000:] + err2[-4000:]
    assert out2.count("Pipeline: ['textcat']") == 1  # rank 0 alone prints
    assert out2.count("Saved pipeline to output directory") == 1
    # 320 examples, 160 a rank, 10 batches of 16 an epoch, 4 epochs: steps 0 to 39
    assert "\n  3      30" in out2 and "\n  4" not in out2.split("Saved pipeline")[0]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model-best", "model-last"]
    f_one = _textcat_f(tmp_path / "one" / "model-last", paths["dev"])
    f_two = _textcat_f(tmp_path / "two" / "model-last", paths["dev"])
    assert f_one > 0.9
    assert f_two >= f_one - 0.01, (f_one, f_two)


def test_sharded_corpus_and_lockstep_batches_in_one_process():
    pytest.importorskip("spacy")
    from optim.distributed import training

    corpus = lambda nlp: iter(range(11))  # noqa: E731
    shards = [list(training.sharded_corpus(corpus, rank=r, world_size=3)(None))
              for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    with training.unsharded():
        assert list(training.sharded_corpus(corpus, rank=1, world_size=3)(None)) == \
            list(range(11))
    assert list(training.sharded_corpus(corpus)(None)) == list(range(11))  # world of one
    with pytest.raises(ValueError, match="rank"):
        training.sharded_corpus(corpus, rank=3, world_size=3)
    with pytest.raises(ValueError, match="both"):
        training.sharded_corpus(corpus, rank=0)
    batches = training.lockstep_batches(lambda items: ([x, x] for x in items))
    assert list(batches(range(3))) == [[0, 0], [1, 1], [2, 2]]
    from spacy import registry

    assert registry.readers.get("optim.sharded_corpus.v1") is training.sharded_corpus
    assert registry.batchers.get("optim.lockstep_batches.v1") is training.lockstep_batches
    points = _entry_points("spacy_readers")
    assert _resolve(points["optim.sharded_corpus.v1"]) is training.sharded_corpus
    points = _entry_points("spacy_batchers")
    assert _resolve(points["optim.lockstep_batches.v1"]) is training.lockstep_batches


# ---------------------------------------------------------------- one process

def _tensors(seed, n=7, dtype="float32"):
    """Keys, weights and gradients of fixed shapes (one empty); values from `seed`."""
    shape_rng = numpy.random.default_rng(12345)
    shapes = [tuple(int(d) for d in shape_rng.integers(1, 9, size=shape_rng.integers(1, 3)))
              for _ in range(n)] + [(0,)]
    rng = numpy.random.default_rng(seed)
    keys = [(i, "W") for i in range(len(shapes))]
    weights = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return keys, weights, grads


@pytest.mark.parametrize("sharded", [False, True])
def test_world_of_one_is_the_plain_optimizer(sharded):
    keys, w_ref, _ = _tensors(0)
    _, w_deferred, _ = _tensors(0)
    _, w_many, _ = _tensors(0)
    ref = optim.Adam(0.01, L2=0.01)
    deferred = dist_opt.Adam(0.01, L2=0.01, sharded=sharded)
    many = dist_opt.Adam(0.01, L2=0.01, sharded=sharded)
    for step in range(4):
        _, _, g_ref = _tensors(10 + step)
        _, _, g_deferred = _tensors(10 + step)
        _, _, g_many = _tensors(10 + step)
        ref.step_many(keys, w_ref, g_ref)
        ref.step_schedules()
        before = [w.copy() for w in w_deferred]
        for k, w, g in zip(keys, w_deferred, g_deferred):
            assert deferred(k, w, g) == (w, g)
        # the contract: nothing changes until the flush; the empty gradient is not recorded
        assert deferred.pending == len(keys) - 1
        for w, b in zip(w_deferred, before):
            numpy.testing.assert_array_equal(w, b)
        deferred.step_schedules()
        assert deferred.pending == 0
        assert not any(g.any() for g in g_deferred)  # gradients zeroed at the flush
        many.step_many(keys, w_many, g_many)
        many.step_schedules()
    for a, b, c in zip(w_ref, w_deferred, w_many):
        numpy.testing.assert_array_equal(a, b)
        numpy.testing.assert_array_equal(a, c)
    assert deferred.step == ref.step == 4
    assert deferred.to_bytes() == ref.to_bytes()
    assert deferred.world_size == 1 and deferred.rank == 0
    assert set(deferred.averages) == set(keys[:-1])  # the empty gradient was a no-op


def test_flush_updates_and_repeated_key_error():
    opt = dist_opt.SGD(0.5, use_averages=False, grad_clip=0.0)
    w = numpy.ones(4, dtype="float32")
    g = numpy.full(4, 2.0, dtype="float32")
    opt(("a", "W"), w, g)
    with pytest.raises(ValueError, match=r"given twice.*flush\(\).*step_schedules\(\)"):
        opt(("a", "W"), w, g)
    with pytest.raises(ValueError, match=r"call optimizer.flush\(\)"):
        opt.to_bytes()
    numpy.testing.assert_array_equal(w, 1.0)
    opt.flush()
    numpy.testing.assert_array_equal(w, 0.0)  # 1 - 0.5 * 2
    assert not g.any()
    opt.flush()  # nothing recorded: a no-op
    numpy.testing.assert_array_equal(w, 0.0)
    assert opt.averages is None


@pytest.mark.parametrize("kwargs, error", [
    (dict(reduce="max"), ValueError), (dict(bucket_mb=0), ValueError),
    (dict(bucket_mb=float("inf")), ValueError), (dict(sharded=1), TypeError),
    (dict(timeout=-1), ValueError),
])
def test_bad_options(kwargs, error):
    with pytest.raises(error):
        dist_opt.Adam(0.001, **kwargs)
    with pytest.raises(TypeError, match="wraps an optim.Optimizer"):
        dist_opt.DistributedOptimizer(object())


def test_checkpoint_loads_across_kinds_only_when_they_match():
    keys, weights, grads = _tensors(1)
    adam = dist_opt.Adam(0.01)
    adam.step_many(keys, weights, grads)
    data = adam.to_bytes()
    with pytest.raises(ValueError, match="adam optimizer, not sgd"):
        dist_opt.SGD(0.1).from_bytes(data)
    other = dist_opt.Adam(0.5, sharded=True).from_bytes(data)
    assert other.learn_rate == 0.01 and other.to_bytes() == data
    # an optimizer that holds state already is spread like a checkpoint
    wrapped = dist_opt.DistributedOptimizer(optim.Adam(0.3).from_bytes(data), sharded=True)
    assert wrapped.to_bytes() == data


def test_import_optim_does_not_import_torch():
    code = ("import sys, optim, optim.distributed, numpy\n"
            "opt = optim.distributed.Adam(0.01)\n"
            "opt.step_many([1], [numpy.ones(3, 'f')], [numpy.ones(3, 'f')])\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"  # world size 1 needs no torch either


# ---------------------------------------------------------------- flat buckets

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
       bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)),
       divisor=st.integers(1, 7), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2 ** 16))
def test_flat_copies_match_numpy(sizes, bounds, divisor, dtype, seed):
    rng = numpy.random.default_rng(seed)
    arrays = [rng.standard_normal(n).astype(dtype) for n in sizes]
    starts = numpy.concatenate([[0], numpy.cumsum(sizes)]).astype(numpy.int64)
    total = int(starts[-1])
    lo, hi = sorted(int(b * total) for b in bounds)
    concat = numpy.concatenate(arrays)
    buf = numpy.full(hi - lo + 3, 7.0, dtype=dtype)
    _flat.copy_in(arrays, starts, lo, hi, buf)
    numpy.testing.assert_array_equal(buf[:hi - lo], concat[lo:hi])
    assert (buf[hi - lo:] == 7.0).all()
    src = rng.standard_normal(hi - lo).astype(dtype)
    _flat.copy_out(arrays, starts, lo, hi, src, divisor)
    expected = concat.copy()
    expected[lo:hi] = src / numpy.dtype(dtype).type(divisor)
    numpy.testing.assert_array_equal(numpy.concatenate(arrays), expected)
    _flat.fill_zero(arrays, starts, lo, hi, dtype)
    expected[lo:hi] = 0
    numpy.testing.assert_array_equal(numpy.concatenate(arrays), expected)


def test_flat_copies_validate_before_copying():
    starts = numpy.array([0, 3, 6], dtype=numpy.int64)
    good = numpy.zeros(3, dtype="float32")
    buf = numpy.ones(6, dtype="float32")
    for arrays, error, match in [
        ([good, numpy.zeros(3, dtype="float64")], TypeError, "array 1 of the bucket.*float64"),
        ([good, numpy.zeros(6, dtype="float32")[::2]], ValueError, "C-contiguous"),
        ([good, numpy.zeros(4, dtype="float32")], ValueError, "4 elements"),
        ([good, [0.0, 0.0, 0.0]], TypeError, "numpy.ndarray"),
        ([good], ValueError, "prefix sums"),
    ]:
        with pytest.raises(error, match=match):
            _flat.copy_out(arrays, starts, 0, 6, buf)
        assert not good.any()  # validated before anything was written
    with pytest.raises(ValueError, match="outside"):
        _flat.copy_in([good, good.copy()], starts, 2, 7, buf)
    with pytest.raises(ValueError, match="buffer holds"):
        _flat.copy_in([good, good.copy()], starts, 0, 6, buf[:5])
    readonly = numpy.zeros(3, dtype="float32")
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _flat.copy_out([good, readonly], starts, 0, 6, buf)
    with pytest.raises(ValueError, match="divisor"):
        _flat.copy_out([good, good.copy()], starts, 0, 6, buf, 0)


# ---------------------------------------------------------------- registries

def _entry_points(group):
    """The entry points of `group` that the installed distribution declares."""
    dist = importlib.metadata.distribution(optim.__title__)
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == group}


def _resolve(target):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def test_entry_points_declare_distributed_optimizers():
    thinc_api = pytest.importorskip("thinc.api")
    points = _entry_points("thinc_optimizers")
    for name in ("SGD", "Adam", "RAdam"):
        make = _resolve(points[f"optim.distributed.{name}.v1"])
        opt = make(learn_rate=0.01, reduce="sum", sharded=True, bucket_mb=1.0)
        assert isinstance(opt, thinc_api.Optimizer)  # what spaCy's schema requires
        assert isinstance(opt.optimizer, dist_opt.DistributedOptimizer)
        assert (opt.optimizer.reduce, opt.optimizer.sharded) == ("sum", True)
        assert opt.learn_rate == 0.01
        opt.learn_rate = 0.02
        assert opt.optimizer.optimizer.learn_rate == 0.02
    # and Thinc's registry resolves them from a config block
    config = thinc_api.Config().from_str(
        '[opt]\n@optimizers = "optim.distributed.Adam.v1"\nlearn_rate = 0.003\nsharded = true\n')
    resolved = thinc_api.registry.resolve(config)["opt"]
    assert resolved.optimizer.sharded and resolved.learn_rate == 0.003


@pytest.mark.parametrize("sharded", [False, True])
def test_empty_gradient_is_a_no_op_whatever_the_weights(sharded):
    """Issue 11 through the wrapper: an empty gradient is dropped before any check, in
    per-tensor calls (nothing recorded) and in step_many; other tensors update as alone."""
    opt = dist_opt.RAdam(0.123, use_averages=False, L2=0.1, L2_is_weight_decay=False,
                         sharded=sharded)
    weights, gradient = numpy.zeros((1, 2)), numpy.zeros(0)
    assert opt((0, "x"), weights, gradient) == (weights, gradient)
    other = numpy.zeros((2, 0), dtype="float32")  # another shape and dtype: not checked
    returned = opt((0, "x"), weights, other)
    assert returned[0] is weights and returned[1] is other
    assert not numpy.any(weights)
    assert opt.pending == 0
    ref = optim.RAdam(0.123, use_averages=False, L2=0.1, L2_is_weight_decay=False)
    w, w_ref = numpy.linspace(-1, 1, 6).reshape(2, 3), numpy.linspace(-1, 1, 6).reshape(2, 3)
    opt.step_many([(0, "x"), (1, "W")], [weights, w], [gradient, numpy.full((2, 3), 0.5)])
    ref((1, "W"), w_ref, numpy.full((2, 3), 0.5))
    numpy.testing.assert_array_equal(w, w_ref)
    assert (0, "x") not in opt.optimizer.nr_update
    with pytest.raises(ValueError, match="shape"):  # non-empty gradients stay checked
        opt((2, "b"), numpy.zeros((1, 2)), numpy.zeros(3))


def test_thinc_checkpoint_on_two_ranks_resumes_bitwise(tmp_path):
    """optim.thinc.save_checkpoint under torch.distributed: every rank's generators
    (dropout draws) are gathered and rank 0 writes one file; load_checkpoint on 2 ranks
    (model rebuilt with other ids) continues to the uninterrupted run's weights, bit for
    bit, replicated and sharded."""
    _check_ok(launch("thinc_checkpoint_save", tmp_path))
    _check_ok(launch("thinc_checkpoint_resume", tmp_path))
    for name in ("replicated", "sharded"):
        for rank in (0, 1):
            straight = dict(numpy.load(tmp_path / f"thinc-{name}-straight-rank{rank}.npz"))
            resumed = dict(numpy.load(tmp_path / f"thinc-{name}-resumed-rank{rank}.npz"))
            assert straight.keys() == resumed.keys() and len(straight) == 6
            for label in straight:
                assert straight[label].tobytes() == resumed[label].tobytes(), (name, label)
    # one file per run, and a single process loads it with a warning about the generators
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["thinc-replicated.ckpt",
                                                               "thinc-sharded.ckpt"]
    from thinc.api import Dropout, Relu, Softmax, chain

    from optim.thinc import load_checkpoint

    model = chain(Relu(32), Dropout(0.2), Relu(32), Softmax())
    model.initialize(X=numpy.zeros((2, 64), "f"), Y=numpy.zeros((2, 10), "f"))
    with pytest.warns(UserWarning, match="written by 2 ranks .* not restored"):
        opt, extra = load_checkpoint(tmp_path / "thinc-sharded.ckpt", model)
    assert extra == {"step": 13} and len(opt.mom1) == 6  # the whole sharded state


def test_groups_and_the_non_finite_skip_on_two_ranks(tmp_path):
    """2 Gloo ranks, step_many, per-parameter groups and nonfinite="skip", a NaN put into
    one gradient on rank 0 only: the all-reduce spreads it, every rank skips that update
    (replicated) or its owner does (sharded). Both modes end bitwise equal to each other,
    to a run that left that update out, and to the same loop driven by hand with two
    plain sharded optimizers (one at half the rate); the frozen bias never moves; one
    skip."""
    _check_ok(launch("groups_skip", tmp_path))
    runs = {(name, rank): dict(numpy.load(tmp_path / f"groups-{name}-rank{rank}.npz"))
            for name in ("replicated", "sharded", "omitted", "by_hand") for rank in (0, 1)}
    for rank in (0, 1):
        for name in ("sharded", "omitted", "by_hand"):
            _assert_bitwise(runs[(name, rank)], runs[("replicated", 0)], f"{name} {rank}")
        info = json.loads((tmp_path / f"groups-replicated-rank{rank}.json").read_text())
        assert info["skipped"] == 1
        sharded = json.loads((tmp_path / f"groups-sharded-rank{rank}.json").read_text())
        assert sharded["skipped"] == 1  # gathered over the ranks
    initial = dict(numpy.load(tmp_path / "groups-replicated-initial-rank0.npz"))
    final = runs[("replicated", 0)]
    bias = [label for label in final if label.endswith(":b")][-1]  # the Softmax's
    assert final[bias].tobytes() == initial[bias].tobytes()
    assert all(final[label].tobytes() != initial[label].tobytes()
               for label in final if label != bias)
    assert all(numpy.isfinite(w).all() for w in final.values())
