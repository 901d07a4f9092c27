"""One rank of a tests/distributed/test_distributed.py run: `python distributed_worker.py SCENARIO OUT`.

The test starts one process per rank with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT) and reads what each rank writes under OUT.

The model is a Thinc MLP on scikit-learn's digits; its loss gradient is the mean over the
batch (`(Yh - Y) / len(batch)`). With W ranks every batch is cut into W equal parts and
rank r takes part r. A single process can stand in for W ranks exactly: it computes each
part's gradient, sums them in rank order and divides by W, which is what the all-reduce
computes (for W = 2: a + b is commutative, so the sum is the same bits).
"""
import json
import sys
import time
from pathlib import Path

import numpy

import optim
import optim.distributed as dist_opt
from thinc.api import Relu, Softmax, chain, fix_random_seed

BATCH = 32
EPOCHS = 3
N_TRAIN = 1400
STEPS_PER_EPOCH = -(-N_TRAIN // BATCH)  # 44
TOTAL = EPOCHS * STEPS_PER_EPOCH
CHECKPOINT_A = STEPS_PER_EPOCH          # 2 ranks save here ...
CHECKPOINT_B = 2 * STEPS_PER_EPOCH      # ... 1 process resumes and saves here ...
BAD_INPUT_STEP = 5                      # ... 2 ranks resume to TOTAL


def hyper():
    return dict(learn_rate=optim.warmup_linear(0.01, 20, 400), L2=0.01, grad_clip=1.0,
                use_averages=True)


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype("float32")
    rng = numpy.random.RandomState(0)
    order = rng.permutation(len(X))
    X, y = X[order], y[order]
    Y = numpy.zeros((len(y), 10), dtype="float32")
    Y[numpy.arange(len(y)), y] = 1
    batches = []
    for _ in range(EPOCHS):
        perm = rng.permutation(N_TRAIN)
        batches.extend(perm[i:i + BATCH] for i in range(0, N_TRAIN, BATCH))
    return X[:N_TRAIN], Y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:], batches


def mlp(X, Y):
    fix_random_seed(0)
    model = chain(Relu(64), Relu(64), Softmax())
    model.initialize(X=X[:5], Y=Y[:5])
    return model


def params(model):
    """(key, name, node) of every parameter, in walk order; key is Thinc's (id, name)."""
    return [((node.id, name), f"{i}:{name}", node)
            for i, node in enumerate(model.walk())
            for name in node.param_names if node.has_param(name)]


def weights_of(model):
    return {label: node.get_param(key[1]).copy() for key, label, node in params(model)}


def set_weights(model, weights):
    for key, label, node in params(model):
        node.get_param(key[1])[...] = weights[label]


def backprop_part(model, X, Y, idx, divisor):
    Yh, backprop = model.begin_update(X[idx])
    backprop((Yh - Y[idx]) / divisor)


def train(model, opt, data, steps, rank, world, *, emulate=1, via="finish_update",
          grads="local", at_step=None):
    """Run `steps` (indices into the batch list) on this rank's part of each batch.

    emulate=W: one process computes all W parts and feeds their rank-order mean.
    via: "finish_update" (Thinc's per-tensor calls, deferred) or "step_many".
    grads: "local" divides by the part's size (for reduce="mean"), "global" by the
    batch's (for reduce="sum").
    at_step: {step: callback(step)} run before that step's update.
    """
    X, Y, _, _, batches = data
    for step in steps:
        idx = batches[step]
        parts = numpy.array_split(idx, max(world, emulate))
        if emulate > 1:
            summed = None
            for part in parts:
                backprop_part(model, X, Y, part, len(part))
                grads_now = [node.get_grad(key[1]).copy() for key, _, node in params(model)]
                for key, _, node in params(model):
                    node.get_grad(key[1])[...] = 0
                summed = grads_now if summed is None else [
                    a + b for a, b in zip(summed, grads_now)]
            for (key, _, node), g in zip(params(model), summed):
                node.get_grad(key[1])[...] = g / numpy.float32(emulate)
        else:
            part = parts[rank]
            backprop_part(model, X, Y, part, len(part) if grads == "local" else len(idx))
        if at_step and step in at_step:
            at_step[step](step)
        if via == "finish_update":
            model.finish_update(opt)
        else:
            items = params(model)
            opt.step_many([k for k, _, _ in items], [n.get_param(k[1]) for k, _, n in items],
                          [n.get_grad(k[1]) for k, _, n in items])
        opt.step_schedules()
    return model


def accuracy(model, data):
    _, _, Xte, yte, _ = data
    return float((model.predict(Xte).argmax(axis=1) == yte).mean())


def save(out, name, model, opt=None, **extra):
    numpy.savez(out / f"{name}.npz", **weights_of(model))
    info = {"accuracy": accuracy(model, data_cache()), **extra}
    if opt is not None and opt.averages:
        with model.use_params(opt.averages):
            numpy.savez(out / f"{name}-averaged.npz", **weights_of(model))
    (out / f"{name}.json").write_text(json.dumps(info))


_DATA = []


def data_cache():
    if not _DATA:
        _DATA.append(digits())
    return _DATA[0]


# ---------------------------------------------------------------- scenarios

def scenario_train(out):
    """2 ranks: every mode over the same batches, a checkpoint at CHECKPOINT_A, and the
    bad-input checks."""
    group = dist_opt.join(timeout=60)
    rank, world = group.rank, group.world_size
    data = data_cache()
    X, Y = data[0], data[1]
    tag = f"rank{rank}"

    # rank 0's weights everywhere
    model = mlp(X, Y)
    if rank == 1:
        for key, _, node in params(model):
            node.get_param(key[1])[...] += 1.0
    dist_opt.broadcast_arrays([node.get_param(key[1]) for key, _, node in params(model)])
    numpy.savez(out / f"broadcast-rank{rank}.npz", **weights_of(model))

    # float32 and float64 tensors in one step, lr_scales, lookahead, small buckets: against one
    # process's optimizer fed the mean of both ranks' gradients (rank 0's + rank 1's, / 2)
    mixed = {}
    for sharded in (False, True):
        rng = numpy.random.default_rng(7)
        shapes = [(int(rng.integers(1, 60)), int(rng.integers(1, 60))) for _ in range(12)]
        dtypes = ["float32", "float64"] * 6
        keys = [("mixed", i) for i in range(12)]
        start = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
        ours, ref = [w.copy() for w in start], [w.copy() for w in start]
        opt = dist_opt.Adam(0.01, sharded=sharded, bucket_mb=0.01, lookahead_k=2)
        local = optim.Adam(0.01, lookahead_k=2)
        for step in range(4):
            grads = [[numpy.random.default_rng(100 * step + 10 * r + i).standard_normal(s)
                      .astype(d) for i, (s, d) in enumerate(zip(shapes, dtypes))]
                     for r in range(world)]
            for i, key in enumerate(keys):
                opt(key, ours[i], grads[rank][i].copy(), lr_scale=0.5 if i % 3 else 1.0)
            opt.step_schedules()
            for i, key in enumerate(keys):
                mean = (grads[0][i] + grads[1][i]) / grads[0][i].dtype.type(2)
                local(key, ref[i], mean, lr_scale=0.5 if i % 3 else 1.0)
            local.step_schedules()
        mixed[str(sharded)] = all(numpy.array_equal(a, b) for a, b in zip(ours, ref))

    # (a) replicated, Thinc's per-tensor calls, with the bad-input checks at one step
    errors = {}

    def bad_inputs(step):
        w = numpy.ones(3, dtype="float32")
        tries = {
            "float16": lambda: opt(("bad", "W"), w, numpy.ones(3, dtype="float16")),
            "shape": lambda: opt(("bad", "W"), w, numpy.ones(4, dtype="float32")),
            "list": lambda: opt(("bad", "W"), w, [1.0, 2.0, 3.0]),
            "lr_scale": lambda: opt(("bad", "W"), w, numpy.ones(3, dtype="float32"),
                                    lr_scale=float("nan")),
        }
        key, _, node = params(model)[0]
        before = node.get_param(key[1]).copy()
        for name, call in tries.items():
            try:
                call()
                errors[name] = None
            except (TypeError, ValueError) as err:
                errors[name] = f"{type(err).__name__}: {err}"
        # a repeated key before a flush
        opt(key, node.get_param(key[1]), node.get_grad(key[1]))
        try:
            opt(key, node.get_param(key[1]), node.get_grad(key[1]))
            errors["repeated"] = None
        except ValueError as err:
            errors["repeated"] = str(err)
        errors["pending_after_errors"] = opt.pending
        errors["weights_unchanged"] = bool((node.get_param(key[1]) == before).all())
        # step_many with one bad tensor among good ones: raises before any collective
        try:
            opt.step_many([("x", 1), ("x", 2)], [w.copy(), w.copy()],
                          [numpy.ones(3, dtype="float32"), numpy.ones(2, dtype="float32")])
            errors["step_many_pending"] = None
        except ValueError as err:
            errors["step_many_pending"] = str(err)
        opt.flush()  # the recorded first key updates alone: every rank does the same
        try:
            opt.step_many([("x", 1), ("x", 2)], [w.copy(), w.copy()],
                          [numpy.ones(3, dtype="float32"), numpy.ones(2, dtype="float32")])
            errors["step_many_shape"] = None
        except ValueError as err:
            errors["step_many_shape"] = str(err)

    model = mlp(X, Y)
    opt = dist_opt.Adam(**hyper())
    train(model, opt, data, range(TOTAL), rank, world, at_step={BAD_INPUT_STEP: bad_inputs})
    save(out, f"bad-replicated-{tag}", model, opt, errors=errors,
         state_nbytes=opt.state_nbytes(), mixed=mixed)

    # (b) the same run without the extra flush at BAD_INPUT_STEP: replicated and sharded,
    # per-tensor and step_many, mean and sum; a checkpoint at CHECKPOINT_A
    runs = [("replicated", dict(sharded=False), {}),
            ("sharded", dict(sharded=True), {}),
            ("replicated-step_many", dict(sharded=False), dict(via="step_many")),
            ("sharded-step_many", dict(sharded=True, bucket_mb=0.004), dict(via="step_many")),
            ("sharded-sum", dict(sharded=True, reduce="sum"), dict(grads="global"))]
    for name, options, how in runs:
        model = mlp(X, Y)
        opt = dist_opt.Adam(**hyper(), **options)
        train(model, opt, data, range(CHECKPOINT_A), rank, world, **how)
        if name in ("replicated", "sharded"):
            opt.to_disk(out / f"checkpoint-{name}.bin")  # every rank calls; rank 0 writes
            if rank == 0:
                numpy.savez(out / f"checkpoint-{name}-weights.npz", **weights_of(model))
                (out / f"checkpoint-{name}-keys.json").write_text(
                    json.dumps([list(k) for k, _, _ in params(model)]))
        train(model, opt, data, range(CHECKPOINT_A, TOTAL), rank, world, **how)
        owners = {label: opt.owner(key) for key, label, _ in params(model)}
        save(out, f"{name}-{tag}", model, opt, state_nbytes=opt.state_nbytes(), owners=owners)


def scenario_single(out):
    """1 process: whole batches (for the tolerance comparison), and the middle leg of the
    2 -> 1 -> 2 checkpoint run, standing in for 2 ranks with a plain optim.Optimizer."""
    data = data_cache()
    X, Y = data[0], data[1]
    model = mlp(X, Y)
    opt = optim.Adam(**hyper())
    train(model, opt, data, range(TOTAL), 0, 1)
    save(out, "single-whole-batches", model, opt)

    model = mlp(X, Y)
    weights = dict(numpy.load(out / "checkpoint-sharded-weights.npz"))
    set_weights(model, weights)
    saved_keys = [tuple(k) for k in json.loads((out / "checkpoint-sharded-keys.json").read_text())]
    opt = optim.load(out / "checkpoint-sharded.bin")
    reloaded_bytes_equal = opt.to_bytes() == (out / "checkpoint-sharded.bin").read_bytes()
    opt.remap_keys(dict(zip(saved_keys, [k for k, _, _ in params(model)])))
    train(model, opt, data, range(CHECKPOINT_A, CHECKPOINT_B), 0, 1, emulate=2)
    opt.to_disk(out / "checkpoint-single.bin")
    numpy.savez(out / "checkpoint-single-weights.npz", **weights_of(model))
    (out / "checkpoint-single-keys.json").write_text(
        json.dumps([list(k) for k, _, _ in params(model)]))
    (out / "single.json").write_text(json.dumps({"reloaded_bytes_equal": reloaded_bytes_equal}))


def scenario_resume(out):
    """2 ranks: the last leg, from the 1-process checkpoint, replicated and sharded."""
    group = dist_opt.join(timeout=60)
    rank, world = group.rank, group.world_size
    data = data_cache()
    X, Y = data[0], data[1]
    saved_keys = [tuple(k) for k in json.loads((out / "checkpoint-single-keys.json").read_text())]
    data_bytes = (out / "checkpoint-single.bin").read_bytes()
    for name, sharded in (("replicated", False), ("sharded", True)):
        model = mlp(X, Y)
        set_weights(model, dict(numpy.load(out / "checkpoint-single-weights.npz")))
        opt = dist_opt.Adam(**hyper(), sharded=sharded)
        opt.from_disk(out / "checkpoint-single.bin")
        exact = opt.to_bytes() == data_bytes
        opt.remap_keys(dict(zip(saved_keys, [k for k, _, _ in params(model)])))
        train(model, opt, data, range(CHECKPOINT_B, TOTAL), rank, world)
        save(out, f"resumed-{name}-rank{rank}", model, opt, exact_reload=exact,
             state_nbytes=opt.state_nbytes())


CKPT_STEPS, CKPT_AT = 30, 13


def _dropout_mlp(X, Y):
    from thinc.api import Dropout

    fix_random_seed(0)
    model = chain(Relu(32), Dropout(0.2), Relu(32), Softmax())
    model.initialize(X=X[:5], Y=Y[:5])
    return model


def scenario_thinc_checkpoint_save(out):
    """2 ranks, a model with dropout: train CKPT_STEPS steps, optim.thinc.save_checkpoint
    after step CKPT_AT's update; replicated and sharded."""
    from optim.thinc import save_checkpoint

    group = dist_opt.join(timeout=60)
    rank, world = group.rank, group.world_size
    data = data_cache()
    for name, sharded in (("replicated", False), ("sharded", True)):
        model = _dropout_mlp(data[0], data[1])
        opt = dist_opt.Adam(**hyper(), sharded=sharded)
        numpy.random.seed(100 + rank)  # each rank its own dropout stream
        train(model, opt, data, range(CKPT_AT), rank, world)
        save_checkpoint(out / f"thinc-{name}.ckpt", model, opt, step=CKPT_AT)
        train(model, opt, data, range(CKPT_AT, CKPT_STEPS), rank, world)
        numpy.savez(out / f"thinc-{name}-straight-rank{rank}.npz", **weights_of(model))


def scenario_thinc_checkpoint_resume(out):
    """2 ranks: load_checkpoint into a model rebuilt with other ids, train to CKPT_STEPS."""
    from optim.thinc import load_checkpoint

    group = dist_opt.join(timeout=60)
    rank, world = group.rank, group.world_size
    data = data_cache()
    for name, sharded in (("replicated", False), ("sharded", True)):
        [_dropout_mlp(data[0], data[1]) for _ in range(2)]  # other ids than when saved
        model = _dropout_mlp(data[0], data[1])
        opt = dist_opt.Adam(**hyper(), sharded=sharded)
        opt, extra = load_checkpoint(out / f"thinc-{name}.ckpt", model, opt)
        train(model, opt, data, range(extra["step"], CKPT_STEPS), rank, world)
        numpy.savez(out / f"thinc-{name}-resumed-rank{rank}.npz", **weights_of(model))


GROUP_STEPS = 24
POISON_STEP = 7  # rank 0 puts a NaN into the first layer's W gradient; the all-reduce
# gives it to every rank: every rank (or the key's owner) skips that update


def _groups_run(out, name, sharded, omit):
    """2 ranks, step_many, groups (the first Relu at half the rate, the Softmax bias
    frozen), nonfinite="skip"; omit=True leaves the poisoned key out of that step."""
    group = dist_opt.join(timeout=60)
    rank, world = group.rank, group.world_size
    data = data_cache()
    X, Y, _, _, batches = data
    model = mlp(X, Y)
    initial = weights_of(model)
    opt = dist_opt.Adam(**hyper(), sharded=sharded, nonfinite="skip",
                        groups=[{"match": "relu/*", "learn_rate_scale": 0.5},
                                {"match": "softmax/b", "frozen": True}])
    relu_w = [n for n in model.walk() if n.name == "relu"][0]
    poisoned = (relu_w.id, "W")
    opt.bind({key: ("relu/W" if key == poisoned else f"{node.name}/{key[1]}")
              for key, _, node in params(model)})
    for step in range(GROUP_STEPS):
        part = numpy.array_split(batches[step], world)[rank]
        backprop_part(model, X, Y, part, len(part))
        items = params(model)
        if step == POISON_STEP and rank == 0 and not omit:
            relu_w.get_grad("W")[3, 5] = numpy.nan
        if step == POISON_STEP and omit:
            items = [item for item in items if item[0] != poisoned]
            relu_w.get_grad("W")[...] = 0
        opt.step_many([k for k, _, _ in items], [n.get_param(k[1]) for k, _, n in items],
                      [n.get_grad(k[1]) for k, _, n in items])
        opt.step_schedules()
    numpy.savez(out / f"groups-{name}-rank{rank}.npz", **weights_of(model))
    numpy.savez(out / f"groups-{name}-initial-rank{rank}.npz", **initial)
    info = {"skipped": opt.skipped_total, "paths": sorted(opt.paths.values())}
    (out / f"groups-{name}-rank{rank}.json").write_text(json.dumps(info))


def _by_hand_run(out):
    """The groups run's oracle: two plain sharded optimizers (the Relus' at half the
    rate) and the Softmax bias left alone (its gradient zeroed), the poisoned update of
    the first Relu's W left out."""
    group = dist_opt.join(timeout=60)
    rank, world = group.rank, group.world_size
    X, Y, _, _, batches = data_cache()
    model = mlp(X, Y)
    settings = hyper()
    rate = settings.pop("learn_rate")
    fast = dist_opt.Adam(learn_rate=rate, **settings, sharded=True)
    slow = dist_opt.Adam(learn_rate=[rate(s) * 0.5 for s in range(GROUP_STEPS + 1)],
                         **settings, sharded=True)
    relu_w = [n for n in model.walk() if n.name == "relu"][0]
    poisoned = (relu_w.id, "W")
    for step in range(GROUP_STEPS):
        part = numpy.array_split(batches[step], world)[rank]
        backprop_part(model, X, Y, part, len(part))
        items = params(model)
        if step == POISON_STEP:
            items = [item for item in items if item[0] != poisoned]
            relu_w.get_grad("W")[...] = 0
        for opt, pick in ((slow, lambda n: n.name == "relu"),
                          (fast, lambda n: n.name == "softmax")):
            mine = [(k, n) for k, _, n in items if pick(n)
                    and not (n.name == "softmax" and k[1] == "b")]
            opt.step_many([k for k, _ in mine], [n.get_param(k[1]) for k, n in mine],
                          [n.get_grad(k[1]) for k, n in mine])
        for node in model.walk():
            if node.name == "softmax":
                node.get_grad("b")[...] = 0
        fast.step_schedules()
        slow.step_schedules()
    numpy.savez(out / f"groups-by_hand-rank{rank}.npz", **weights_of(model))


def scenario_groups_skip(out):
    for name, sharded, omit in (("replicated", False, False), ("sharded", True, False),
                                ("omitted", False, True)):
        _groups_run(out, name, sharded, omit)
    _by_hand_run(out)


def scenario_hang(out):
    """Rank 1 stops participating at step 3; rank 0 must time out with a clear error."""
    _fail_scenario(out, lambda: time.sleep(120), timeout=3.0)


def _fail_scenario(out, misbehave, timeout=60.0):
    group = dist_opt.join(timeout=timeout)
    rank, world = group.rank, group.world_size
    data = data_cache()
    model = mlp(data[0], data[1])
    opt = dist_opt.Adam(**hyper())
    start = time.perf_counter()

    def at_3(step):
        nonlocal start
        if rank == 1:
            misbehave()
        start = time.perf_counter()

    try:
        train(model, opt, data, range(10), rank, world, at_step={3: at_3})
        result = {"error": None}
    except dist_opt.DistributedError as err:
        result = {"error": str(err), "type": type(err).__name__}
    result["seconds"] = time.perf_counter() - start
    (out / f"fail-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    globals()["scenario_" + sys.argv[1]](Path(sys.argv[2]))
