"""`python -m optim.spacy_train --checkpoint-every N [--resume]` (issue 15).

The contract: a run killed any number of times (SIGKILL, at random moments) and resumed
ends bitwise equal to the run that never stopped: every file of `model-last` and
`model-best` (weights, and the scores in meta.json). The pipeline is tok2vec + tagger +
textcat with dropout, compounding batch sizes, several epochs, gradient accumulation and
Thinc's Adam defaults (clipping, averages). Also: the uninterrupted launcher gives `spacy
train`'s files bit for bit, on that pipeline and on a fine-tuning of it (sourced, frozen
and annotating components, a `before_update` callback, stopped by `patience` or by
`max_steps`; killed and resumed too), SIGTERM stops at a step boundary with a checkpoint,
and each bad input (changed config, damaged checkpoint, empty or unwritable DIR, another
pipeline, a newer format) does the documented thing.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("spacy")

HERE = Path(__file__).resolve().parent
# The folder holding the optim this process imported (not the checkout: in an unpacked
# sdist that holds the uncompiled sources).
OPTIM_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__import__("optim").__file__)))
CODE = HERE / "spacy_resume_code.py"
EPOCHS = 24  # about 100 steps


def _config_text(distributed=False, sharded=False):
    sys.path.insert(0, str(HERE))
    try:
        from spacy_resume_code import CONFIG
    finally:
        sys.path.remove(str(HERE))
    text = CONFIG.replace("max_epochs = 4", f"max_epochs = {EPOCHS}")
    if distributed:
        text = text.replace('@optimizers = "optim.Adam.v1"',
                            f'@optimizers = "optim.distributed.Adam.v1"\nsharded = '
                            f'{str(sharded).lower()}\nreduce = "sum"')
        text = text.replace('[corpora.train]\n@readers = "optim_resume_test.corpus.v1"\n'
                            'split = "train"',
                            '[corpora.train]\n@readers = "optim.sharded_corpus.v1"\n\n'
                            '[corpora.train.corpus]\n@readers = "optim_resume_test.corpus.v1"\n'
                            'split = "train"')
    return text


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLIS_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1",  # a killed run's output up to the kill
           "PYTHONPATH": os.pathsep.join([OPTIM_PATH, os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(config, output, *extra, ranks=1):
    head = [sys.executable, "-m", "optim.spacy_train"]
    if ranks > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                "-m", "optim.spacy_train"]
    return [*head, str(config), "--output", str(output), "--code", str(CODE), *extra]


def _run(command, timeout=240):
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _checkpoint_steps(output):
    root = Path(output) / "checkpoints"
    return sorted(int(p.stem[5:]) for p in root.glob("step-*.ckpt")) if root.is_dir() else []


def _kill_after(command, min_step, extra_delay, timeout=240):
    """Start `command` in its own session, wait until a checkpoint of `min_step` or
    later exists (with None: at once; or until the run ends), wait `extra_delay` more,
    SIGKILL the whole session. Returns the exit code (None if killed) and the output."""
    output = Path(command[command.index("--output") + 1])
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if min_step is None or any(s >= min_step for s in _checkpoint_steps(output)):
            time.sleep(extra_delay)
            break
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:  # torchrun's workers run in sessions of their own: kill the whole tree
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out, err = proc.communicate(timeout=60)
    return (None if killed else proc.returncode), out, err


def _descendants(pid):
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _assert_same_outputs(a, b):
    for name in ("model-last", "model-best"):
        files_a, files_b = _files(Path(a) / name), _files(Path(b) / name)
        assert sorted(files_a) == sorted(files_b), name
        differ = [f for f in files_a if files_a[f] != files_b[f]]
        assert not differ, f"{name}: {differ} differ"
    meta = json.loads((Path(a) / "model-best" / "meta.json").read_text())
    assert meta["performance"]["tag_acc"] > 0.9  # it trained


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run through the launcher (checkpointing every 5 steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = tmp / "config.cfg"
    config.write_text(_config_text())
    code, out, err = _run(_command(config, tmp / "out", "--checkpoint-every", "5"))
    assert code == 0, out[-2000:] + err[-3000:]
    return {"config": config, "output": tmp / "out", "stdout": out,
            "steps": _checkpoint_steps(tmp / "out")[-1]}


def test_uninterrupted_launcher_gives_spacy_trains_files(reference, tmp_path):
    code, out, err = _run([sys.executable, "-m", "spacy", "train", str(reference["config"]),
                           "--output", str(tmp_path), "--code", str(CODE)])
    assert code == 0, err[-3000:]
    _assert_same_outputs(reference["output"], tmp_path)
    # the final checkpoint marks the run finished, the last two are kept
    assert len(_checkpoint_steps(reference["output"])) == 2
    assert reference["steps"] > 60


FINE_TUNE_MAX_STEPS = {"patience": 150, "max_steps": 30}  # which setting stops the run
FINE_TUNE_PATIENCE = 20
FROZEN = ["tok2vec", "tagger"]


def _fine_tune_config_text(source, max_steps):
    """The test pipeline fine-tuned: every component sourced from `source`, tok2vec and
    tagger frozen and annotating (textcat's listener reads the frozen tok2vec's
    `doc.tensor`), textcat trained on at a higher learning rate, evaluations every 5
    steps, `patience`, `max_steps`, and the `optim_resume_test.record_steps.v1`
    before_update callback (a trace in meta.json)."""
    text = _config_text()
    head, rest = text.split("[components]\n", 1)
    _, tail = rest.split("[corpora]\n", 1)
    sourced = "".join(f'[components.{name}]\nsource = "{source}"\n\n'
                      for name in ("tok2vec", "tagger", "textcat"))
    text = f"{head}[components]\n\n{sourced}[corpora]\n{tail}"
    for old, new in (("patience = 0", f"patience = {FINE_TUNE_PATIENCE}"),
                     ("max_steps = 0", f"max_steps = {max_steps}"),
                     ("eval_frequency = 7", "eval_frequency = 5"),
                     ("frozen_components = []", f"frozen_components = {json.dumps(FROZEN)}"),
                     ("annotating_components = []",
                      f"annotating_components = {json.dumps(FROZEN)}"),
                     ("before_update = null\n", "\n[training.before_update]\n"
                      '@callbacks = "optim_resume_test.record_steps.v1"\n'),
                     ('@optimizers = "optim.Adam.v1"\n',
                      '@optimizers = "optim.Adam.v1"\nlearn_rate = 0.01\n')):
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    """The pipeline trained first (15 steps of `spacy train`); `fine_tune(stop)` runs
    `spacy train`'s fine-tuning of it (once per stop setting) and returns its config,
    output and source."""
    tmp = tmp_path_factory.mktemp("fine_tune")
    base = tmp / "base.cfg"
    base.write_text(_config_text())
    code, out, err = _run([sys.executable, "-m", "spacy", "train", str(base), "--output",
                           str(tmp / "base"), "--code", str(CODE), "--training.max_steps", "15"])
    assert code == 0, err[-3000:]
    source = tmp / "base" / "model-last"
    runs = {}

    def by_spacy(stop):
        if stop not in runs:
            config = tmp / f"{stop}.cfg"
            config.write_text(_fine_tune_config_text(source, FINE_TUNE_MAX_STEPS[stop]))
            code, out, err = _run([sys.executable, "-m", "spacy", "train", str(config),
                                   "--output", str(tmp / stop), "--code", str(CODE)])
            assert code == 0, err[-3000:]
            runs[stop] = {"config": config, "output": tmp / stop, "source": source}
        return runs[stop]

    return by_spacy


def _trace(output, name):
    """What the before_update callback left in `name`'s meta.json."""
    return json.loads((Path(output) / name / "meta.json").read_text())["optim_test_before_update"]


@pytest.mark.parametrize("stop", ["patience", "max_steps"])
def test_fine_tuning_through_the_launcher_gives_spacy_trains_files(fine_tune, tmp_path, stop):
    spacy_run = fine_tune(stop)
    code, out, err = _run(_command(spacy_run["config"], tmp_path / "out",
                                   "--checkpoint-every", "5"))
    assert code == 0, out[-2000:] + err[-3000:]
    _assert_same_outputs(spacy_run["output"], tmp_path / "out")
    assert f"Frozen components: {FROZEN}" in out
    assert f"Set annotations on update for: {FROZEN}" in out
    # what the comparison covered: the frozen components are the source's, byte for byte,
    # and the fine-tuned one is not; before_update ran once a step; the run stopped as set
    last, best = _trace(tmp_path / "out", "model-last"), _trace(tmp_path / "out", "model-best")
    for name in ("tok2vec", "tagger", "textcat"):
        saved = _files(tmp_path / "out" / "model-last" / name)
        assert (_files(spacy_run["source"] / name) == saved) == (name in FROZEN), name
    assert last["calls"] == last["step"] + 1 and best["calls"] == best["step"] + 1
    max_steps = FINE_TUNE_MAX_STEPS[stop]
    if stop == "patience":  # before max_steps and the last epoch: patience stopped it
        assert FINE_TUNE_PATIENCE <= last["step"] < max_steps and last["epoch"] < EPOCHS - 1
        assert 0 < best["step"] < last["step"], (best, last)  # it improved, then stalled
    else:
        assert last["step"] == max_steps
    # the final checkpoint follows the last step and marks the run finished
    assert _checkpoint_steps(tmp_path / "out")[-1] == last["step"] + 1


def test_fine_tuning_killed_and_resumed_gives_spacy_trains_files(fine_tune, tmp_path):
    spacy_run = fine_tune("patience")
    command = _command(spacy_run["config"], tmp_path / "out", "--checkpoint-every", "5",
                       "--resume")
    code, out, err = _kill_after(command, 30, random.Random(5).uniform(0.0, 0.3))
    assert code is None, out[-2000:] + err[-3000:]
    code, out, err = _run(command)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "Resuming at step" in out
    _assert_same_outputs(spacy_run["output"], tmp_path / "out")


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_at_random_moments_and_resumed_is_bitwise_the_uninterrupted_run(
        reference, tmp_path, seed):
    rng = random.Random(seed)
    command = _command(reference["config"], tmp_path / "out", "--checkpoint-every", "5",
                       "--resume")
    kills = []
    if seed == 1:  # a kill while loading, before the first checkpoint can exist
        kills.append(_kill_after(command, None, rng.uniform(0.2, 1.0)))
    # then two kills at random moments of training: after a random step's checkpoint,
    # plus a random fraction of a second
    first = rng.randint(6, 40)  # far enough apart that the second run trains first
    for min_step in (first, rng.randint(first + 25, reference["steps"] - 25)):
        kills.append(_kill_after(command, min_step, rng.uniform(0.0, 0.4)))
    assert [code for code, _, _ in kills] == [None] * len(kills)
    code, out, err = _run(command)
    assert code == 0, out[-2000:] + err[-3000:]
    resumed = [o for _, o, _ in kills] + [out]
    assert sum("Resuming at step" in o for o in resumed) >= 2
    for o in resumed:  # the console table goes on after the resumed step
        if "Resuming at step" in o:
            assert "E    #" in o and o.index("Resuming") < o.index("E    #")
    _assert_same_outputs(reference["output"], tmp_path / "out")


def test_sigterm_checkpoints_at_a_step_boundary_and_resume_continues(reference, tmp_path):
    command = _command(reference["config"], tmp_path / "out", "--checkpoint-every", "1000")
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # wait for training to be under way (the first evaluation row), then SIGTERM
    line = ""
    while "0       0" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "rerun with --resume" in err
    assert "Traceback" not in err
    [step] = _checkpoint_steps(tmp_path / "out")
    assert 0 < step < reference["steps"] - 1
    code, out, err = _run(command + ["--resume"])
    assert code == 0, err[-3000:]
    assert f"Resuming at step {step} " in out
    _assert_same_outputs(reference["output"], tmp_path / "out")
    # a rerun of a finished run does nothing and says so
    before = _files(tmp_path / "out" / "model-last")
    code, out, err = _run(command + ["--resume"])
    assert code == 0 and "already finished" in out
    assert _files(tmp_path / "out" / "model-last") == before


def _stopped_run(reference, output, steps):
    """A run through the launcher that stops after `steps` steps (max_steps is one of
    the settings that may change on resume) with checkpoints every 5."""
    code, out, err = _run(_command(reference["config"], output, "--checkpoint-every", "5",
                                   "--training.max_steps", str(steps)))
    assert code == 0, err[-3000:]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(
        reference, tmp_path):
    out_dir = tmp_path / "out"
    command = _command(reference["config"], out_dir, "--checkpoint-every", "5", "--resume")
    proc_code, _, _ = _kill_after(command, 20, 0.0)
    steps = _checkpoint_steps(out_dir)
    assert len(steps) == 2, steps
    newest = out_dir / "checkpoints" / f"step-{steps[-1]:08d}.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    code, out, err = _run(command)
    assert code == 0, err[-3000:]
    assert f"skipping a damaged checkpoint: {newest}: truncated" in out
    assert f"Resuming at step {steps[0]} " in out
    _assert_same_outputs(reference["output"], out_dir)


def test_resume_on_an_empty_directory_is_a_plain_start(reference, tmp_path):
    code, out, err = _run(_command(reference["config"], tmp_path / "out", "--resume",
                                   "--checkpoint-every", "50"))
    assert code == 0, err[-3000:]
    assert "no checkpoint in" in out and "starting a new run" in out
    _assert_same_outputs(reference["output"], tmp_path / "out")


def test_a_changed_config_is_a_clear_error_unless_allowed(reference, tmp_path):
    out_dir = tmp_path / "out"
    _kill_after(_command(reference["config"], out_dir, "--checkpoint-every", "5"), 10, 0.0)
    before = _files(out_dir / "checkpoints")
    changed = _command(reference["config"], out_dir, "--checkpoint-every", "5", "--resume",
                       "--training.dropout", "0.5", "--components.tok2vec.model.width", "32")
    code, out, err = _run(changed)
    assert code == 2
    assert "training.dropout (checkpoint: 0.2, now: 0.5)" in err
    assert "width" not in err  # the same value: not a difference
    assert "--allow-config-change" in err and "Traceback" not in err
    assert _files(out_dir / "checkpoints") == before
    # max_steps may change (it decides where the run ends, not its numbers)
    code, out, err = _run(changed[:-4] + ["--training.max_steps", "30"])
    assert code == 0 and "Resuming at step" in out, err[-3000:]
    code, out, err = _run(changed + ["--allow-config-change"])
    assert code == 0, err[-3000:]
    assert "continuing with a changed setting: training.dropout" in out


def test_another_pipeline_and_a_newer_format_are_clear_errors(reference, tmp_path):
    out_dir = tmp_path / "out"
    _kill_after(_command(reference["config"], out_dir, "--checkpoint-every", "5"), 10, 0.0)
    other = tmp_path / "other.cfg"
    other.write_text(_config_text().replace("width = 32", "width = 48"))
    code, out, err = _run(_command(other, out_dir, "--resume", "--allow-config-change"))
    assert code == 2 and "is not a checkpoint of this model" in err, err[-3000:]
    assert "shape" in err and "Traceback" not in err
    # a checkpoint written by a newer optim
    import srsly

    from optim import checkpoint

    newest = out_dir / "checkpoints" / f"step-{_checkpoint_steps(out_dir)[-1]:08d}.ckpt"
    files = checkpoint.read_bundle(newest)
    state = srsly.msgpack_loads(files["state.msgpack"])
    state["version"] = checkpoint.FORMAT_VERSION + 1
    files["state.msgpack"] = srsly.msgpack_dumps(state)
    checkpoint.write_bundle(newest, files)
    code, out, err = _run(_command(reference["config"], out_dir, "--resume"))
    assert code == 2 and "written by a newer optim" in err, err[-3000:]


def test_fresh_start_over_checkpoints_and_unwritable_dir_refuse_before_training(
        reference, tmp_path):
    out_dir = tmp_path / "out"
    _kill_after(_command(reference["config"], out_dir, "--checkpoint-every", "5"), 10, 0.0)
    before = _files(out_dir)
    code, out, err = _run(_command(reference["config"], out_dir, "--checkpoint-every", "5"))
    assert code == 2 and "holds checkpoints of an earlier run" in err
    assert _files(out_dir) == before  # nothing overwritten, model-best included
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, out, err = _run(_command(reference["config"], blocker / "out", "--checkpoint-every",
                                   "5"))
    assert code == 2 and "cannot write checkpoints to" in err and "Traceback" not in err
    code, out, err = _run([sys.executable, "-m", "optim.spacy_train",
                           str(reference["config"]), "--resume"])
    assert code == 2 and "need --output" in err
    code, out, err = _run(_command(tmp_path / "missing.cfg", tmp_path / "x"))
    assert code == 2 and "no config file at" in err and "Traceback" not in err


@pytest.mark.parametrize("sharded", [False, True])
def test_two_gloo_ranks_killed_and_resumed_match_the_uninterrupted_run(tmp_path, sharded):
    pytest.importorskip("torch")
    config = tmp_path / "config.cfg"
    config.write_text(_config_text(distributed=True, sharded=sharded))
    code, out, err = _run(_command(config, tmp_path / "ref", "--checkpoint-every", "5",
                                   ranks=2))
    assert code == 0, out[-2000:] + err[-3000:]
    steps = _checkpoint_steps(tmp_path / "ref")[-1]
    command = _command(config, tmp_path / "out", "--checkpoint-every", "5", "--resume",
                       ranks=2)
    rng = random.Random(3 + sharded)
    for min_step in sorted(rng.sample(range(6, steps - 20), 2)):
        code, out, err = _kill_after(command, min_step, rng.uniform(0.0, 0.3))
        assert code is None, out[-2000:] + err[-3000:]
    code, out, err = _run(command)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "Resuming at step" in out and out.count("Pipeline:") == 1  # rank 0 alone prints
    _assert_same_outputs(tmp_path / "ref", tmp_path / "out")
    if sharded:  # another world size: the model and optimizer resume, the data order changes
        other = tmp_path / "other"
        _kill_after(_command(config, other, "--checkpoint-every", "5", ranks=2), 10, 0.0)
        code, out, err = _run(_command(config, other, "--resume"))
        assert code == 0, out[-2000:] + err[-3000:]
        assert "written by 2 ranks and this run has 1" in out and "Resuming at step" in out


def test_spacy_optim_train_is_the_launcher(reference, tmp_path):
    code, out, err = _run([sys.executable, "-m", "spacy", "optim-train",
                           str(reference["config"]), "--output", str(tmp_path / "out"),
                           "--code", str(CODE), "--checkpoint-every", "5",
                           "--training.max_steps", "6"])
    assert code == 0, err[-3000:]
    assert _checkpoint_steps(tmp_path / "out") == [5, 7]  # every 5, and the end
    code, out, err = _run([sys.executable, "-m", "spacy", "optim-train", "--help"])
    assert code == 0 and "--checkpoint-every N" in out
