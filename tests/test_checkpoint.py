"""optim.checkpoint: atomic checkpoint directories, stable parameter names, random
generators, and the Thinc API `save_checkpoint` / `load_checkpoint` (issue 15).

The Thinc contract: a loop saved at step N and resumed in a fresh process (where the
model's ids differ) ends bitwise equal to the loop that never stopped, dropout included.
"""
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

import optim
from optim import checkpoint
from optim.checkpoint import CheckpointDir, CheckpointError

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ directories

def test_write_dir_is_intact_and_each_kind_of_damage_is_named(tmp_path):
    files = {"a.bin": os.urandom(1000), "b.json": b"{}"}
    checkpoint.write_dir(tmp_path / "ck", files)
    assert checkpoint.verify_dir(tmp_path / "ck") is None
    assert checkpoint.read_dir(tmp_path / "ck") == files
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left
    damaged = {
        "truncated": lambda d: (d / "a.bin").write_bytes(files["a.bin"][:500]),
        "flipped": lambda d: (d / "a.bin").write_bytes(b"x" + files["a.bin"][1:]),
        "missing file": lambda d: (d / "b.json").unlink(),
        "no manifest": lambda d: (d / "manifest.json").unlink(),
        "bad manifest": lambda d: (d / "manifest.json").write_bytes(b"{not json"),
    }
    expected = {"truncated": "a.bin has 500 bytes, not 1000", "flipped": "a.bin is corrupt",
                "missing file": "b.json is missing", "no manifest": "no manifest",
                "bad manifest": "unreadable manifest"}
    for name, damage in damaged.items():
        target = tmp_path / name.replace(" ", "-")
        checkpoint.write_dir(target, files)
        damage(target)
        assert expected[name] in checkpoint.verify_dir(target)
        with pytest.raises(CheckpointError, match="a.bin|b.json|manifest"):
            checkpoint.read_dir(target)


def test_a_write_that_fails_midway_leaves_nothing_and_the_old_directory_intact(tmp_path):
    checkpoint.write_dir(tmp_path / "ck", {"a": b"old"})

    class Boom(bytes):
        def __len__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.write_dir(tmp_path / "new", {"a": b"1", "b": Boom(b"2")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert checkpoint.read_dir(tmp_path / "ck") == {"a": b"old"}


def test_checkpoint_dir_keeps_the_last_two_and_falls_back_past_damage(tmp_path):
    store = CheckpointDir(tmp_path / "cks")
    assert store.newest() is None
    for step in (5, 10, 15):
        store.write(step, {"step": str(step).encode()})
    assert [s for s, _ in store.steps()] == [15, 10]
    (tmp_path / "cks" / "step-00000015" / "step").write_bytes(b"")
    warnings = []
    path, files = store.newest(warn=warnings.append)
    assert path.name == "step-00000010" and files == {"step": b"10"}
    assert warnings == ["skipping a damaged checkpoint: step-00000015: step has 0 bytes, "
                        "not 2; using step-00000010"]
    (tmp_path / "cks" / "step-00000010" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step-00000015.*"
                                              "step-00000010: no manifest"):
        store.newest()
    assert len(store.steps()) == 2  # nothing deleted
    assert CheckpointDir(tmp_path / "x", writer=False).write(1, {"a": b""}) is None
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="keep"):
        CheckpointDir(tmp_path, keep=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        CheckpointDir(tmp_path / "file" / "cks").check_writable()


# ------------------------------------------------------------------ random generators

def test_rng_state_restores_python_numpy_and_torch_draws():
    random.seed(3)
    numpy.random.seed(4)
    numpy.random.normal()  # leaves a cached gaussian in NumPy's state
    torch = pytest.importorskip("torch")
    torch.manual_seed(5)
    state = checkpoint.rng_state()
    import srsly

    state = srsly.msgpack_loads(srsly.msgpack_dumps(state))  # as saved to disk
    first = (random.random(), numpy.random.normal(size=3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
    checkpoint.set_rng_state(state)
    again = (random.random(), numpy.random.normal(size=3).tolist(), torch.rand(3).tolist())
    assert first == again


# ------------------------------------------------------------------ Thinc

THINC_LOOP = textwrap.dedent("""
    import sys
    import numpy
    import optim
    from optim.thinc import save_checkpoint, load_checkpoint
    from thinc.api import Dropout, Relu, Softmax, chain, fix_random_seed

    def build():
        return chain(Relu(16), Dropout(0.2), Relu(16), Softmax())

    fix_random_seed(0)
    data = numpy.random.RandomState(1)
    X = data.uniform(-1, 1, (400, 8)).astype("float32")
    Y = numpy.eye(3, dtype="float32")[data.randint(0, 3, 400)]
    mode, path, total, save_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode != "straight":
        [build() for _ in range(3)]  # other ids than in the first process
    model = build()
    model.initialize(X=X[:5], Y=Y[:5])
    opt = optim.Adam(0.01, grad_clip=1.0, use_averages=True)
    start = 0
    if mode != "straight":
        opt, extra = load_checkpoint(path, model, restore_rng=mode == "resume")
        start = extra["step"]
    for step in range(start, total):
        idx = numpy.random.permutation(len(X))[:32]       # the data order: NumPy's RNG
        Yh, backprop = model.begin_update(X[idx])
        backprop((Yh - Y[idx]) / len(idx))
        model.finish_update(opt)
        opt.step_schedules()
        if step + 1 == save_at:
            save_checkpoint(path, model, opt, step=step + 1)
    weights = {f"{i}/{n}": node.get_param(n) for i, node in enumerate(model.walk())
               for n in node.param_names if node.has_param(n)}
    averages = {f"{i}/{n}": opt.averages[(node.id, n)] for i, node in enumerate(model.walk())
                for n in node.param_names if node.has_param(n)}
    numpy.savez(path + f".{mode}.npz", **weights, **{"avg:" + k: v for k, v in averages.items()})
""")


def _thinc_loop(tmp_path, mode, path, total, save_at):
    script = tmp_path / "loop.py"
    script.write_text(THINC_LOOP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), mode, str(path), str(total), str(save_at)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(numpy.load(str(path) + f".{mode}.npz"))


def test_thinc_loop_resumed_in_a_fresh_process_is_bitwise_the_uninterrupted_loop(tmp_path):
    pytest.importorskip("thinc")
    path = tmp_path / "ckpt.bin"
    straight = _thinc_loop(tmp_path, "straight", path, total=40, save_at=17)
    resumed = _thinc_loop(tmp_path, "resume", path, total=40, save_at=0)
    assert straight.keys() == resumed.keys() and len(straight) == 12
    for name in straight:
        assert straight[name].tobytes() == resumed[name].tobytes(), name
    # the random generators matter: without them the dropout masks and batches differ
    unseeded = _thinc_loop(tmp_path, "resume_without_rng", path, total=40, save_at=0)
    assert any(straight[n].tobytes() != unseeded[n].tobytes() for n in straight)


def test_load_checkpoint_names_another_model_a_newer_format_and_a_damaged_file(tmp_path):
    thinc_api = pytest.importorskip("thinc.api")
    from optim.thinc import load_checkpoint, save_checkpoint

    def build(width):
        model = thinc_api.chain(thinc_api.Relu(width), thinc_api.Softmax())
        model.initialize(X=numpy.zeros((2, 4), "f"), Y=numpy.zeros((2, 3), "f"))
        return model

    model, opt = build(8), optim.Adam(0.01)
    for node in model.walk():
        for name in node.param_names:
            if node.has_param(name):
                opt((node.id, name), node.get_param(name), numpy.ones_like(node.get_param(name)))
    save_checkpoint(tmp_path / "a", model, opt, step=1, note="x")
    assert sorted(checkpoint.param_names(model).values()) == ["1/W", "1/b", "2/W", "2/b"]
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this model: 1/W: shape "
                                              r"\(6, 4\) here, \(8, 4\) in the checkpoint"):
        load_checkpoint(tmp_path / "a", build(6))
    loaded, extra = load_checkpoint(tmp_path / "a", build(8), optim.Adam(0.01))
    assert extra == {"step": 1, "note": "x"} and loaded.nr_update and len(loaded.mom1) == 4
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "b").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "b", build(8))
    import srsly

    msg = srsly.msgpack_loads(data)
    msg["version"] = checkpoint.FORMAT_VERSION + 1
    (tmp_path / "c").write_bytes(srsly.msgpack_dumps(msg))
    with pytest.raises(CheckpointError, match="written by a newer optim"):
        load_checkpoint(tmp_path / "c", build(8))
    with pytest.raises(TypeError, match="msgpack-able"):
        save_checkpoint(tmp_path / "d", model, opt, bad=object())
    assert not (tmp_path / "d").exists()
    with pytest.raises(TypeError, match="Thinc Model or a spaCy Language"):
        checkpoint.param_names(object())
