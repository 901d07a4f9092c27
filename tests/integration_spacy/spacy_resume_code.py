"""A small spaCy pipeline for the resume tests (imported through --code): a generated
corpus with tags and categories, and the config of a tok2vec + tagger + textcat pipeline
with dropout, compounding batch sizes, several epochs and gradient accumulation."""
import os
import random
from typing import List

import numpy
import spacy
from spacy.training import Example
from thinc.api import Linear

NOUN = "film book day meal place story cat dog house road".split()
VERB = "was is seemed felt looked became stayed grew".split()
POSITIVE = "good great fine lovely superb nice happy bright warm pleasant".split()
NEGATIVE = "bad awful poor nasty dreadful grim sad dark cold unpleasant".split()
DET = "the a this that".split()


def sentences(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags, score = [], [], 0
        for _ in range(rng.randint(1, 3)):
            adj = rng.choice(POSITIVE + NEGATIVE)
            score += 1 if adj in POSITIVE else -1
            for word, tag in ((rng.choice(DET), "DET"), (rng.choice(NOUN), "NOUN"),
                              (rng.choice(VERB), "VERB"), (adj, "ADJ")):
                words.append(word)
                tags.append(tag)
        pos = score > 0 or (score == 0 and rng.random() < 0.5)
        out.append((words, tags, {"POSITIVE": float(pos), "NEGATIVE": float(not pos)}))
    return out


DATA = {"train": sentences(160, 1), "dev": sentences(48, 2)}

# Thinc numbers models from a per-process counter: a process that built other models first
# gives the same pipeline other ids (and so other optimizer keys), as after a restart in
# a program that builds more than the pipeline. OPTIM_TEST_SHIFT_IDS=N builds N first.
for _ in range(int(os.environ.get("OPTIM_TEST_SHIFT_IDS", "0"))):
    Linear(1, 1)


@spacy.registry.readers("optim_resume_test.corpus.v1")
def corpus(split: str, poison_step: int = -1):
    def read(nlp):
        for words, tags, cats in DATA[split]:
            doc = spacy.tokens.Doc(nlp.vocab, words=words)
            yield Example.from_dict(doc, {"tags": tags, "cats": cats})

    return read


@spacy.registry.callbacks("optim_resume_test.poison_gradient.v1")
def poison_gradient(path: str, steps: List[int] = [], every_step: bool = False):
    """A `[training.before_update]` callback that makes one parameter's gradient NaN at
    the given steps (every step with every_step=true), for the non-finite skip tests.

    It runs before the step's `nlp.update`: it sets the gradient of the parameter whose
    optimizer path (`<component>/<node name>/<param>`) is `path` to NaN, and the
    update's backprop adds into it (Thinc's `inc_grad`), so at that step's
    `finish_update` that gradient, and no other, is NaN."""

    def before_update(nlp, args):
        if not (every_step or args["step"] in steps):
            return
        from optim.settings.naming import param_paths

        matches = [key for key, p in param_paths(nlp).items() if p == path]
        assert len(matches) == 1, f"{path}: {len(matches)} parameters have this path"
        node_id, name = matches[0]
        for _, proc in nlp.components:
            for node in getattr(getattr(proc, "model", None), "walk", lambda: [])():
                if node.id == node_id:
                    node.set_grad(name, node.ops.alloc(node.get_param(name).shape) + numpy.nan)
                    return

    return before_update


@spacy.registry.callbacks("optim_resume_test.record_steps.v1")
def record_steps():
    """A `[training.before_update]` callback that leaves a trace in the saved pipeline:
    `nlp.meta["optim_test_before_update"]` counts its calls and holds the last call's
    step and epoch (meta.json of model-last and model-best)."""

    def before_update(nlp, args):
        record = nlp.meta.setdefault("optim_test_before_update", {"calls": 0})
        record.update(calls=record["calls"] + 1, step=args["step"], epoch=args["epoch"])

    return before_update


CONFIG = """
[paths]
train = null
dev = null

[system]
seed = 7
gpu_allocator = null

[nlp]
lang = "en"
pipeline = ["tok2vec", "tagger", "textcat"]
batch_size = 64

[components]

[components.tok2vec]
factory = "tok2vec"

[components.tok2vec.model]
@architectures = "spacy.HashEmbedCNN.v2"
pretrained_vectors = null
width = 32
depth = 1
embed_size = 300
window_size = 1
maxout_pieces = 2
subword_features = true

[components.tagger]
factory = "tagger"

[components.tagger.model]
@architectures = "spacy.Tagger.v2"
nO = null

[components.tagger.model.tok2vec]
@architectures = "spacy.Tok2VecListener.v1"
width = 32
upstream = "*"

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
@architectures = "spacy.Tok2VecListener.v1"
width = 32
upstream = "*"

[corpora]

[corpora.train]
@readers = "optim_resume_test.corpus.v1"
split = "train"

[corpora.dev]
@readers = "optim_resume_test.corpus.v1"
split = "dev"

[training]
seed = ${system.seed}
gpu_allocator = ${system.gpu_allocator}
dropout = 0.2
accumulate_gradient = 2
patience = 0
max_epochs = 4
max_steps = 0
eval_frequency = 7
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
@batchers = "spacy.batch_by_words.v1"
discard_oversize = false
tolerance = 0.2
get_length = null

[training.batcher.size]
@schedules = "compounding.v1"
start = 60
stop = 400
compound = 1.05

[training.optimizer]
@optimizers = "optim.Adam.v1"

[training.score_weights]
tag_acc = 0.5
cats_macro_f = 0.5

[initialize]
"""
