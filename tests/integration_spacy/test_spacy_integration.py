"""optim as a drop-in for spaCy training (issue 6).

* a config whose ``[training.optimizer]`` says ``@optimizers = "optim.Adam.v1"`` passes
  spaCy's schema and trains a text classifier through ``spacy.training.loop.train``;
* ``nlp.update(..., sgd=optimizer)``, ``nlp.initialize(sgd=...)`` and
  ``nlp.resume_training(sgd=...)`` work with an optim optimizer;
* save/resume: N steps of ``train``, ``nlp.to_disk`` + ``optimizer.to_disk``, then M more
  steps in a fresh interpreter from what was saved, equal bit for bit an uninterrupted
  N+M-step run.

The data is generated (a few hundred short texts, two classes decided by word counts), the
model is a small CNN text classifier, dropout is 0 and the data order is fixed, so the only
state that carries between steps is the weights and the optimizer.
"""
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

spacy = pytest.importorskip("spacy")
thinc_api = pytest.importorskip("thinc.api")

import optim  # noqa: E402
import optim.thinc  # noqa: E402
from spacy.training import Example  # noqa: E402
from thinc.api import Config  # noqa: E402

from textcat_data import texts  # noqa: E402

HERE = Path(__file__).resolve().parent

N_TRAIN = 320
N_DEV = 96
BATCH = 16


TRAIN = texts(N_TRAIN, 1)
DEV = texts(N_DEV, 2)


@spacy.registry.readers("optim_test.textcat_corpus.v1")
def textcat_corpus(split: str, offset: int = 0, cycle: bool = False):
    """Generated examples in a fixed order; with cycle, an endless stream from `offset`."""
    data = TRAIN if split == "train" else DEV

    def read(nlp):
        i = offset
        while cycle or i < len(data):
            text, cats = data[i % len(data)]
            yield Example.from_dict(nlp.make_doc(text), {"cats": cats})
            i += 1

    return read


@thinc_api.registry.optimizers("optim_test.load.v1")
def load_optimizer(path: str):
    """What a resumed `spacy train` names in [training.optimizer]: the saved optim state."""
    return _load(path)


def _rekey(opt, mapping):
    """The optimizer with its state moved from the keys of `mapping` to its values."""
    if hasattr(opt, "remap_keys"):
        return opt.remap_keys(mapping)
    from optim import serialize

    msg = opt.to_dict()
    for record in msg["keys"]:
        record["key"] = serialize.encode_key(mapping[serialize.decode_key(record["key"])])
    return optim.thinc.ThincOptimizer(optim.Optimizer.from_dict(msg))


def _load(path):
    """optim.load gives an optim.Optimizer; spaCy's schema wants a thinc.api.Optimizer."""
    return optim.thinc.ThincOptimizer(optim.load(path))


CONFIG = """
[paths]
train = null
dev = null

[system]
seed = 0
gpu_allocator = null

[nlp]
lang = "en"
pipeline = ["textcat"]
batch_size = 128

[components]

[components.textcat]
factory = "textcat"

[components.textcat.model]
@architectures = "spacy.TextCatReduce.v1"
exclusive_classes = true
use_reduce_first = false
use_reduce_last = false
use_reduce_max = true
use_reduce_mean = true
nO = null

[components.textcat.model.tok2vec]
@architectures = "spacy.HashEmbedCNN.v2"
pretrained_vectors = null
width = 32
depth = 1
embed_size = 500
window_size = 1
maxout_pieces = 2
subword_features = true

[corpora]

[corpora.train]
@readers = "optim_test.textcat_corpus.v1"
split = "train"
offset = 0
cycle = true

[corpora.dev]
@readers = "optim_test.textcat_corpus.v1"
split = "dev"

[training]
seed = ${system.seed}
gpu_allocator = ${system.gpu_allocator}
dropout = 0.0
accumulate_gradient = 1
patience = 0
max_epochs = -1
max_steps = 59
eval_frequency = 20
frozen_components = []
annotating_components = []
dev_corpus = "corpora.dev"
train_corpus = "corpora.train"
before_to_disk = null
before_update = null

[training.logger]
@loggers = "spacy.ConsoleLogger.v1"
progress_bar = false

[training.batcher]
@batchers = "spacy.batch_by_sequence.v1"
size = %(batch)d
get_length = null

[training.optimizer]
@optimizers = "optim.Adam.v1"
beta1 = 0.9
beta2 = 0.999
L2_is_weight_decay = true
L2 = 0.01
grad_clip = 1.0
use_averages = true
eps = 1e-08

[training.optimizer.learn_rate]
@schedules = "optim.warmup_linear.v1"
initial_rate = 0.01
warmup_steps = 10
total_steps = 200

[training.score_weights]
cats_macro_f = 1.0
cats_macro_auc = 0.0

[initialize]
""" % {"batch": BATCH}


def _config(max_steps=None):
    cfg = Config().from_str(CONFIG, interpolate=False)
    if max_steps is not None:
        cfg["training"]["max_steps"] = max_steps
    return cfg


def _train_capturing_optimizer(nlp):
    """Run spacy.training.loop.train and hand back the optimizer it resolved and used.

    train() builds the optimizer from [training.optimizer] and keeps it local; we wrap
    the module's train_while_improving (which train() calls) to see what it was given.
    """
    from spacy.training import loop

    seen = []
    original = loop.train_while_improving

    def spy(nlp_, optimizer, *args, **kwargs):
        seen.append(optimizer)
        return original(nlp_, optimizer, *args, **kwargs)

    loop.train_while_improving = spy
    out, err = io.StringIO(), io.StringIO()
    try:
        loop.train(nlp, None, stdout=out, stderr=err)
    finally:
        loop.train_while_improving = original
    assert len(seen) == 1
    return seen[0], out.getvalue()


def _param_keys(nlp):
    model = nlp.get_pipe("textcat").model
    return [
        (node.id, name)
        for node in model.walk()
        for name in node.param_names
        if node.has_param(name)
    ]


def _weights(nlp):
    model = nlp.get_pipe("textcat").model
    return {
        f"{i}:{node.name}:{name}": numpy.asarray(node.get_param(name))
        for i, node in enumerate(model.walk())
        for name in node.param_names
        if node.has_param(name)
    }


def _scores(nlp, optimizer):
    dev = list(textcat_corpus("dev")(nlp))
    plain = nlp.evaluate(dev)
    with nlp.use_params(optimizer.averages):
        averaged = nlp.evaluate(dev)
    keep = ("cats_macro_f", "cats_macro_auc", "cats_score")
    return {"plain": {k: plain[k] for k in keep}, "averaged": {k: averaged[k] for k in keep}}


# --------------------------------------------------------------------- config and train


def test_spacy_schema_accepts_optim_optimizer():
    from spacy.schemas import ConfigSchemaTraining
    from spacy.util import load_model_from_config, registry

    nlp = load_model_from_config(_config(), auto_fill=True)
    T = registry.resolve(nlp.config.interpolate()["training"], schema=ConfigSchemaTraining)
    opt = T["optimizer"]
    assert type(opt).__module__.split(".")[0] == "optim"
    assert isinstance(opt, thinc_api.Optimizer)
    assert opt.learn_rate == pytest.approx(0.0)  # warmup_linear at step 0
    opt.step_schedules()
    assert opt.learn_rate == pytest.approx(0.001)
    # Language.create_optimizer reads the same [training.optimizer] block
    assert type(nlp.create_optimizer()).__module__.split(".")[0] == "optim"


def test_train_loop_with_optim_adam():
    from spacy.training.initialize import init_nlp

    nlp = init_nlp(_config(max_steps=59))
    opt, log = _train_capturing_optimizer(nlp)
    assert isinstance(opt, thinc_api.Optimizer)
    assert isinstance(opt.optimizer, optim.Optimizer)
    assert "Initial learn rate: 0.0" in log
    # 60 updates of a warmup_linear schedule: the learn rate moved with step_schedules
    assert opt.learn_rate == pytest.approx(0.01 * (200 - 60) / 190)
    assert opt.averages and set(opt.averages) == set(_param_keys(nlp))
    scores = _scores(nlp, opt)
    assert scores["averaged"]["cats_macro_f"] > 0.9, scores
    assert scores["plain"]["cats_macro_f"] > 0.9, scores


# ---------------------------------------------------- nlp.update / resume_training / init


def _blank_textcat():
    thinc_api.fix_random_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "textcat",
        config={
            "model": {
                "@architectures": "spacy.TextCatBOW.v3",
                "exclusive_classes": True,
                "ngram_size": 1,
                "no_output_layer": False,
                "length": 4096,
            }
        },
    )
    examples = [Example.from_dict(nlp.make_doc(t), {"cats": c}) for t, c in TRAIN]
    return nlp, examples


@pytest.mark.parametrize("make", [lambda: optim.SGD(learn_rate=1.0),
                                  lambda: optim.Adam(learn_rate=0.01)], ids=["SGD", "Adam"])
def test_nlp_update_with_sgd(make):
    """spaCy's `sgd=` argument takes any optim optimizer: SGD and Adam train."""
    nlp, examples = _blank_textcat()
    opt = make()
    assert nlp.initialize(lambda: examples, sgd=opt) is opt
    first = last = None
    for epoch in range(4):
        losses = {}
        for i in range(0, len(examples), BATCH):
            nlp.update(examples[i : i + BATCH], sgd=opt, losses=losses, drop=0.0)
        first = losses["textcat"] if first is None else first
        last = losses["textcat"]
    assert last < 0.5 * first
    assert set(opt.averages) == set(_param_keys(nlp))
    scores = _scores(nlp, opt)
    assert scores["averaged"]["cats_macro_f"] > 0.9, scores


def test_resume_training_with_sgd():
    nlp, examples = _blank_textcat()
    nlp.initialize(lambda: examples)
    opt = optim.SGD(0.5)
    assert nlp.resume_training(sgd=opt) is opt
    before = {k: v.copy() for k, v in _weights(nlp).items()}
    losses = {}
    for i in range(0, len(examples), BATCH):
        nlp.update(examples[i : i + BATCH], losses=losses, drop=0.0)  # uses nlp._optimizer
    after = _weights(nlp)
    assert any(not numpy.array_equal(before[k], after[k]) for k in before)
    assert set(opt.averages) == set(_param_keys(nlp))  # the updates went through `opt`
    # rehearse() reads sgd.learn_rate
    nlp.rehearse(examples[:BATCH], sgd=opt, losses=losses)
    assert "textcat" in losses


# ------------------------------------------------------------------------- save/resume

N_STEPS = 24
M_STEPS = 24

_PHASE = textwrap.dedent(
    r"""
    import json, sys
    from pathlib import Path
    import numpy
    sys.path[:0] = [{here!r}, {tests!r}]
    import test_spacy_integration as t
    t._phase({args!r})
    """
)


def _phase(args):
    """One training phase, run in its own interpreter (see test_save_and_resume)."""
    import spacy as _spacy
    from spacy.training.initialize import init_nlp

    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    if args["resume_from"] is None:
        nlp = init_nlp(_config(max_steps=args["steps"] - 1))
    else:
        src = Path(args["resume_from"])
        nlp = _spacy.load(src / "nlp")
        cfg = nlp.config.copy()
        cfg["training"]["max_steps"] = args["steps"] - 1
        cfg["corpora"]["train"]["offset"] = args["offset"]
        saved_keys = [tuple(k) for k in json.loads((src / "keys.json").read_text())]
        new_keys = _param_keys(nlp)
        # Thinc keys parameters by (model id, name). Ids come from a per-process counter
        # and depend on the pipeline's history (initialize() rebuilds resized output
        # layers), so the reloaded pipeline's ids differ from the saved ones: map them
        # through the parameters' order in model.walk(), which is the same.
        assert [k[1] for k in new_keys] == [k[1] for k in saved_keys]
        opt = _rekey(_load(src / "optimizer"), dict(zip(saved_keys, new_keys)))
        assert set(opt.averages) == set(new_keys)
        opt.to_disk(out / "optimizer-rekeyed")
        cfg["training"]["optimizer"] = {
            "@optimizers": "optim_test.load.v1",
            "path": str(out / "optimizer-rekeyed"),
        }
        nlp.config = cfg
    opt, _ = _train_capturing_optimizer(nlp)
    if args["save"]:
        nlp.to_disk(out / "nlp")
        opt.to_disk(out / "optimizer")
        (out / "keys.json").write_text(json.dumps(_param_keys(nlp)))
    numpy.savez(out / "weights.npz", **_weights(nlp))
    with nlp.use_params(opt.averages):
        numpy.savez(out / "averaged.npz", **_weights(nlp))
    (out / "scores.json").write_text(
        json.dumps({"scores": _scores(nlp, opt), "learn_rate": opt.learn_rate})
    )


def _run_phase(tmp_path, **args):
    proc = subprocess.run(
        [sys.executable, "-c", _PHASE.format(here=str(HERE), tests=str(HERE.parent), args=args)],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = Path(args["out"])
    return (
        dict(numpy.load(out / "weights.npz")),
        dict(numpy.load(out / "averaged.npz")),
        json.loads((out / "scores.json").read_text()),
    )


def test_save_and_resume_matches_uninterrupted_run(tmp_path):
    full = _run_phase(
        tmp_path, out=str(tmp_path / "full"), steps=N_STEPS + M_STEPS,
        resume_from=None, offset=0, save=False,
    )
    _run_phase(
        tmp_path, out=str(tmp_path / "first"), steps=N_STEPS,
        resume_from=None, offset=0, save=True,
    )
    resumed = _run_phase(
        tmp_path, out=str(tmp_path / "resumed"), steps=M_STEPS,
        resume_from=str(tmp_path / "first"), offset=N_STEPS * BATCH, save=False,
    )
    (w_full, a_full, s_full), (w_res, a_res, s_res) = full, resumed
    assert sorted(w_full) == sorted(w_res) and len(w_full) >= 8
    for name in w_full:
        # bit for bit: same float32 operations in the same order on the same state
        numpy.testing.assert_array_equal(w_res[name], w_full[name], err_msg=name)
        numpy.testing.assert_array_equal(a_res[name], a_full[name], err_msg=name)
    assert s_res == s_full
    assert s_full["scores"]["averaged"]["cats_macro_f"] > 0.8
