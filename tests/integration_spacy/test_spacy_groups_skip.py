"""Per-parameter groups and the non-finite skip through `python -m optim.spacy_train`
(issues 21 and 22, the spaCy parts).

The pipeline is tests/integration_spacy/spacy_resume_code.py's tok2vec + tagger + textcat. The launcher binds
the optimizer to the pipeline, so `[training.optimizer.groups.NAME]` tables match paths
such as `tagger/softmax/W`. A non-finite gradient is made by
`optim_resume_test.poison_gradient.v1` (spacy_resume_code.py), a `[training.before_update]`
callback that sets one parameter's gradient to NaN before chosen steps' updates (the
backprop adds into it, so that gradient alone is NaN at those steps' `finish_update`).
"""
import re
import shutil
import subprocess
import sys

import numpy
import pytest

pytest.importorskip("spacy")

from test_spacy_resume import (  # noqa: E402
    CODE, HERE, _checkpoint_steps, _command, _env, _files, _kill_after, _run)

MAX_STEPS = 14  # rows at steps 0, 7 and 14
POISONED = "textcat/softmax/W"


def _config(tmp_path, groups="", optimizer="", before_update=None, name="config.cfg"):
    """The test pipeline's config with `[training.optimizer.groups.*]` tables (TOML-ish
    text), extra `[training.optimizer]` lines, and a poisoning before_update callback
    (its settings as text)."""
    sys.path.insert(0, str(HERE))
    try:
        from spacy_resume_code import CONFIG
    finally:
        sys.path.remove(str(HERE))
    text = CONFIG.replace("max_steps = 0", f"max_steps = {MAX_STEPS}")
    head = '[training.optimizer]\n@optimizers = "optim.Adam.v1"\n'
    assert head in text
    extra = optimizer + ("\n[training.optimizer.groups]\n" + groups if groups else "")
    text = text.replace(head, head + extra + "\n")
    if before_update is not None:
        text = text.replace("before_update = null\n", "\n[training.before_update]\n"
                            '@callbacks = "optim_resume_test.poison_gradient.v1"\n'
                            f'path = "{POISONED}"\n{before_update}\n')
    path = tmp_path / name
    path.write_text(text)
    return path


def _weights(nlp):
    """`{component/walk index/param: array}` of every parameter of the pipeline."""
    out = {}
    for component, proc in nlp.components:
        model = getattr(proc, "model", None)
        for i, node in enumerate(model.walk() if hasattr(model, "walk") else []):
            for name in node.param_names:
                if node.has_param(name):
                    out[f"{component}/{i}/{name}"] = numpy.array(node.get_param(name))
    return out


def _initial_weights(config):
    """The weights `init_nlp` gives the config's pipeline: the same seed, so those the
    launcher starts from."""
    from spacy.training.initialize import init_nlp
    from thinc.api import Config

    sys.path.insert(0, str(HERE))
    try:
        import spacy_resume_code  # noqa: F401 (the registered reader and callback)
    finally:
        sys.path.remove(str(HERE))
    return _weights(init_nlp(Config().from_disk(config)))


def _saved_weights(directory):
    import spacy

    return _weights(spacy.load(directory))


GROUPS = '''
[training.optimizer.groups.encoder]
match = "tok2vec/*"
learn_rate_scale = 0.2

[training.optimizer.groups.biases]
match = "*/b"
L2 = 0.0

[training.optimizer.groups.head]
match = "tagger/*"
frozen = true
'''


def test_a_frozen_group_keeps_every_tagger_weight_bitwise(tmp_path):
    config = _config(tmp_path, groups=GROUPS)
    code, out, err = _run(_command(config, tmp_path / "out"))
    assert code == 0, out[-2000:] + err[-3000:]
    assert "skipped" not in out  # nonfinite = "apply": no skip report
    initial = _initial_weights(config)
    tagger = [name for name in initial if name.startswith("tagger/")]
    assert len(tagger) == 2  # softmax W and b
    for directory in ("model-last", "model-best"):
        saved = _saved_weights(tmp_path / "out" / directory)
        assert sorted(saved) == sorted(initial)
        for name in tagger:
            assert saved[name].tobytes() == initial[name].tobytes(), (directory, name)
        changed = [n for n in saved if not numpy.array_equal(saved[n], initial[n])]
        assert any(n.startswith("textcat/") for n in changed), changed
        assert any(n.startswith("tok2vec/") for n in changed), changed
        assert not any(n.startswith("tagger/") for n in changed)


def test_a_group_that_matches_nothing_is_refused_before_anything_is_written(tmp_path):
    config = _config(tmp_path, groups='[training.optimizer.groups.head]\nmatch = "tager/*"\n'
                                      "frozen = true\n")
    code, out, err = _run(_command(config, tmp_path / "out", "--checkpoint-every", "5"))
    assert code == 2, out[-2000:] + err[-3000:]
    assert "group 'head'" in err and "'tager/*' matches no parameter" in err, err
    assert "tagger/softmax/W" in err or "tok2vec/hashembed/E" in err  # paths that exist
    assert "Traceback" not in err + out
    # refused before anything was written (the writability check leaves an empty folder)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_one_non_finite_gradient_is_skipped_reported_once_and_weights_stay_finite(tmp_path):
    config = _config(tmp_path, optimizer='nonfinite = "skip"\n', before_update="steps = [3]")
    code, out, err = _run(_command(config, tmp_path / "out"))
    assert code == 0, out[-2000:] + err[-3000:]
    assert_one_skip_at_step_3(out, [(0, 0), (1, 1), (0, 1)])  # rows of steps 0, 7, 14
    initial = _initial_weights(config)
    for directory in ("model-last", "model-best"):
        saved = _saved_weights(tmp_path / "out" / directory)
        assert all(numpy.isfinite(w).all() for w in saved.values()), directory
        [textcat_w] = [n for n in saved if n.startswith("textcat/") and n.endswith("/W")]
        assert not numpy.array_equal(saved[textcat_w], initial[textcat_w])  # it trained


def assert_one_skip_at_step_3(out, counts):
    """The run's console: one warning line naming the poisoned parameter, between the
    evaluation rows of steps 0 and 7, and after rows the counts (since, in all)."""
    warnings = [line for line in out.splitlines() if "skipped an update of" in line]
    assert warnings == [f"  warning: step 3 skipped an update of {POISONED}: its gradient "
                        'is not finite (nonfinite = "skip"; skips are counted after each '
                        "evaluation row)"], out
    found = [(int(a), int(b)) for a, b in re.findall(
        r"updates skipped since the last row: (\d+) \((\d+) in all\)", out)]
    assert found == counts, out
    lines = out.splitlines()
    row_of = [i for i, line in enumerate(lines) if re.match(r"\s+\d+\s+(0|7|14)\s", line)]
    assert row_of[0] < lines.index(warnings[0]) < row_of[1]


def test_the_consecutive_skip_limit_stops_the_run_with_status_3(tmp_path):
    config = _config(tmp_path, optimizer='nonfinite = "skip"\nmax_consecutive_skips = 2\n',
                     before_update="every_step = true")
    code, out, err = _run(_command(config, tmp_path / "out", "--checkpoint-every", "1"))
    assert code == 3, out[-2000:] + err[-3000:]
    assert "Traceback" not in err + out
    [line] = [line for line in err.splitlines() if line.startswith("optim.spacy_train:")]
    assert line.startswith("optim.spacy_train: stopped at step 1: 2 consecutive steps "
                           "skipped an update"), err
    assert "max_consecutive_skips=2" in line and f"{POISONED} at step 1" in line, err
    assert "No checkpoint was written for this step" in err
    assert out.count("skipped an update of") == 1
    assert _checkpoint_steps(tmp_path / "out") == [1]  # after step 0; none of step 1
    saved = _saved_weights(tmp_path / "out" / "model-last")  # as it stood: finite
    assert all(numpy.isfinite(w).all() for w in saved.values())


def test_resuming_with_groups_is_bitwise_and_changed_groups_are_refused_unless_allowed(
        tmp_path):
    config = _config(tmp_path, groups=GROUPS)
    code, out, err = _run(_command(config, tmp_path / "ref", "--checkpoint-every", "5"))
    assert code == 0, out[-2000:] + err[-3000:]
    command = _command(config, tmp_path / "out", "--checkpoint-every", "5", "--resume")
    killed, out, err = _kill_after(command, 5, 0.0)
    assert killed is None, out[-2000:] + err[-3000:]
    shutil.copytree(tmp_path / "out", tmp_path / "changed")
    before = _files(tmp_path / "out")
    # another group setting is a config change: refused, nothing touched
    code, out, err = _run(command + ["--training.optimizer.groups.encoder.learn_rate_scale",
                                     "0.5"])
    assert code == 2, out[-2000:] + err[-3000:]
    assert ("training.optimizer.groups.encoder.learn_rate_scale (checkpoint: 0.2, now: 0.5)"
            in err), err
    assert "--allow-config-change" in err and "Traceback" not in err
    other = _config(tmp_path, groups=GROUPS.replace("[training.optimizer.groups.head]",
                                                    "[training.optimizer.groups.classifier]"),
                    name="other.cfg")
    code, out, err = _run(_command(other, tmp_path / "out", "--checkpoint-every", "5",
                                   "--resume"))
    assert code == 2 and "training.optimizer.groups.classifier.match" in err, err
    assert "training.optimizer.groups.head.frozen" in err
    # the first match decides: the same tables in another order are another setting
    parts = GROUPS.strip().split("\n\n")
    reordered = _config(tmp_path, groups="\n\n".join(parts[2:] + parts[:2]) + "\n",
                        name="reordered.cfg")
    code, out, err = _run(_command(reordered, tmp_path / "out", "--checkpoint-every", "5",
                                   "--resume"))
    assert code == 2, out[-2000:] + err[-3000:]
    assert ("the order of training.optimizer.groups (checkpoint: encoder, biases, head; now: "
            "head, encoder, biases)") in err, err
    assert _files(tmp_path / "out") == before

    # the resumed process numbers its models from 3 further on: the optimizer keys the
    # checkpoint was written under are not this process's
    proc = subprocess.run(command, env={**_env(), "OPTIM_TEST_SHIFT_IDS": "3"},
                          capture_output=True, text=True, timeout=240)
    code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == 0 and "Resuming at step" in out, out[-2000:] + err[-3000:]
    for directory in ("model-last", "model-best"):
        assert _files(tmp_path / "ref" / directory) == _files(tmp_path / "out" / directory)
    # the tagger stayed frozen across the resume (the resumed optimizer is bound again)
    initial = _initial_weights(config)
    tagger = [n for n in initial if n.startswith("tagger/")]
    saved = _saved_weights(tmp_path / "out" / "model-last")
    assert all(saved[n].tobytes() == initial[n].tobytes() for n in tagger)

    # allowed: the run goes on with the config's groups (the tagger thaws)
    code, out, err = _run(_command(config, tmp_path / "changed", "--checkpoint-every", "5",
                                   "--resume", "--allow-config-change",
                                   "--training.optimizer.groups.head.frozen", "false"))
    assert code == 0, out[-2000:] + err[-3000:]
    assert ("continuing with a changed setting: training.optimizer.groups.head.frozen "
            "(checkpoint: True, now: False)") in out, out
    saved = _saved_weights(tmp_path / "changed" / "model-last")
    assert all(saved[n].tobytes() != initial[n].tobytes() for n in tagger)


def test_optim_train_via_spacy_cli_binds_too(tmp_path):
    config = _config(tmp_path, groups='[training.optimizer.groups.head]\nmatch = "tager/*"\n'
                                      "frozen = true\n")
    code, out, err = _run([sys.executable, "-m", "spacy", "optim-train", str(config),
                           "--output", str(tmp_path / "out"), "--code", str(CODE)])
    assert code == 2 and "group 'head'" in err and "Traceback" not in err, err[-3000:]


def test_nonfinite_raise_stops_the_run_with_status_3_naming_the_parameter(tmp_path):
    config = _config(tmp_path, optimizer='nonfinite = "raise"\n', before_update="steps = [3]")
    code, out, err = _run(_command(config, tmp_path / "out"))
    assert code == 3, out[-2000:] + err[-3000:]
    assert "Traceback" not in err + out
    assert "optim.spacy_train: stopped at step 3: key " in err and f"({POISONED})" in err, err
    assert "holds a NaN at step 3" in err and "nonfinite='raise'" in err, err
    saved = _saved_weights(tmp_path / "out" / "model-last")
    assert all(numpy.isfinite(w).all() for w in saved.values())
