"""optim where spaCy users live (issue 26): a pipeline that holds an optim optimizer
pickles, copies and trains on bitwise; `nlp.pipe(n_process=2)` under the spawn start
method returns; plain `python -m spacy train` binds path groups and reports skipped
updates with `[training.before_update] @callbacks = "optim.bind.v1"`."""
import copy
import pickle
import subprocess
import sys
import textwrap

import numpy
import pytest

spacy = pytest.importorskip("spacy")

from spacy.training import Example  # noqa: E402

import optim.thinc  # noqa: E402
from test_spacy_groups_skip import (  # noqa: E402
    GROUPS, _config, _initial_weights, _saved_weights, assert_one_skip_at_step_3)
from test_spacy_resume import CODE, _run  # noqa: E402

TEXTS = [("a good film", 1.0), ("an awful day", 0.0), ("great and bright", 1.0),
         ("sad grim road", 0.0)]


def _pipeline():
    nlp = spacy.blank("en")
    nlp.add_pipe("textcat")
    examples = [Example.from_dict(nlp.make_doc(text), {"cats": {"POS": pos, "NEG": 1 - pos}})
                for text, pos in TEXTS]
    nlp.initialize(lambda: examples, sgd=optim.thinc.Adam(0.01))
    return nlp, examples


def _train(nlp, examples, steps):
    for _ in range(steps):
        nlp.update(examples, drop=0.0, sgd=nlp._optimizer)
        nlp._optimizer.step_schedules()


def _params(nlp):
    model = nlp.get_pipe("textcat").model
    return [node.get_param(n).tobytes() for node in model.walk() for n in node.param_names
            if node.has_param(n)]


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_pipeline_holding_an_optim_optimizer_pickles_and_trains_on_bitwise(how):
    nlp, examples = _pipeline()
    _train(nlp, examples, 3)
    assert isinstance(nlp._optimizer, optim.thinc.ThincOptimizer)
    other = pickle.loads(pickle.dumps(nlp)) if how == "pickle" else copy.deepcopy(nlp)
    assert isinstance(other._optimizer, optim.thinc.ThincOptimizer)
    assert other._optimizer.optimizer is not nlp._optimizer.optimizer
    assert _params(other) == _params(nlp)
    _train(other, examples, 3)
    _train(nlp, examples, 3)
    assert _params(other) == _params(nlp)
    assert other._optimizer.to_bytes() == nlp._optimizer.to_bytes()
    assert [d.cats for d in other.pipe(t for t, _ in TEXTS)] == \
        [d.cats for d in nlp.pipe(t for t, _ in TEXTS)]


def test_nlp_pipe_with_two_processes_under_spawn_returns(tmp_path):
    """spawn (macOS's and Windows' default) pickles nlp for each worker; a worker that
    cannot unpickle it dies and spaCy waits forever: the timeout is the failure."""
    script = tmp_path / "pipe_spawn.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, sys
        sys.path.insert(0, {str(CODE.parent)!r})
        from test_spacy_dropin import TEXTS, _pipeline, _train

        if __name__ == "__main__":
            multiprocessing.set_start_method("spawn", force=True)
            nlp, examples = _pipeline()
            _train(nlp, examples, 2)
            texts = [t for t, _ in TEXTS] * 8
            alone = [d.cats for d in nlp.pipe(texts)]
            pooled = [d.cats for d in nlp.pipe(texts, n_process=2, batch_size=4)]
            print("same" if pooled == alone else "differ", len(pooled))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["same", str(len(TEXTS) * 8)], done.stdout


def _spacy_train(config, output):
    return _run([sys.executable, "-m", "spacy", "train", str(config), "--output", str(output),
                 "--code", str(CODE)])


def _with_bind(path, callback=None):
    """The config at `path` with its before_update wrapped by optim.bind.v1."""
    text = path.read_text()
    if callback is None:
        assert "before_update = null\n" in text
        text = text.replace("before_update = null\n", "\n[training.before_update]\n"
                            '@callbacks = "optim.bind.v1"\n')
    else:
        head = '[training.before_update]\n@callbacks = "optim_resume_test.poison_gradient.v1"\n'
        assert head in text
        text = text.replace(head, '[training.before_update]\n@callbacks = "optim.bind.v1"\n'
                            '\n[training.before_update.callback]\n'
                            '@callbacks = "optim_resume_test.poison_gradient.v1"\n')
    path.write_text(text)
    return path


def test_plain_spacy_train_with_the_bind_line_freezes_a_group_bitwise(tmp_path):
    config = _with_bind(_config(tmp_path, groups=GROUPS))
    code, out, err = _spacy_train(config, tmp_path / "out")
    assert code == 0, out[-2000:] + err[-3000:]
    assert "was not bound" not in err  # the unbound-groups warning did not fire
    initial = _initial_weights(config)
    tagger = [name for name in initial if name.startswith("tagger/")]
    assert len(tagger) == 2
    saved = _saved_weights(tmp_path / "out" / "model-last")
    for name in tagger:
        assert saved[name].tobytes() == initial[name].tobytes(), name
    changed = [n for n in saved if not numpy.array_equal(saved[n], initial[n])]
    assert any(n.startswith("textcat/") for n in changed)
    assert any(n.startswith("tok2vec/") for n in changed)


def test_plain_spacy_train_without_the_line_warns_and_names_it(tmp_path):
    config = _config(tmp_path, groups=GROUPS)
    code, out, err = _spacy_train(config, tmp_path / "out")
    assert code == 0, out[-2000:] + err[-3000:]
    assert "this optimizer was not bound" in err, err[-3000:]
    assert '[training.before_update] @callbacks = "optim.bind.v1"' in err
    initial = _initial_weights(config)
    saved = _saved_weights(tmp_path / "out" / "model-last")
    tagger = [name for name in initial if name.startswith("tagger/")]
    assert tagger and all(saved[n].tobytes() != initial[n].tobytes() for n in tagger)


def test_plain_spacy_train_with_a_typo_in_a_group_stops_naming_it(tmp_path):
    config = _with_bind(_config(tmp_path, groups='[training.optimizer.groups.head]\n'
                                                 'match = "tager/*"\nfrozen = true\n'))
    code, out, err = _spacy_train(config, tmp_path / "out")
    assert code != 0
    assert "optim.bind.v1" in err and "group 'head'" in err and "'tager/*'" in err, err


def test_plain_spacy_train_reports_skipped_updates_and_calls_the_wrapped_callback(tmp_path):
    config = _with_bind(_config(tmp_path, optimizer='nonfinite = "skip"\n',
                                before_update="steps = [3]"), callback=True)
    code, out, err = _spacy_train(config, tmp_path / "out")
    assert code == 0, out[-2000:] + err[-3000:]
    assert_one_skip_at_step_3(out, [(0, 0), (1, 1)])  # rows of steps 0 and 7 (14 is last)
    assert out.rstrip().endswith("optim: updates skipped (non-finite gradients): 1 in all")
    saved = _saved_weights(tmp_path / "out" / "model-last")
    assert all(numpy.isfinite(w).all() for w in saved.values())
